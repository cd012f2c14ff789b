"""BatchNorm layer in training mode: jaxbn against Flax (linen default and stable, nnx), Haiku,
Equinox and a plain two-pass jnp version, side by side in one process.

For each shape: time ratios to ``flax.linen.BatchNorm`` (default), forward and
forward+backward, as the median and 10-90% range of per-round ratios over interleaved rounds
(every variant timed once per round, in a rotated order); each time against the memory floor
(bytes that must move / the device's peak bandwidth: datasheet on a known GPU, a measured
streaming copy on a CPU); residual bytes kept for the backward (``jax.vjp``); temp bytes of
the compiled forward+backward (``memory_analysis``); compile time (trace, lower and compile
from empty caches) of the forward and of the forward+backward, as ratios to Flax over
interleaved rounds; and collectives per layer under ``pmap`` on 8 (fake, on a CPU) devices.
A run whose reference timings moved more than ``--noise-threshold`` is flagged NOISY in the
output.

  MALLOC_MMAP_THRESHOLD_=4000000000 python benchmarks/bench_bn.py --out benchmarks/results
  python benchmarks/bench_bn.py --quick          # tiny shapes; writes under out/ (gitignored)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

IMPLS = ("jaxbn", "flax", "flax_stable", "nnx", "haiku", "equinox", "two_pass")


def parser() -> argparse.ArgumentParser:
    """Command-line options (parsed before JAX starts: ``--fake-devices`` must act first)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes and few rounds (a smoke run of a few seconds)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds (default: 5 with --quick, else 11)")
    p.add_argument("--inner", type=int, default=2,
                   help="back-to-back runs per variant per round; the round keeps the best")
    p.add_argument("--compile-rounds", type=int, default=None,
                   help="interleaved rounds of compile timing, each from empty caches "
                        "(default: 2 with --quick, else 5)")
    p.add_argument("--shapes", default="",
                   help="measure only the shapes whose label contains one of these "
                        "comma-separated strings (e.g. 'bf16' or '256x14'); empty: all")
    p.add_argument("--impls", default=",".join(IMPLS),
                   help="comma-separated implementations to compare (flax is always added)")
    p.add_argument("--out", default=str(HERE.parent / "out" / "bench_bn"),
                   help="folder for results.json, results.md and ratios.png (created)")
    p.add_argument("--fake-devices", type=int, default=8,
                   help="split a CPU into this many devices for the collective count "
                        "(0 or 1: do not split; ignored on GPUs)")
    p.add_argument("--no-collectives", action="store_true",
                   help="skip the collectives-per-layer table")
    p.add_argument("--noise-threshold", type=float, default=0.25,
                   help="flag the run NOISY when flax's own 10-90%% time spread, relative to "
                        "its median, exceeds this")
    p.add_argument("--no-plot", action="store_true", help="do not draw ratios.png")
    return p


if __name__ == "__main__":
    ARGS = parser().parse_args()
    common.configure(ARGS.fake_devices)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from anchors import ANCHORS, channels_first  # noqa: E402

from jaxbn.counting import count_collectives  # noqa: E402

SHAPES = [
    # cache-resident (issue 20: the per-pass costs and the fixed costs show here)
    ("NHWC 64x16x16x64 f32", (64, 16, 16, 64), jnp.float32),
    ("2-D 2048x512 f32", (2048, 512), jnp.float32),
    ("NHWC 64x32x32x64 f32", (64, 32, 32, 64), jnp.float32),
    ("NHWC 256x14x14x256 f32", (256, 14, 14, 256), jnp.float32),
    ("2-D 4096x1024 f32", (4096, 1024), jnp.float32),
    ("NHWC 256x14x14x256 bf16", (256, 14, 14, 256), jnp.bfloat16),
    ("NHWC 64x32x32x64 bf16", (64, 32, 32, 64), jnp.bfloat16),
]
QUICK = [
    ("NHWC 8x8x8x16 f32", (8, 8, 8, 16), jnp.float32),
    ("NHWC 8x8x8x16 bf16", (8, 8, 8, 16), jnp.bfloat16),
]


def _leaf_bytes(tree) -> int:
    return sum(int(a.nbytes) for a in jax.tree.leaves(tree) if hasattr(a, "nbytes"))


def build(name: str, x) -> dict:
    """Jitted forward and forward+backward of one implementation, with its arguments."""
    xin = channels_first(x) if name == "equinox" else x
    apply, params = ANCHORS[name](xin)

    def out(p, x):
        return apply(p, x)[0]

    aval = jax.eval_shape(out, params, xin)  # Flax returns float32 for bfloat16 input
    dy = jnp.ones(aval.shape, aval.dtype)
    def fwd_bwd_fn(p, x, dy):
        return jax.vjp(out, p, x)[1](dy)

    return dict(params=params, x=xin, dy=dy, fwd=jax.jit(apply), fwd_bwd=jax.jit(fwd_bwd_fn),
                out=out, apply=apply, fwd_bwd_fn=fwd_bwd_fn)


def compile_seconds(im: dict, which: str) -> float:
    """Seconds to trace, lower and compile one implementation's forward (``"fwd"``) or
    forward+backward (``"fwd_bwd"``) from empty caches (``jax.clear_caches``): what a user
    waits for on a fresh start."""
    jax.clear_caches()
    t0 = time.perf_counter()
    if which == "fwd":
        jax.jit(im["apply"]).lower(im["params"], im["x"]).compile()
    else:
        jax.jit(im["fwd_bwd_fn"]).lower(im["params"], im["x"], im["dy"]).compile()
    return time.perf_counter() - t0


def compile_rounds(impls: dict, rounds: int) -> dict[str, dict[str, np.ndarray]]:
    """Compile times per implementation, ``rounds`` interleaved rounds (rotated order)."""
    names = list(impls)
    out: dict[str, dict[str, list[float]]] = {n: {"fwd": [], "fwd_bwd": []} for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            for which in ("fwd", "fwd_bwd"):
                out[n][which].append(compile_seconds(impls[n], which))
    return {n: {w: np.asarray(v) for w, v in d.items()} for n, d in out.items()}


def floor_bytes(x, dy) -> dict[str, int]:
    """Bytes no implementation can avoid moving: each input read once, each output written
    once (forward: x in, y out; forward+backward: x and dy in, dx out)."""
    return {"fwd": int(x.nbytes + dy.nbytes), "fwd_bwd": int(2 * x.nbytes + dy.nbytes)}


def measure_shape(label, shape, dtype, names, rounds, inner, bandwidth: dict,
                  c_rounds: int = 2) -> dict:
    """Static figures, then interleaved timing of every implementation on one shape. Where the
    bandwidth is measured (CPU), a streaming copy of ``x`` joins every round and the best copy
    of the whole run sets the floor (so a busy moment at the start does not lower it)."""
    x = (jax.random.normal(jax.random.key(0), shape) * 2 + 3).astype(dtype)
    impls = {n: build(n, x) for n in names}
    row: dict = {"shape": label, "bytes": int(x.nbytes), "impls": {}}
    copy = jax.jit(lambda x: x * 2)
    calls = {"copy": lambda: copy(x)}
    jax.block_until_ready(copy(x))
    for n, im in impls.items():
        compiled = im["fwd_bwd"].lower(im["params"], im["x"], im["dy"]).compile()
        mem = compiled.memory_analysis()
        _, vjp_fn = jax.vjp(jax.jit(im["out"]), im["params"], im["x"])
        fb = floor_bytes(im["x"], im["dy"])
        row["impls"][n] = {"temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0) or 0),
                           "residual_bytes": _leaf_bytes(vjp_fn), "floor_bytes": fb}
        jax.block_until_ready(im["fwd"](im["params"], im["x"]))
        jax.block_until_ready(im["fwd_bwd"](im["params"], im["x"], im["dy"]))
        calls[f"{n}:fwd"] = lambda im=im: im["fwd"](im["params"], im["x"])
        calls[f"{n}:fwd_bwd"] = lambda im=im: im["fwd_bwd"](im["params"], im["x"], im["dy"])
    times = common.interleaved(calls, rounds, inner)
    ctimes = compile_rounds(impls, c_rounds)  # after the timing: it empties JAX's caches
    if bandwidth["source"].startswith("measured"):
        bandwidth["bytes_per_s"] = max(bandwidth["bytes_per_s"],
                                       2 * x.nbytes / float(np.min(times["copy"])))
    row["flax_spread"] = {k: common.relative_spread(times[f"flax:{k}"])
                          for k in ("fwd", "fwd_bwd")}
    for n in names:
        d = row["impls"][n]
        for k in ("fwd", "fwd_bwd"):
            t = times[f"{n}:{k}"]
            d[f"{k}_ms"] = float(np.median(t) * 1e3)
            d[f"{k}_vs_flax"] = common.summarize(t, times[f"flax:{k}"])
            c = ctimes[n][k]
            d[f"compile_{k}_s"] = float(np.median(c))
            d[f"compile_{k}_vs_flax"] = common.summarize(c, ctimes["flax"][k])
        d["compile_s"] = d["compile_fwd_bwd_s"]
    return row


def collectives_under_pmap(names) -> dict:
    """Traced and compiled collectives of one layer's forward and forward+backward."""
    n_dev = min(8, jax.device_count())
    x = jax.random.normal(jax.random.key(0), (n_dev, 4, 4, 4, 8))
    out = {}
    for n in names:
        xin = jax.vmap(channels_first)(x) if n == "equinox" else x
        try:
            apply, params = ANCHORS[n](xin[0], axis_name="d")
            rep = jax.tree.map(lambda a: jnp.stack([a] * n_dev), params)

            def f_out(p, x, apply=apply):
                return apply(p, x)[0]

            fwd = jax.pmap(f_out, axis_name="d")
            fb = jax.pmap(lambda p, x, dy, f_out=f_out: jax.vjp(f_out, p, x)[1](dy),
                          axis_name="d")
            c_f, c_fb = count_collectives(fwd, rep, xin), count_collectives(fb, rep, xin, xin)
            out[n] = {"fwd": list(c_f), "fwd_bwd": list(c_fb)}
        except Exception as e:  # noqa: BLE001 - report, don't hide
            out[n] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
    return out


def to_markdown(res: dict) -> str:
    env, bw = res["env"], res["bandwidth"]
    lines = [f"Platform: {env['platform']} ({env['device_kind']}), {env['device_count']} "
             f"devices, jax {env['jax']}, MALLOC_MMAP_THRESHOLD_={env['mmap_threshold']}; "
             f"{res['rounds']} interleaved rounds x best of {res['inner']}. Ratios: median "
             "[10%-90%] of per-round ratios to flax.linen in the same round. Compile: trace, "
             "lower and compile from empty caches, "
             f"{res.get('compile_rounds', 1)} interleaved rounds, same statistics. Memory floor: "
             f"{bw['bytes_per_s'] / 1e9:.1f} GB/s ({bw['source']}).", ""]
    if res["noise"]:
        lines += [f"**{res['noise']}**", ""]
    for row in res["shapes"]:
        sp = row["flax_spread"]
        lines += [f"### {row['shape']} (input {row['bytes'] / 2**20:.1f} MiB; flax's own "
                  f"spread fwd {sp['fwd']:.0%}, fwd+bwd {sp['fwd_bwd']:.0%})", "",
                  "| impl | fwd / flax | fwd+bwd / flax | fwd+bwd ms | fwd+bwd / floor | "
                  "residuals / input | temp MiB | compile fwd / flax | compile fwd+bwd / flax | "
                  "compile fwd+bwd s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for n, d in row["impls"].items():
            lines.append(
                f"| {n} | {common.fmt(d['fwd_vs_flax'])} | {common.fmt(d['fwd_bwd_vs_flax'])} | "
                f"{d['fwd_bwd_ms']:.2f} | {d['fwd_bwd_vs_floor']:.1f} | "
                f"{d['residual_bytes'] / row['bytes']:.2f} | {d['temp_bytes'] / 2**20:.1f} | "
                f"{common.fmt(d['compile_fwd_vs_flax'])} | "
                f"{common.fmt(d['compile_fwd_bwd_vs_flax'])} | {d['compile_fwd_bwd_s']:.2f} |")
        lines.append("")
    if res.get("collectives"):
        lines += [f"### Collectives per layer under pmap ({res['collectives_devices']} devices): "
                  "traced / compiled", "",
                  "Traced: collective primitives in the jaxpr. Compiled: collective instructions "
                  "in the optimized HLO (XLA's combiner may merge independent all-reduces).",
                  "", "| impl | forward | forward+backward |", "|---|---|---|"]
        for n, d in res["collectives"].items():
            if "error" in d:
                lines.append(f"| {n} | {d['error']} | |")
            else:
                lines.append(f"| {n} | {d['fwd'][0]} / {d['fwd'][1]} | "
                             f"{d['fwd_bwd'][0]} / {d['fwd_bwd'][1]} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    """Forward+backward ratio to flax.linen per shape, with the 10-90% range as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["shapes"]
    names = list(rows[0]["impls"])
    fig, ax = plt.subplots(figsize=(max(10, 1.6 * len(rows)), 4.5))
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        s = [r["impls"][n]["fwd_bwd_vs_flax"] for r in rows]
        med = np.array([v["median"] for v in s])
        err = np.array([[m - v["p10"] for m, v in zip(med, s, strict=True)],
                        [v["p90"] - m for m, v in zip(med, s, strict=True)]])
        ax.bar(np.arange(len(rows)) + i * w, med, w, yerr=err, capsize=2, label=n)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(rows)) + 0.4 - w / 2, [r["shape"] for r in rows], fontsize=8,
                  rotation=15, ha="right")
    ax.set_ylabel("forward+backward time / flax.linen")
    ax.set_yscale("log")
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    """Measures everything ``args`` asks for and writes it under ``args.out``."""
    names = [n for n in args.impls.split(",") if n]
    if "flax" not in names:
        names.insert(0, "flax")
    rounds = args.rounds or (5 if args.quick else 11)
    c_rounds = args.compile_rounds or (2 if args.quick else 5)
    res: dict = {"env": common.environment(), "bandwidth": common.peak_bandwidth(
        mib=16 if args.quick else 256), "rounds": rounds, "inner": args.inner,
        "compile_rounds": c_rounds, "shapes": []}
    wanted = [w for w in args.shapes.split(",") if w]
    for label, shape, dtype in QUICK if args.quick else SHAPES:
        if wanted and not any(w in label for w in wanted):
            continue
        print(f"measuring {label} ...", flush=True)
        res["shapes"].append(measure_shape(label, shape, dtype, names, rounds, args.inner,
                                           res["bandwidth"], c_rounds))
    if res["bandwidth"]["source"].startswith("measured"):
        res["bandwidth"]["source"] += ("; and the best streaming copy of each shape's input, "
                                       "timed in every round")
    for row in res["shapes"]:  # against the final (highest) bandwidth
        for d in row["impls"].values():
            for k in ("fwd", "fwd_bwd"):
                d[f"{k}_vs_floor"] = (d[f"{k}_ms"] * 1e-3 * res["bandwidth"]["bytes_per_s"] /
                                      d["floor_bytes"][k])
    spreads = {f"{r['shape']} {k}": v for r in res["shapes"] for k, v in r["flax_spread"].items()}
    res["noise"] = common.noise_verdict(spreads, args.noise_threshold)
    if not args.no_collectives:
        res["collectives_devices"] = min(8, jax.device_count())
        res["collectives"] = collectives_under_pmap(names)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    md = to_markdown(res)
    (out / "results.md").write_text(md)
    if not args.no_plot:
        plot(res, out / "ratios.png")
    print(md)
    print(f"written to {out}")
    return res


if __name__ == "__main__":
    run(ARGS)
