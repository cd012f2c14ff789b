"""A small CNN trained data-parallel over 8 devices with synchronized BatchNorm.

Four runs of the same network, data order and global batch, side by side:

- ``single``: one device, the whole global batch (the reference);
- ``shard_map``: the batch split over 8 devices, BN statistics synchronized with
  ``axis_name="data"`` (params, optimizer and BN state replicated with ``P()``);
- ``jit``: the single-device code under ``jax.jit`` with the batch sharded over 8 devices
  (no axis name: XLA inserts the collectives);
- ``pmap``: the same as ``shard_map`` with ``jax.pmap`` and per-device copies of everything;
- ``unsync``: ``pmap`` with ``axis_name=None``: each device normalizes with the statistics of
  its own shard and keeps its own running statistics (what plain per-device BN does).

Synchronized BN computes the statistics of the global batch, so ``shard_map``, ``jit`` and
``pmap`` follow the single-device run up to float rounding, and their running statistics are
identical on every device; ``unsync`` does not. The collectives of each variant's training
step are counted at the end (``jaxbn.counting``). On a CPU the 8 devices are faked
(``--xla_force_host_platform_device_count=8``, set below before JAX starts).

Prints a progress bar per variant, then the comparison; writes it (``output.txt``) and the
figures (``sync_bn_cnn.json``) to ``--out``.

  python examples/sync_bn_cnn.py --epochs 8
  python examples/sync_bn_cnn.py --out examples/results/sync_bn_cnn   # the committed run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

VARIANTS = ("single", "shard_map", "jit", "pmap", "unsync")


def build_parser() -> argparse.ArgumentParser:
    """The command line; built before JAX is imported so that ``--help`` is instant."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=8, help="passes over the digits training set")
    p.add_argument("--batch-size", type=int, default=64,
                   help="global batch, split evenly over the devices")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (momentum 0.9)")
    p.add_argument("--devices", type=int, default=8, help="devices to train over")
    p.add_argument("--max-steps", type=int, default=None,
                   help="steps per epoch (default: the whole training set; for smoke tests)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma list of the variants to run, from " + ",".join(VARIANTS))
    p.add_argument("--seed", type=int, default=0, help="initialization and data order")
    p.add_argument("--out", default="out/sync_bn_cnn",
                   help="folder for sync_bn_cnn.json and output.txt (what is printed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad arguments end here, before JAX loads

if "jax" not in sys.modules:  # must happen before JAX initializes its backends
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: E402

import jaxbn  # noqa: E402
from jaxbn.counting import CollectiveCount, count_collectives  # noqa: E402

CHANNELS = (16, 32)


def init_cnn(key, n_out: int = 10):
    """conv3x3-BN-relu, conv3x3/2-BN-relu, global average pool, dense. Returns (params, state)."""
    k1, k2, k3 = jax.random.split(key, 3)
    c1, c2 = CHANNELS
    he = jax.nn.initializers.he_normal()
    bn1, s1 = jaxbn.bn_init(c1)
    bn2, s2 = jaxbn.bn_init(c2)
    params = {"conv1": he(k1, (3, 3, 1, c1)), "bn1": bn1,
              "conv2": he(k2, (3, 3, c1, c2)), "bn2": bn2,
              "dense": {"w": he(k3, (c2, n_out)), "b": jnp.zeros(n_out)}}
    return params, {"bn1": s1, "bn2": s2}


def _conv(x, w, stride: int):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def forward(params, state, x, train: bool, axis_name=None):
    """Logits and the new BN state; ``axis_name`` synchronizes BN over those devices."""
    h, new_state = x, {}
    for i, stride in ((1, 1), (2, 2)):
        h = _conv(h, params[f"conv{i}"], stride)
        h, new_state[f"bn{i}"] = jaxbn.bn_apply(params[f"bn{i}"], state[f"bn{i}"], h, train,
                                                momentum=0.9, axis_name=axis_name)
        h = jax.nn.relu(h)
    h = h.mean(axis=(1, 2))
    return h @ params["dense"]["w"] + params["dense"]["b"], new_state


def make_train_step(tx, axis_name=None, grad_mean_over=None):
    """One SGD step on this device's batch (the whole batch for ``single`` and ``jit``).
    ``grad_mean_over`` averages gradients over devices (pmap); under shard_map JAX's autodiff
    already sums the gradients of replicated parameters."""

    def step(params, state, opt, x, y):
        def loss_fn(p):
            logits, new_state = forward(p, state, x, True, axis_name)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            if axis_name is not None and grad_mean_over is None:
                loss = jax.lax.pmean(loss, axis_name)  # global mean loss: invariant
            return loss, new_state

        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        if grad_mean_over is not None:
            grads = jax.lax.pmean(grads, grad_mean_over)
            loss = jax.lax.pmean(loss, grad_mean_over)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), new_state, opt, loss

    return step


class Variant(NamedTuple):
    """How one variant puts its training on the devices and reads it back."""

    place: Callable  # (params, state, opt) -> on the devices
    shard: Callable  # a global batch (x, y) -> the step's batch arguments
    step: Callable  # jitted: (params, state, opt, *batch) -> (params, state, opt, loss)
    unplace: Callable  # a tree on the devices -> NumPy copies, one per device (leading axis)


def build(variant: str, tx, devices) -> Variant:
    """Places, steps and reads back one variant of data-parallel training."""
    n = len(devices)
    if variant == "single":
        return Variant(lambda tree: tree, lambda x, y: (x, y), jax.jit(make_train_step(tx)),
                       lambda tree: jax.tree.map(lambda a: np.asarray(a)[None], tree))
    if variant in ("shard_map", "jit"):
        mesh = jax.sharding.Mesh(np.array(devices), ("data",))
        rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        if variant == "jit":  # the single-device code; XLA partitions it over the sharded batch
            step = jax.jit(make_train_step(tx), out_shardings=(rep, rep, rep, rep))
        else:
            step = jax.jit(jax.shard_map(make_train_step(tx, axis_name="data"), mesh=mesh,
                                         in_specs=(P(), P(), P(), P("data"), P("data")),
                                         out_specs=(P(), P(), P(), P())))

        def unplace(tree):  # every device's own copy of a replicated output
            return jax.tree.map(
                lambda a: np.stack([np.asarray(s.data) for s in a.addressable_shards]), tree)

        return Variant(lambda tree: jax.device_put(tree, rep),
                       lambda x, y: jax.device_put((x, y), split), step, unplace)
    sync = variant == "pmap"
    step = jax.pmap(make_train_step(tx, axis_name="data" if sync else None,
                                    grad_mean_over="data"), axis_name="data", devices=devices)
    return Variant(
        lambda tree: jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), tree),
        lambda x, y: (x.reshape((n, -1) + x.shape[1:]), y.reshape((n, -1))),
        step, lambda tree: jax.tree.map(np.asarray, tree))


def start(variant: str, lr: float, seed: int, devices):
    """The variant and its initial ``(params, state, opt)`` placed on the devices."""
    tx = optax.sgd(lr, momentum=0.9)
    params, state = init_cnn(jax.random.key(seed))
    v = build(variant, tx, devices)
    return v, v.place((params, state, tx.init(params)))


def train(variant: str, data, *, epochs: int, batch_size: int, lr: float, seed: int,
          devices, max_steps: int | None = None, progress: bool = False) -> dict:
    """Trains one variant; returns per-epoch test accuracy, loss, time and final copies.
    ``progress`` shows a progress bar over the variant's steps."""
    x_tr, y_tr, x_te, y_te = data
    v, (params, state, opt) = start(variant, lr, seed, devices)
    evaluate = jax.jit(lambda p, s: jnp.mean(jnp.argmax(forward(p, s, x_te, False)[0], -1)
                                             == y_te))
    rng = np.random.default_rng(seed)  # the same data order for every variant
    steps = len(x_tr) // batch_size if max_steps is None else max_steps
    hist: dict = {"test_accuracy": [], "train_loss": [], "epoch_time_s": []}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=epochs * steps, desc=f"{variant:>9}", unit="step", file=sys.stdout)
    for _ in range(epochs):
        perm = rng.permutation(len(x_tr))
        t0, losses = time.perf_counter(), []
        for i in range(steps):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            params, state, opt, loss = v.step(params, state, opt, *v.shard(x_tr[idx], y_tr[idx]))
            losses.append(loss)
            if bar is not None:
                bar.update()
            if "params_step1" not in hist:
                hist["params_step1"] = v.unplace(params)
        hist["train_loss"].append(float(np.mean(jax.device_get(losses))))
        hist["epoch_time_s"].append(time.perf_counter() - t0)
        copies_p, copies_s = v.unplace((params, state))
        # evaluate with device 0's copy (the only one for synchronized BN: all are equal)
        first = jax.tree.map(lambda a: a[0], (copies_p, copies_s))
        hist["test_accuracy"].append(float(evaluate(*first)))
        if bar is not None:
            bar.set_postfix(loss=f"{hist['train_loss'][-1]:.3f}",
                            acc=f"{hist['test_accuracy'][-1]:.3f}")
    if bar is not None:
        bar.close()
    hist["params"], hist["state"] = copies_p, copies_s
    return hist


def collectives_per_step(variant: str, data, devices, batch_size: int) -> CollectiveCount:
    """Collectives in one training step of ``variant``: as traced, and as XLA compiled them."""
    v, placed = start(variant, 0.1, 0, devices)
    return count_collectives(v.step, *placed, *v.shard(data[0][:batch_size], data[1][:batch_size]))


def spread_across_devices(tree) -> float:
    """Largest difference between any device's copy and device 0's."""
    return max(float(np.max(np.abs(a - a[:1]))) for a in jax.tree.leaves(tree))


def max_difference(a_tree, b_tree) -> float:
    """Largest |a - b| between device 0's copies of two runs' arrays."""
    return max(float(np.max(np.abs(np.asarray(a[0], np.float64) - np.asarray(b[0]))))
               for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree), strict=True))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    devices = jax.devices()[: args.devices]
    if len(devices) < args.devices or args.batch_size % args.devices:
        raise SystemExit(f"need {args.devices} devices (found {len(jax.devices())}) and a "
                         f"batch size divisible by them (got {args.batch_size})")
    x_tr, y_tr, x_te, y_te = datasets.load_digits()
    data = (x_tr.reshape(-1, 8, 8, 1), y_tr, x_te.reshape(-1, 8, 8, 1), y_te)
    variants = [v for v in args.variants.split(",") if v]
    lines: list[str] = []

    def emit(line: str = "") -> None:
        print(line)
        lines.append(line)

    emit(f"{len(devices)} devices ({devices[0].platform}); global batch {args.batch_size}, "
         f"{args.batch_size // len(devices)} per device")
    runs = {v: train(v, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                     seed=args.seed, devices=devices, max_steps=args.max_steps,
                     progress=not args.no_progress)
            for v in variants}

    emit("\ntest accuracy per epoch")
    emit(f"{'epoch':>5} " + " ".join(f"{v:>10}" for v in variants))
    for e in range(args.epochs):
        emit(f"{e + 1:>5} " + " ".join(f"{runs[v]['test_accuracy'][e]:>10.4f}" for v in variants))
    emit("\nafter training")
    record: dict = {"args": vars(args), "platform": devices[0].platform, "variants": {}}
    for v in variants:
        r = runs[v]
        rec = {k: r[k] for k in ("test_accuracy", "train_loss", "epoch_time_s")}
        rec["running_stats_spread_across_devices"] = spread_across_devices(r["state"])
        line = (f"  {v:>9}: loss {r['train_loss'][-1]:.4f}, epoch time "
                f"{np.median(r['epoch_time_s']):.2f} s, running stats differ across devices "
                f"by {rec['running_stats_spread_across_devices']:.3g}")
        if "single" in runs and v != "single":
            ref = runs["single"]
            rec["params_vs_single_after_1_step"] = max_difference(r["params_step1"],
                                                                  ref["params_step1"])
            rec["params_vs_single_after_training"] = max_difference(r["params"], ref["params"])
            rec["running_stats_vs_single"] = max_difference(r["state"], ref["state"])
            line += (f"; max |params - single| after 1 step "
                     f"{rec['params_vs_single_after_1_step']:.3g}, after training "
                     f"{rec['params_vs_single_after_training']:.3g}; max |running stats - "
                     f"single| {rec['running_stats_vs_single']:.3g}")
        emit(line)
        record["variants"][v] = rec
    emit("\ncollectives per training step (traced / compiled; 2 BN layers)")
    for v in variants:
        traced, compiled = collectives_per_step(v, data, devices, args.batch_size)
        record["variants"][v]["collectives_traced"] = str(traced)
        record["variants"][v]["collectives_compiled"] = str(compiled)
        emit(f"  {v:>9}: {traced} / {compiled}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sync_bn_cnn.json").write_text(json.dumps(record, indent=1))
    (out / "output.txt").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {out / 'sync_bn_cnn.json'}, {out / 'output.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
