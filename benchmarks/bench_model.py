"""Whole-model benchmark: a ResNet-18-style training step with jaxbn.linen.BatchNorm against the
same model with flax.linen.BatchNorm, float32 and bfloat16, on one device and synchronized over
8 devices with ``jax.shard_map`` (BN ``axis_name``, parameters replicated).

The model follows the layout of Flax's ImageNet ResNet-18 (written here from the architecture:
a 7x7/2 stem convolution, BN, ReLU and 3x3/2 max-pool; four stages of two BasicBlocks, each
two 3x3 convolutions with BN, a 1x1 projection with BN where the shape changes; global average
pool; dense), scaled by ``--width`` and fed small images so a step runs on a 2-core CPU.
One step: forward in training mode, softmax cross-entropy, gradients, SGD with momentum.

Reported per configuration: step time ratio jaxbn / flax (median and 10-90% range of per-round
ratios over interleaved rounds), each step time against the memory floor (XLA's bytes-accessed
estimate of the flax.linen step / the device's peak bandwidth), compiled temp memory, and the
collectives of one step (``jaxbn.counting``).

  MALLOC_MMAP_THRESHOLD_=4000000000 python benchmarks/bench_model.py --out benchmarks/results
  python benchmarks/bench_model.py --quick          # tiny model; writes under out/ (gitignored)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402


def parser() -> argparse.ArgumentParser:
    """Command-line options (parsed before JAX starts: ``--devices`` must act first)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny model, batch and image, few rounds (a smoke run)")
    p.add_argument("--batch", type=int, default=16, help="global batch size")
    p.add_argument("--size", type=int, default=64, help="input images are size x size x 3")
    p.add_argument("--width", type=int, default=16,
                   help="channels of the first stage (Flax's ResNet-18: 64); doubled per stage")
    p.add_argument("--blocks", default="2,2,2,2", help="BasicBlocks per stage")
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help="computation dtypes (parameters stay float32)")
    p.add_argument("--placements", default="single,shard_map",
                   help="single: one device; shard_map: batch split over --devices devices")
    p.add_argument("--devices", type=int, default=8,
                   help="devices for shard_map (faked on a CPU by splitting it)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds (default: 3 with --quick, else 7)")
    p.add_argument("--noise-threshold", type=float, default=0.25,
                   help="flag the run NOISY when flax's own 10-90%% step-time spread, relative "
                        "to its median, exceeds this")
    p.add_argument("--out", default=str(HERE.parent / "out" / "bench_model"),
                   help="folder for model.json and model.md (created)")
    return p


if __name__ == "__main__":
    ARGS = parser().parse_args()
    common.configure(ARGS.devices)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxbn.linen  # noqa: E402
from jaxbn.counting import count_compiled, count_traced  # noqa: E402

NORMS = {"flax": nn.BatchNorm, "jaxbn": jaxbn.linen.BatchNorm}


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BN; a 1x1 projection with BN when the shape changes."""

    features: int
    strides: int
    norm: type
    dtype: jnp.dtype
    axis_name: str | None
    train: bool

    def _bn(self):
        return self.norm(use_running_average=not self.train, momentum=0.9, epsilon=1e-5,
                         dtype=self.dtype, axis_name=self.axis_name)

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, s: nn.Conv(f, (k, k), (s, s), use_bias=False,  # noqa: E731
                                       dtype=self.dtype)
        y = nn.relu(self._bn()(conv(self.features, 3, self.strides)(x)))
        y = self._bn()(conv(self.features, 3, 1)(y))
        if x.shape[-1] != self.features or self.strides != 1:
            x = self._bn()(conv(self.features, 1, self.strides)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet-18 layout (blocks 2,2,2,2) with a configurable width and BatchNorm class."""

    norm: type
    width: int = 64
    blocks: tuple[int, ...] = (2, 2, 2, 2)
    num_classes: int = 10
    dtype: jnp.dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(self.width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False,
                    dtype=self.dtype)(x.astype(self.dtype))
        x = self.norm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=self.dtype, axis_name=self.axis_name)(x)
        x = nn.max_pool(nn.relu(x), (3, 3), (2, 2), padding="SAME")
        for i, n in enumerate(self.blocks):
            for j in range(n):
                x = BasicBlock(self.width * 2**i, 2 if i > 0 and j == 0 else 1, self.norm,
                               self.dtype, self.axis_name, train)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


def make_step(model: ResNet, tx, axis_name: str | None):
    """One SGD step: ``(params, stats, opt, x, y) -> (params, stats, opt, loss)``."""

    def step(params, stats, opt, x, y):
        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": stats}, x, True,
                                      mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            if axis_name is not None:  # global mean loss: replicated gradients come out summed
                loss = jax.lax.pmean(loss, axis_name)
            return loss, upd["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), stats, opt, loss

    return step


def build(norm: str, dtype, placement: str, args, n_dev: int):
    """The jitted step of one configuration and its placed arguments."""
    axis = "d" if placement == "shard_map" else None
    blocks = tuple(int(b) for b in args.blocks.split(","))
    model = ResNet(NORMS[norm], args.width, blocks, 10, dtype, axis)
    x = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, 3))
    y = jnp.arange(args.batch) % 10
    # Initialized unsynchronized (Flax's BN would issue its collective outside shard_map).
    v = ResNet(NORMS[norm], args.width, blocks, 10, dtype, None).init(jax.random.key(1), x[:2],
                                                                        False)
    tx = optax.sgd(0.1, momentum=0.9)
    state = (v["params"], v["batch_stats"], tx.init(v["params"]))
    step = make_step(model, tx, axis)
    if placement == "single":
        return jax.jit(step), (*state, x, y)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n_dev]), ("d",))
    rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("d"))
    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(), P("d"), P("d")),
                               out_specs=(P(), P(), P(), P())))
    return fn, (*jax.device_put(state, rep), *jax.device_put((x, y), split))


def measure(dtype_name: str, placement: str, args, rounds: int, bandwidth: dict) -> dict:
    """Both norms of one configuration: static figures, then interleaved step timing. Where the
    bandwidth is measured (CPU), a streaming copy joins every round and raises it to the best
    copy seen (a busy moment at the start must not lower the floor)."""
    n_dev = min(args.devices, jax.device_count()) if placement == "shard_map" else 1
    dtype = jnp.dtype(dtype_name)
    row: dict = {"dtype": dtype_name, "placement": placement, "devices": n_dev, "norms": {}}
    buf = jnp.ones((16 * 2**20,), jnp.float32)  # 64 MiB
    copy = jax.jit(lambda x: x * 2.0)
    jax.block_until_ready(copy(buf))
    calls = {"copy": lambda: copy(buf)}
    for norm in NORMS:
        fn, a = build(norm, dtype, placement, args, n_dev)
        compiled = fn.lower(*a).compile()  # timed as it is: one compilation per step
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        row["norms"][norm] = {
            "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
            "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
            # what jaxbn.counting.count_collectives reports, without compiling again
            "collectives": [count_traced(jax.make_jaxpr(fn)(*a).jaxpr),
                            count_compiled(compiled.as_text())]}
        jax.block_until_ready(compiled(*a))
        calls[norm] = lambda c=compiled, a=a: c(*a)
    times = common.interleaved(calls, rounds)
    if bandwidth["source"].startswith("measured"):
        bandwidth["bytes_per_s"] = max(bandwidth["bytes_per_s"],
                                       2 * buf.nbytes / float(np.min(times["copy"])))
    row["flax_spread"] = common.relative_spread(times["flax"])
    row["ratio"] = common.summarize(times["jaxbn"], times["flax"])
    for norm in NORMS:
        d = row["norms"][norm]
        d["ms"] = float(np.median(times[norm]) * 1e3)
    row["temp_ratio"] = row["norms"]["jaxbn"]["temp_bytes"] / max(
        row["norms"]["flax"]["temp_bytes"], 1)
    return row


def to_markdown(res: dict) -> str:
    env, bw, a = res["env"], res["bandwidth"], res["args"]
    lines = [f"ResNet-18 layout, blocks {a['blocks']}, width {a['width']}, batch {a['batch']} "
             f"(global), {a['size']}x{a['size']}x3 input, 10 classes, SGD momentum 0.9. "
             f"Platform: {env['platform']} ({env['device_kind']}), jax {env['jax']}, "
             f"MALLOC_MMAP_THRESHOLD_={env['mmap_threshold']}; {res['rounds']} interleaved "
             "rounds. Time ratio: median [10%-90%] of per-round jaxbn / flax.linen. Floor: "
             "XLA's bytes-accessed estimate of the flax.linen step / "
             f"{bw['bytes_per_s'] / 1e9:.1f} GB/s ({bw['source']}).", ""]
    if res["noise"]:
        lines += [f"**{res['noise']}**", ""]
    lines += ["| dtype | placement | step time jaxbn / flax | flax ms | jaxbn ms | "
              "flax / floor | jaxbn / floor | temp MiB flax | temp MiB jaxbn | "
              "collectives flax | collectives jaxbn | flax's own spread |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        f, j = r["norms"]["flax"], r["norms"]["jaxbn"]
        where = "1 device" if r["placement"] == "single" else f"shard_map, {r['devices']} dev"
        lines.append(
            f"| {r['dtype']} | {where} | {common.fmt(r['ratio'])} | {f['ms']:.1f} | "
            f"{j['ms']:.1f} | {f['vs_floor']:.1f} | {j['vs_floor']:.1f} | "
            f"{f['temp_bytes'] / 2**20:.1f} | {j['temp_bytes'] / 2**20:.1f} | "
            f"{f['collectives'][0]} / {f['collectives'][1]} | "
            f"{j['collectives'][0]} / {j['collectives'][1]} | {r['flax_spread']:.0%} |")
    lines += ["", "Collectives: traced / compiled per training step: every BN layer's, the "
              "loss pmean, and the psums that shard_map's autodiff inserts for the gradients of "
              "replicated parameters (XLA's combiner merges many of them when compiling)."]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict:
    """Measures every (dtype, placement) configuration and writes under ``args.out``."""
    if args.quick:
        args.batch, args.size, args.width, args.blocks = 8, 16, 4, "1,1"
    rounds = args.rounds or (3 if args.quick else 7)
    res: dict = {"env": common.environment(), "args": vars(args).copy(), "rounds": rounds,
                 "bandwidth": common.peak_bandwidth(mib=16 if args.quick else 256), "rows": []}
    for dtype_name in args.dtypes.split(","):
        for placement in args.placements.split(","):
            print(f"measuring {dtype_name} {placement} ...", flush=True)
            res["rows"].append(measure(dtype_name, placement, args, rounds, res["bandwidth"]))
    if res["bandwidth"]["source"].startswith("measured"):
        res["bandwidth"]["source"] += "; and the best 64 MiB copy, timed in every round"
    for r in res["rows"]:  # against the final (highest) bandwidth
        floor_s = r["norms"]["flax"]["bytes_accessed"] / res["bandwidth"]["bytes_per_s"]
        for d in r["norms"].values():
            d["vs_floor"] = d["ms"] * 1e-3 / floor_s
    res["noise"] = common.noise_verdict(
        {f"{r['dtype']} {r['placement']}": r["flax_spread"] for r in res["rows"]},
        args.noise_threshold)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.json").write_text(json.dumps(res, indent=1))
    md = to_markdown(res)
    (out / "model.md").write_text(md)
    print(md)
    print(f"written to {out}")
    return res


if __name__ == "__main__":
    run(ARGS)
