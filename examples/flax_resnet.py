"""A small ResNet in Flax linen with ``jaxbn.linen.BatchNorm``, data-parallel over 8 devices.

What a Flax user does with BatchNorm, end to end, in one script:

- the model is plain ``flax.linen``; only its BatchNorm comes from ``jaxbn.linen``
  (``--bn flax`` runs the very same script with ``flax.linen.BatchNorm``: nothing else changes);
- training with optax, data-parallel over 8 (fake CPU) devices with ``jax.shard_map``:
  parameters replicated (``P()``), the batch split (``P("data")``), BatchNorm statistics
  synchronized over the ``"data"`` axis, so every device holds the same running statistics;
- a checkpoint saved and restored with orbax-checkpoint;
- inference with each BatchNorm folded into its convolution (``jaxbn.fold_linen``: the
  convolution takes the scale, the bias-less convolution leaves the BatchNorm a per-feature
  shift), checked against the unfolded model.

Data: scikit-learn's bundled digits (8x8) by default; ``--dataset mnist --data-dir DIR`` reads
the four MNIST idx files (28x28) from DIR. Writes ``results.json`` and ``checkpoint/`` under
``--out`` and ends on a one-line verdict.

  python examples/flax_resnet.py                  # digits, jaxbn.linen.BatchNorm
  python examples/flax_resnet.py --bn flax        # the same with flax.linen.BatchNorm
  python examples/flax_resnet_nnx.py              # the flax.nnx twin
"""

from __future__ import annotations

import argparse
import sys

from resnet_cli import parse_args

if __name__ == "__main__":
    ARGS = parse_args(None, __doc__.splitlines()[0], "out/flax_resnet")
    import jax

    jax.config.update("jax_num_cpu_devices", ARGS.devices)  # before the first JAX operation

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn

AXIS = "data"  # the mesh axis the batch is split over and BatchNorm synchronizes over


def batchnorm_class(name: str) -> Callable[..., nn.Module]:
    """The one line a Flax user changes: where ``BatchNorm`` is imported from."""
    if name == "flax":
        from flax.linen import BatchNorm
    else:
        from jaxbn.linen import BatchNorm
    return BatchNorm


class ResBlock(nn.Module):
    """conv-BN-relu-conv-BN, plus the input, then relu."""

    width: int
    norm: Callable[..., nn.Module]
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        def bn(name: str) -> nn.Module:
            return self.norm(use_running_average=not train, momentum=0.9,
                             axis_name=self.axis_name, name=name)

        h = nn.Conv(self.width, (3, 3), use_bias=False, name="conv1")(x)
        h = nn.relu(bn("bn1")(h))
        h = nn.Conv(self.width, (3, 3), use_bias=False, name="conv2")(h)
        return nn.relu(x + bn("bn2")(h))


class ResNet(nn.Module):
    """A stem (conv-BN-relu), ``blocks`` residual blocks, global average pooling, Dense."""

    norm: Callable[..., nn.Module]
    width: int = 16
    blocks: int = 2
    num_classes: int = 10
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Conv(self.width, (3, 3), use_bias=False, name="stem_conv")(x)
        x = self.norm(use_running_average=not train, momentum=0.9, axis_name=self.axis_name,
                      name="stem_bn")(x)
        x = nn.relu(x)
        for i in range(self.blocks):
            x = ResBlock(self.width, self.norm, self.axis_name, name=f"block{i}")(x, train)
        return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))


def fold_pairs(blocks: int) -> dict[str, str]:
    """Each convolution and the BatchNorm that follows it, as ``jaxbn.fold_linen`` wants."""
    pairs = {"stem_conv": "stem_bn"}
    for i in range(blocks):
        pairs.update({f"block{i}/conv1": f"block{i}/bn1", f"block{i}/conv2": f"block{i}/bn2"})
    return pairs


def make_train_step(model: ResNet, tx: optax.GradientTransformation) -> Callable:
    """One SGD step on one device's share of the batch (to run under ``jax.shard_map``).

    With ``model.axis_name`` set, BatchNorm uses the statistics of the global batch; the loss
    is averaged over the devices, so the gradient of the replicated parameters is the
    full-batch gradient (JAX's autodiff sums it over the devices).
    """

    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
            logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, x,
                                          train=True, mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            if model.axis_name is not None:
                loss = jax.lax.pmean(loss, model.axis_name)
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return step


def make_optimizer(lr: float, steps: int) -> optax.GradientTransformation:
    """SGD with momentum 0.9, the learning rate decaying from ``lr`` to 0 over ``steps``."""
    return optax.sgd(optax.cosine_decay_schedule(lr, max(steps, 1)), momentum=0.9)


def total_steps(args: argparse.Namespace, n_train: int) -> int:
    """Training steps of the run: whole global batches per epoch, capped by --max-steps."""
    total = args.epochs * (n_train // args.batch_size)
    return min(total, args.max_steps) if args.max_steps else total


def data_parallel(step: Callable, mesh: jax.sharding.Mesh) -> Callable:
    """``step`` over the mesh: everything replicated except the batch, split over ``AXIS``."""
    rep, split = P(), P(AXIS)
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(rep, rep, rep, split, split),
                                 out_specs=rep))


@functools.cache
def _eval_fn(model: ResNet) -> Callable:
    return jax.jit(functools.partial(model.apply, train=False))


def predict(model: ResNet, variables: Any, x: np.ndarray, chunk: int = 500) -> np.ndarray:
    """Logits in evaluation mode (running statistics), on one device, in chunks."""
    apply = _eval_fn(model)
    return np.concatenate([np.asarray(apply(variables, x[i:i + chunk]))
                           for i in range(0, len(x), chunk)])


def load_images(name: str, data_dir: str | None):
    """``(x_train, y_train, x_test, y_test)`` with images as NHWC float32."""
    x_tr, y_tr, x_te, y_te = datasets.load(name, data_dir)
    side = int(round(x_tr.shape[1] ** 0.5))
    return (x_tr.reshape(-1, side, side, 1), y_tr, x_te.reshape(-1, side, side, 1), y_te)


def save_and_restore(path: Path, tree: Any) -> Any:
    """Saves ``tree`` with orbax-checkpoint and restores it (with its shardings)."""
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path.resolve(), tree, force=True)
    ckptr.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    return ckptr.restore(path.resolve(), target)


def trees_equal(a: Any, b: Any) -> bool:
    same = jax.tree.map(lambda u, v: bool(np.array_equal(np.asarray(u), np.asarray(v))), a, b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(jax.tree.leaves(same))


def fit(args: argparse.Namespace, data, split: NamedSharding,
        train_on: Callable[[jax.Array, jax.Array], jax.Array],
        test_logits: Callable[[], np.ndarray], name: str) -> tuple[int, float, dict]:
    """The training loop: shuffled epochs of global batches placed with ``split``, a progress
    bar, the test accuracy after each epoch. Returns ``(steps, seconds, history)``."""
    from tqdm import tqdm

    x_tr, y_tr, _, y_te = data
    rng = np.random.default_rng(args.seed)
    steps_per_epoch = len(x_tr) // args.batch_size
    total = total_steps(args, len(x_tr))
    history: dict[str, list[float]] = {"loss": [], "test_accuracy": []}
    done, t0 = 0, time.perf_counter()
    bar = tqdm(total=total, disable=args.no_progress, unit="step", desc=f"{name} {args.bn} BN")
    for epoch in range(args.epochs):
        if done >= total:
            break
        perm = rng.permutation(len(x_tr))
        losses = []
        for s in range(min(steps_per_epoch, total - done)):
            idx = perm[s * args.batch_size:(s + 1) * args.batch_size]
            losses.append(float(train_on(*jax.device_put((x_tr[idx], y_tr[idx]), split))))
            done += 1
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}")
        history["loss"].append(float(np.mean(losses)))
        history["test_accuracy"].append(float(np.mean(test_logits().argmax(-1) == y_te)))
        bar.write(f"epoch {epoch + 1}: loss {history['loss'][-1]:.4f}, "
                  f"test accuracy {history['test_accuracy'][-1]:.4f}")
    bar.close()
    return done, time.perf_counter() - t0, history


def train(args: argparse.Namespace, data, devices) -> dict:
    """Trains, checkpoints, restores and folds; returns the results as a dict."""
    x_tr, _, x_te, y_te = data
    n_dev = len(devices)
    if args.batch_size % n_dev:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the "
                         f"{n_dev} devices")
    mesh = jax.make_mesh((n_dev,), (AXIS,), devices=devices)
    model = ResNet(batchnorm_class(args.bn), args.width, args.blocks, axis_name=AXIS)
    variables = model.init(jax.random.key(args.seed), x_tr[:1], train=False)
    tx = make_optimizer(args.lr, total_steps(args, len(x_tr)))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    params, batch_stats = jax.device_put((variables["params"], variables["batch_stats"]),
                                         replicated)
    opt_state = jax.device_put(tx.init(params), replicated)
    step = data_parallel(make_train_step(model, tx), mesh)

    state = {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}

    def train_on(xb: jax.Array, yb: jax.Array) -> jax.Array:
        *new, loss = step(state["params"], state["batch_stats"], state["opt_state"], xb, yb)
        state.update(zip(("params", "batch_stats", "opt_state"), new, strict=True))
        return loss

    def test_logits() -> np.ndarray:
        return predict(model, jax.device_get({"params": state["params"],
                                              "batch_stats": state["batch_stats"]}), x_te)

    done, train_time, history = fit(args, data, split, train_on, test_logits, "linen")

    # Checkpoint: save everything training needs, restore it, check it is bit-for-bit the same.
    t1 = time.perf_counter()
    restored = save_and_restore(Path(args.out) / "checkpoint", state)
    restored_ok = trees_equal(state, restored)
    checkpoint_time = time.perf_counter() - t1
    variables = jax.device_get({"params": restored["params"],
                                "batch_stats": restored["batch_stats"]})
    logits = predict(model, variables, x_te)

    # Inference: fold every BatchNorm into its convolution (the convolutions have no bias, so
    # each BatchNorm keeps only a per-feature shift); the same model computes the same logits.
    folded = jaxbn.fold_linen(variables, fold_pairs(args.blocks))
    folded_logits = predict(model, folded, x_te)
    return summarize(args, n_dev, done, (train_time, checkpoint_time), history, y_te, logits,
                     folded_logits, restored_ok)


def summarize(args: argparse.Namespace, n_dev: int, steps: int, seconds: tuple[float, float],
              history: dict, y_test: np.ndarray, logits: np.ndarray,
              folded_logits: np.ndarray, restored_ok: bool) -> dict:
    """The results of one run: configuration, history, checkpoint and folding checks."""
    fold_diff = float(np.max(np.abs(folded_logits - logits)))
    return {
        "config": {k: v for k, v in vars(args).items() if k != "no_progress"},
        "devices": n_dev, "steps": steps, "train_seconds": round(seconds[0], 2),
        "checkpoint_seconds": round(seconds[1], 2),
        **history,
        "final_test_accuracy": float(np.mean(logits.argmax(-1) == y_test)),
        "checkpoint_restored_exactly": restored_ok,
        "folded_max_abs_logit_difference": fold_diff,
        "folded_relative_difference": fold_diff / max(float(np.max(np.abs(logits))), 1e-12),
        "folded_same_predictions": float(np.mean(folded_logits.argmax(-1)
                                                 == logits.argmax(-1))),
    }


def verdict(res: dict, label: str = "BatchNorm") -> tuple[bool, str]:
    """Whether the run passed its checks, and a one-line summary."""
    ok = (res["checkpoint_restored_exactly"] and res["folded_relative_difference"] < 1e-4
          and np.isfinite(res["loss"][-1]))
    line = (f"{'OK' if ok else 'FAILED'}: {res['config']['bn']} {label} over "
            f"{res['devices']} devices, {res['steps']} steps, test accuracy "
            f"{res['final_test_accuracy']:.4f}; checkpoint restored "
            f"{'exactly' if res['checkpoint_restored_exactly'] else 'WITH DIFFERENCES'}; "
            f"folded model max |logit difference| {res['folded_max_abs_logit_difference']:.1e}")
    return ok, line


def main(args: argparse.Namespace, train_fn: Callable = train,
         label: str = "linen.BatchNorm") -> int:
    """Loads the data, runs ``train_fn``, writes ``results.json``, prints the verdict."""
    devices = jax.devices()[:args.devices]
    if len(devices) < args.devices:
        raise SystemExit(f"asked for {args.devices} devices, found {len(jax.devices())}")
    data = load_images(args.dataset, args.data_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = train_fn(args, data, devices)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    ok, line = verdict(res, label)
    print(f"results in {out / 'results.json'}")
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(ARGS))
