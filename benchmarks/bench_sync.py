"""Synchronized statistics on fake CPU devices: precision, collectives, payload bytes, time.

Compares the two ways :mod:`jaxbn._src.combine` combines per-device moments (``bn_apply``'s
``sync_method``): ``gather`` (one all-gather of every device's two-float moments) and
``reduce`` (two O(F) all-reduces: a provisional mean, then the sums about it). Prints three
tables and writes them as JSON:

1. median relative error of the variance against float64, 8 devices x 32 rows, next to one
   device holding all 256 rows;
2. the collectives XLA compiled for one BatchNorm layer (forward, forward+backward) and the
   bytes each device receives from them, at several device counts;
3. the time of one synchronized layer forward+backward under ``shard_map``, per-round ratios
   to ``gather`` over interleaved rounds (median and 10-90% range).

Run from the repository root::

  python benchmarks/bench_sync.py            # --rounds 30, writes out/bench_sync.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402

METHODS = ("gather", "reduce")
CASES = {"1e4+N(0,1), offset per device": (1e4, 1.0, 1.0), "1e4+N(0,1)": (1e4, 1.0, 0.0),
         "1e3+0.01N(0,1)": (1e3, 0.01, 0.0), "1e4+0.01N(0,1)": (1e4, 0.01, 0.0)}


def _data(case, devices, n, f, seed=0):
    import numpy as np

    offset, spread, per_device = CASES[case]
    rng = np.random.default_rng(seed)
    x = offset + spread * (rng.normal(size=(devices, n, f))
                           + per_device * rng.normal(size=(devices, 1, f)))
    return x.astype(np.float32)


def precision(devices: int = 8, n: int = 32, f: int = 256) -> dict:
    import jax
    import numpy as np

    from jaxbn._src import combine, moments
    from jaxbn._src.layout import make_layout

    def synced(x, method):
        def body(x):
            m = moments.local_moments(x, None, make_layout(x.shape, -1))
            g = combine.combine_across(m, "d", None, method)
            return moments.safe_div(g.m2, g.count)
        return jax.pmap(body, axis_name="d")(x)[0].ravel()

    rows = {}
    for case in CASES:
        x = _data(case, devices, n, f, seed=1)
        flat = x.reshape(-1, f).astype(np.float64)
        ref = flat.var(0)

        def err(v, ref=ref):
            return float(np.median(np.abs(np.asarray(v, np.float64) - ref) / ref))

        one = jax.jit(lambda x: moments.finalize(
            moments.local_moments(x, None, make_layout(x.shape, -1)))[1])
        row = {"one device": err(one(x.reshape(-1, f)).ravel())}
        for method in METHODS:
            row[method] = err(synced(x, method))
        rows[case] = row
    return rows


def collectives(f: int = 1024, device_counts=(2, 4, 8)) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxbn
    from tests.test_combine import hlo_collectives

    out = {}
    for method in METHODS:
        for d in device_counts:
            params, state = jaxbn.bn_init(f)
            x = jnp.asarray(_data("1e4+N(0,1)", d, 4, f))

            def fwd(x, params=params, state=state, method=method):
                return jaxbn.bn_apply(params, state, x, True, axis_name="d",
                                      sync_method=method)[0]

            def fwd_bwd(x, fwd=fwd):
                return jax.grad(lambda x: jnp.sum(fwd(x) * x))(x)

            row = {}
            for name, fn in (("forward", fwd), ("forward+backward", fwd_bwd)):
                pm = jax.pmap(fn, axis_name="d", devices=jax.devices()[:d])
                ops = hlo_collectives(pm.lower(x).compile().as_text())
                row[name] = {
                    "collectives": len([o for o in ops if not o[2]]),
                    "in a conditional": len([o for o in ops if o[2]]),
                    "bytes": int(np.sum([o[1] for o in ops if not o[2]])),
                    "conditional bytes": int(np.sum([o[1] for o in ops if o[2]])),
                    "ops": [list(o) for o in ops]}
            out[f"{method}, D={d}"] = row
    return out


def timing(rounds: int, shapes) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxbn

    mesh = jax.make_mesh((8,), ("d",))
    results = {}
    for shape in shapes:
        f = shape[-1]
        params, state = jaxbn.bn_init(f)
        rng = np.random.default_rng(0)
        variants = {}
        for label, offset in (("", 0.0), (" (offset 1e4)", 1e4)):
            x = jnp.asarray(offset + rng.normal(size=(8 * shape[0],) + shape[1:]), jnp.float32)
            dy = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
            xs, dys = (jax.device_put(a, NamedSharding(mesh, P("d"))) for a in (x, dy))

            for method in METHODS:
                def step(p, x, dy, state=state, method=method):
                    def loss(p, x):
                        y, _ = jaxbn.bn_apply(p, state, x, True, axis_name="d",
                                              sync_method=method)
                        return jnp.sum(y * dy)
                    return jax.grad(loss, argnums=(0, 1))(p, x)

                fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("d"), P("d")),
                                           out_specs=(P(), P("d"))))
                with jax.set_mesh(mesh):
                    compiled = fn.lower(params, xs, dys).compile()
                variants[method + label] = (lambda c=compiled, a=(params, xs, dys): c(*a))
        for call in variants.values():  # warm up
            jax.block_until_ready(call())
        t = common.interleaved(variants, rounds, inner=3)
        ref = t["gather"]
        results[str(shape)] = {
            "gather ms": float(np.median(ref) * 1e3),
            "gather spread": common.relative_spread(ref),
            "ratios to gather": {k: common.summarize(v, ref) for k, v in t.items()
                                 if k != "gather"}}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="few rounds, one shape")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_sync.json"))
    args = ap.parse_args()
    common.configure(8)
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    shapes = [(32, 1024)] if args.quick else [(32, 1024), (8, 16, 16, 64)]
    rounds = 5 if args.quick else args.rounds
    res = {"environment": common.environment(), "precision": precision(),
           "collectives": collectives(), "timing": timing(rounds, shapes)}

    print("median relative variance error, 8 devices x 32 rows, F = 256")
    for case, row in res["precision"].items():
        print(f"  {case:32s} " + "  ".join(f"{k}: {v:.1e}" for k, v in row.items()))
    print("compiled collectives per layer (unconditional + in a conditional), bytes/device")
    for key, row in res["collectives"].items():
        print(f"  {key:18s} " + "  ".join(
            f"{n}: {r['collectives']}+{r['in a conditional']} ({r['bytes']} B"
            f" + {r['conditional bytes']} B)" for n, r in row.items()))
    print(f"layer forward+backward on 8 fake devices, ratio to gather ({rounds} rounds)")
    for shape, row in res["timing"].items():
        print(f"  {shape}: gather {row['gather ms']:.3f} ms (spread {row['gather spread']:.0%})  "
              + "  ".join(f"{k}: {common.fmt(s)}" for k, s in row["ratios to gather"].items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
