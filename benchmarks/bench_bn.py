"""BatchNorm in training mode: jaxbn against Flax (linen default and stable, nnx), Haiku,
Equinox and a plain two-pass jnp version, side by side in one process.

For each shape: median time ratios to ``flax.linen.BatchNorm`` (default) over interleaved
repetitions, forward and forward+backward; ratio to a memory floor (a jitted ``x * a + b``);
residual bytes kept for the backward (``jax.vjp``); temp bytes of the compiled
forward+backward (``memory_analysis``); compile time; collectives per layer under ``pmap`` on
8 fake devices; and an end-to-end training step of a small ResNet-style CNN.

  pip install -e ".[bench]" && python benchmarks/bench_bn.py            # full shapes
  python benchmarks/bench_bn.py --quick                                  # small shapes
"""

from __future__ import annotations

import os

if "--no-fake-devices" not in os.sys.argv:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anchors import ANCHORS, channels_first  # noqa: E402

from jaxbn.counting import count_collectives  # noqa: E402

SHAPES = [
    ("NHWC 64x32x32x64 f32", (64, 32, 32, 64), jnp.float32),
    ("NHWC 256x14x14x256 f32", (256, 14, 14, 256), jnp.float32),
    ("2-D 4096x1024 f32", (4096, 1024), jnp.float32),
    ("NHWC 256x14x14x256 bf16", (256, 14, 14, 256), jnp.bfloat16),
]
QUICK = [
    ("NHWC 16x16x16x32 f32", (16, 16, 16, 32), jnp.float32),
    ("2-D 1024x256 f32", (1024, 256), jnp.float32),
    ("NHWC 16x16x16x32 bf16", (16, 16, 16, 32), jnp.bfloat16),
]


def _block(t):
    return jax.block_until_ready(t)


def _time(fn, *args) -> float:
    t0 = time.perf_counter()
    _block(fn(*args))
    return time.perf_counter() - t0


def _leaf_bytes(tree) -> int:
    return sum(int(a.nbytes) for a in jax.tree.leaves(tree) if hasattr(a, "nbytes"))


def build(name, x):
    xin = channels_first(x) if name == "equinox" else x
    apply, params = ANCHORS[name](xin)

    def out(p, x):
        return apply(p, x)[0]

    aval = jax.eval_shape(out, params, xin)  # Flax returns float32 for bfloat16 input
    dy = jnp.ones(aval.shape, aval.dtype)

    fwd = jax.jit(apply)
    fwd_bwd = jax.jit(lambda p, x, dy: jax.vjp(out, p, x)[1](dy))
    return dict(params=params, x=xin, dy=dy, fwd=fwd, fwd_bwd=fwd_bwd, out=out)


def measure_shape(label, shape, dtype, names, reps) -> dict:
    x = (jax.random.normal(jax.random.key(0), shape) * 2 + 3).astype(dtype)
    impls = {n: build(n, x) for n in names}
    row = {"shape": label, "bytes": int(x.nbytes), "impls": {}}
    floor = jax.jit(lambda x, a, b: x * a + b)
    a = jnp.ones(shape[-1], dtype)
    for n, im in impls.items():
        t0 = time.perf_counter()
        compiled = im["fwd_bwd"].lower(im["params"], im["x"], im["dy"]).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        _, vjp_fn = jax.vjp(jax.jit(im["out"]), im["params"], im["x"])
        row["impls"][n] = {"compile_s": compile_s,
                           "temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0) or 0),
                           "residual_bytes": _leaf_bytes(vjp_fn)}
        _block(im["fwd"](im["params"], im["x"]))
        _block(im["fwd_bwd"](im["params"], im["x"], im["dy"]))
    _block(floor(x, a, a))
    times = {n: {"fwd": [], "fwd_bwd": []} for n in names}
    floor_t = []
    for _ in range(reps):  # interleaved: every implementation once per repetition
        floor_t.append(_time(floor, x, a, a))
        for n, im in impls.items():
            times[n]["fwd"].append(_time(im["fwd"], im["params"], im["x"]))
            times[n]["fwd_bwd"].append(_time(im["fwd_bwd"], im["params"], im["x"], im["dy"]))
    ref = {k: np.asarray(times["flax"][k]) for k in ("fwd", "fwd_bwd")}
    for n in names:
        d = row["impls"][n]
        for k in ("fwd", "fwd_bwd"):
            t = np.asarray(times[n][k])
            d[f"{k}_ms"] = float(np.median(t) * 1e3)
            d[f"{k}_ratio_flax"] = float(np.median(t / ref[k]))  # paired per repetition
            d[f"{k}_ratio_floor"] = float(np.median(t / np.asarray(floor_t)))
    row["floor_ms"] = float(np.median(floor_t) * 1e3)
    return row


def collectives_under_pmap(names) -> dict:
    n_dev = min(8, jax.device_count())
    x = jax.random.normal(jax.random.key(0), (n_dev, 4, 4, 4, 8))
    out = {}
    for n in names:
        xin = jax.vmap(channels_first)(x) if n == "equinox" else x
        try:
            apply, params = ANCHORS[n](xin[0], axis_name="d")
        except Exception as e:  # noqa: BLE001 - report, don't hide
            out[n] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
            continue
        rep = jax.tree.map(lambda a: jnp.stack([a] * n_dev), params)

        def f_out(p, x, apply=apply):
            return apply(p, x)[0]

        fwd = jax.pmap(f_out, axis_name="d")
        fb = jax.pmap(lambda p, x, dy, f_out=f_out: jax.vjp(f_out, p, x)[1](dy), axis_name="d")
        try:
            c_f, c_fb = count_collectives(fwd, rep, xin), count_collectives(fb, rep, xin, xin)
            out[n] = {"fwd": list(c_f), "fwd_bwd": list(c_fb)}
        except Exception as e:  # noqa: BLE001 - report, don't hide
            out[n] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
    return out


def cnn_step_ratio(reps: int, batch: int = 32, size: int = 16) -> dict:
    import flax.linen as nn
    import optax

    import jaxbn.linen

    class Block(nn.Module):
        features: int
        norm: type

        @nn.compact
        def __call__(self, x, train):
            r = x
            x = nn.Conv(self.features, (3, 3), use_bias=False)(x)
            x = nn.relu(self.norm(use_running_average=not train)(x))
            x = nn.Conv(self.features, (3, 3), use_bias=False)(x)
            x = self.norm(use_running_average=not train)(x)
            return nn.relu(x + r)

    class ResNet(nn.Module):
        norm: type

        @nn.compact
        def __call__(self, x, train):
            x = nn.relu(self.norm(use_running_average=not train)(
                nn.Conv(32, (3, 3), use_bias=False)(x)))
            for _ in range(3):
                x = Block(32, self.norm)(x, train)
            return nn.Dense(10)(x.mean((1, 2)))

    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    y = jnp.arange(batch) % 10
    tx = optax.sgd(0.1, momentum=0.9)
    steps = {}
    for name, norm in (("flax", nn.BatchNorm), ("jaxbn", jaxbn.linen.BatchNorm)):
        model = ResNet(norm)
        v = model.init(jax.random.key(1), x, False)

        def step(params, stats, opt, model=model):
            def loss_fn(p):
                logits, upd = model.apply({"params": p, "batch_stats": stats}, x, True,
                                          mutable=["batch_stats"])
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd
            (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
            u, opt = tx.update(g, opt, params)
            return optax.apply_updates(params, u), upd["batch_stats"], opt, loss

        args = (v["params"], v["batch_stats"], tx.init(v["params"]))
        fn = jax.jit(step)
        _block(fn(*args))
        steps[name] = (fn, args)
    t = {n: [] for n in steps}
    for _ in range(reps):
        for n, (fn, args) in steps.items():
            t[n].append(_time(fn, *args))
    ratio = float(np.median(np.asarray(t["jaxbn"]) / np.asarray(t["flax"])))
    return {"ratio_jaxbn_to_flax": ratio, "flax_ms": float(np.median(t["flax"]) * 1e3),
            "jaxbn_ms": float(np.median(t["jaxbn"]) * 1e3), "batch": batch, "size": size}


def to_markdown(results: dict) -> str:
    lines = [f"Platform: {results['platform']}, jax {results['jax']}, "
             f"MALLOC_MMAP_THRESHOLD_={results['mmap_threshold']}, "
             f"{results['reps']} interleaved repetitions; ratios are medians of per-repetition "
             "ratios.", ""]
    for row in results["shapes"]:
        mb = row["bytes"] / 2**20
        lines += [f"### {row['shape']} (input {mb:.1f} MiB, floor x*a+b {row['floor_ms']:.2f} ms)",
                  "", "| impl | fwd / flax | fwd+bwd / flax | fwd+bwd ms | fwd+bwd / floor | "
                  "residuals / input | temp MiB | compile s |", "|---|---|---|---|---|---|---|---|"]
        for n, d in row["impls"].items():
            lines.append(
                f"| {n} | {d['fwd_ratio_flax']:.2f} | {d['fwd_bwd_ratio_flax']:.2f} | "
                f"{d['fwd_bwd_ms']:.2f} | {d['fwd_bwd_ratio_floor']:.1f} | "
                f"{d['residual_bytes'] / row['bytes']:.2f} | {d['temp_bytes'] / 2**20:.1f} | "
                f"{d['compile_s']:.2f} |")
        lines.append("")
    lines += ["### Collectives per layer under pmap (8 fake devices): traced / compiled", "",
              "Traced: collective primitives in the jaxpr. Compiled: collective instructions in "
              "the optimized HLO (XLA's combiner may merge independent all-reduces into one).",
              "", "| impl | forward | forward+backward |", "|---|---|---|"]
    for n, d in results["collectives"].items():
        if "error" in d:
            lines.append(f"| {n} | {d['error']} | |")
        else:
            lines.append(f"| {n} | {d['fwd'][0]} / {d['fwd'][1]} | "
                         f"{d['fwd_bwd'][0]} / {d['fwd_bwd'][1]} |")
    c = results.get("cnn")
    if c:
        lines += ["", f"### End-to-end ResNet-style CNN training step (batch {c['batch']}, "
                  f"{c['size']}x{c['size']}): jaxbn.linen / flax.linen = "
                  f"{c['ratio_jaxbn_to_flax']:.2f} ({c['jaxbn_ms']:.1f} ms vs "
                  f"{c['flax_ms']:.1f} ms)"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["shapes"]
    names = list(rows[0]["impls"])
    fig, ax = plt.subplots(figsize=(10, 4))
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar(np.arange(len(rows)) + i * w, [r["impls"][n]["fwd_bwd_ratio_flax"] for r in rows],
               w, label=n)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(rows)) + 0.4 - w / 2, [r["shape"] for r in rows], fontsize=8)
    ax.set_ylabel("forward+backward time / flax.linen")
    ax.set_yscale("log")
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--impls", default=",".join(ANCHORS))
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--no-cnn", action="store_true")
    p.add_argument("--no-fake-devices", action="store_true",
                   help="do not split the CPU into 8 devices (skips nothing on a GPU)")
    args = p.parse_args(argv)
    names = [n for n in args.impls.split(",") if n]
    if "flax" not in names:
        names.insert(0, "flax")
    reps = args.reps or (5 if args.quick else 15)
    shapes = QUICK if args.quick else SHAPES
    results = {"platform": jax.devices()[0].device_kind, "jax": jax.__version__, "reps": reps,
               "mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "unset"), "shapes": []}
    for label, shape, dtype in shapes:
        print(f"measuring {label} ...", flush=True)
        results["shapes"].append(measure_shape(label, shape, dtype, names, reps))
    results["collectives"] = collectives_under_pmap(names)
    if not args.no_cnn:
        results["cnn"] = cnn_step_ratio(reps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    md = to_markdown(results)
    (out / "results.md").write_text(md)
    plot(results, out / "ratios.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
