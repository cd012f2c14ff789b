"""Training-mode results are a function of the batch alone: any running state, any device count.

``python -m tests.any_state MODE [MODE ...]`` runs the matrix for the named modes in a process
with 32 fake CPU devices and prints one JSON line: the failures found (empty when all pass).
``tests/test_any_state.py`` runs it; it is a module of its own because the device count must be
set before JAX starts and the test session has 8.

For each mode (how the devices are bound), device count ``D`` and momentum, one compiled
function takes the running state as an argument, and every state below goes through it:

- fresh (``bn_init``), trained (means near the data), NaN, inf, far (1e12) and overflowing
  (1e30) running means, and, where each device holds its own state, a different state on
  every device (``1e4 + i / D`` on device ``i``, and a spread of 100).

The reference is float64 NumPy of the concatenated batch: ``y`` and the batch statistics (read
from the new state with ``momentum=0``), and the new state from the update rule. Tolerances
are error bounds: ``(N + 8)`` units of roundoff of the magnitudes involved, ``N`` the number
of values per feature (the corrected two-pass sums are within ``N u`` of their magnitudes).
"""

from __future__ import annotations

import functools
import json
import os
import sys

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=32").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxbn  # noqa: E402

F = 3  # features
ROWS = 2  # rows per device
EPS = 1e-5
U = float(np.finfo(np.float32).eps) / 2
DEVICE_COUNTS = (1, 2, 8, 9, 16, 32)
MOMENTA = (0.0, 0.9, 1.0, None)
MODES = ("vmap", "vmap_in_mesh", "pmap", "shard_map_vma", "shard_map_novma", "jit_auto",
         "jit_explicit")
# the modes in which each device holds its own state
PER_DEVICE = ("vmap", "vmap_in_mesh", "pmap", "shard_map_vma", "shard_map_novma")


def batch(d: int, seed: int = 0, masked: bool = False):
    """``(x, mask)``: ``(d, ROWS, F)`` float32 at 1e4 + N(0, 1) with per-device offsets; with
    ``masked``, a row mask where device 0 has no valid row (when d > 1) and one feature of
    device d-1 is padding everywhere (NaN)."""
    rng = np.random.default_rng(seed + 7 * d)
    x = 1e4 + rng.normal(size=(d, ROWS, F)) + rng.normal(size=(d, 1, F))
    mask = None
    if masked:
        mask = rng.random((d, ROWS, F)) < 0.7
        mask[:, 0, :] = True  # at least one valid row per device...
        if d > 1:
            mask[0] = False  # ...but device 0 has none
        x = np.where(mask, x, np.nan)  # padding holds anything
    return x.astype(np.float32), mask


def states(d: int, per_device: bool, count: int = 5):
    """Named running states; per-device ones have a leading axis of size ``d``."""
    rng = np.random.default_rng(100 + d)
    shape = (d, F) if per_device else (F,)

    def st(mean, var=1.0):
        return {"mean": np.broadcast_to(np.float32(mean), shape).astype(np.float32),
                "var": np.broadcast_to(np.float32(var), shape).astype(np.float32),
                "count": np.broadcast_to(np.int32(count), shape[:-1]).astype(np.int32)}

    out = {"fresh": dict(st(0.0), count=np.zeros(shape[:-1], np.int32)),
           "trained": st(1e4 + rng.normal(size=F), 1.3),  # the same on every device
           "nan": st(np.nan, np.nan), "inf": st(np.inf, np.inf),
           "far": st(1e12), "huge": st(1e30, 1e30)}
    if per_device:
        i = np.arange(d, dtype=np.float64)[:, None]
        out["differ"] = st(1e4 + i / d)
        out["spread"] = st(1e4 + 100.0 * rng.normal(size=(d, F)))
    return out


def reference(x, mask):
    """float64 (mean, biased var, count) per feature over every device's valid values."""
    x64 = x.astype(np.float64).reshape(-1, F)
    w = np.ones_like(x64) if mask is None else mask.reshape(-1, F).astype(np.float64)
    x64 = np.where(w > 0, x64, 0.0)
    n = w.sum(0)
    mean = (w * x64).sum(0) / np.maximum(n, 1)
    var = (w * (x64 - mean) ** 2).sum(0) / np.maximum(n, 1)
    return mean, var, n


def update_rule(old, batch_value, momentum, count):
    """The running update in float64: Flax's EMA (momentum 0 takes the batch, 1 keeps the old
    value), or the cumulative average of ``count`` earlier updates (``momentum=None``)."""
    old = np.asarray(old, np.float64)
    if momentum is None:  # (inf - inf = NaN for an infinite state, as in float32)
        return old + (batch_value - old) / (np.asarray(count, np.float64)[..., None] + 1)
    if momentum == 0.0:
        return np.broadcast_to(batch_value, old.shape)
    if momentum == 1.0:
        return old
    return momentum * old + (1 - momentum) * batch_value


def run(mode: str, d: int, momentum, masked: bool = False, groups: int | None = None):
    """Returns a function ``state -> (y, new_state)`` for this mode over ``d`` devices."""
    x, mask = batch(d, masked=masked)
    params = {"scale": np.linspace(0.5, 2.0, F).astype(np.float32),
              "bias": np.linspace(-1.0, 1.0, F).astype(np.float32)}
    group_list = None if groups is None else [list(range(g * d // groups, (g + 1) * d // groups))
                                              for g in range(groups)]
    kw = dict(momentum=momentum, epsilon=EPS, axis_index_groups=group_list)

    def local(state, xb, mb):  # one device's block: (ROWS, F)
        return jaxbn.bn_apply(params, state, xb, True, axis_name="d", mask=mb, **kw)

    args = (x,) if mask is None else (x, mask)
    if mode == "vmap":
        f = jax.jit(jax.vmap(lambda s, xb, mb=None: local(s, xb, mb), axis_name="d"))
        return lambda s: f(s, *args), x, mask
    if mode == "vmap_in_mesh":  # inside jax.set_mesh(<Explicit mesh>), the batch not sharded
        f = jax.jit(jax.vmap(lambda s, xb, mb=None: local(s, xb, mb), axis_name="d"))
        mesh = jax.make_mesh((4,), ("m",), axis_types=(jax.sharding.AxisType.Explicit,))

        def in_mesh(s):
            with jax.set_mesh(mesh):
                return f(s, *args)
        return in_mesh, x, mask
    if mode == "pmap":
        f = jax.pmap(lambda s, xb, mb=None: local(s, xb, mb), axis_name="d",
                     devices=jax.devices()[:d])
        return lambda s: f(s, *args), x, mask
    devices = np.array(jax.devices()[:d])
    if mode.startswith("shard_map"):
        mesh = jax.sharding.Mesh(devices, ("d",), axis_types=(jax.sharding.AxisType.Explicit,))

        def body(s, xb, mb=None):
            s = jax.tree.map(lambda v: v[0], s)
            y, new = local(s, xb[0], None if mb is None else mb[0])
            return y[None], jax.tree.map(lambda v: v[None], new)

        specs = (P("d"),) * (1 + len(args))
        f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P("d"),
                                  check_vma=mode == "shard_map_vma"))
        put = functools.partial(jax.device_put, device=NamedSharding(mesh, P("d")))

        def call(s):
            with jax.set_mesh(mesh):
                return f(jax.tree.map(put, s), *map(put, args))
        return call, x, mask
    kind = jax.sharding.AxisType.Auto if mode == "jit_auto" else jax.sharding.AxisType.Explicit
    mesh = jax.sharding.Mesh(devices, ("d",), axis_types=(kind,))
    flat_x = x.reshape(-1, F)
    flat_m = None if mask is None else mask.reshape(-1, F)
    kw.pop("axis_index_groups")

    def whole(s, xx, mm=None):
        return jaxbn.bn_apply(params, s, xx, True, mask=mm, **kw)

    f = jax.jit(whole)
    put = functools.partial(jax.device_put, device=NamedSharding(mesh, P("d")))
    flat = (flat_x,) if flat_m is None else (flat_x, flat_m)

    def call(s):
        with jax.set_mesh(mesh):
            return f(s, *map(put, flat))
    return call, x, mask


def check(mode: str, d: int, momentum, masked: bool = False, groups: int | None = None):
    """Every state through one compiled function; returns a list of failure descriptions."""
    per_device = mode in PER_DEVICE
    call, x, mask = run(mode, d, momentum, masked, groups)
    scale = np.linspace(0.5, 2.0, F)
    bias = np.linspace(-1.0, 1.0, F)
    # the statistics each device's batch is normalized with: its group's
    parts = [(x, mask)] if groups is None else [
        (x[g * d // groups:(g + 1) * d // groups],
         None if mask is None else mask[g * d // groups:(g + 1) * d // groups])
        for g in range(groups)]
    failures = []
    for name, st in states(d, per_device).items():
        try:
            y, new = call(st)
        except Exception as err:  # a crash is a failure of the property
            failures.append(f"{mode} D={d} m={momentum} masked={masked} groups={groups} "
                            f"state={name}: {type(err).__name__}: {str(err)[:300]}")
            continue
        y = np.asarray(y, np.float64).reshape(x.shape)
        new_mean = np.asarray(new["mean"], np.float64)
        new_var = np.asarray(new["var"], np.float64)
        for g, (xg, mg) in enumerate(parts):
            mean, var, n = reference(xg, mg)
            rows = slice(g * xg.shape[0], (g + 1) * xg.shape[0])
            y_ref = scale * (xg.astype(np.float64) - mean) / np.sqrt(var + EPS) + bias
            n_tot = int(n.max())
            valid = np.ones(xg.shape, bool) if mg is None else mg
            y_ref = np.where(valid, y_ref, 0.0)  # padding: any output
            bound = (n_tot + 8) * U * (np.abs(y_ref) + 2 * scale + np.abs(bias))
            err = np.where(valid, np.abs(y[rows] - y_ref), 0.0)
            if not np.all(err <= bound):
                failures.append(f"{mode} D={d} m={momentum} masked={masked} groups={groups} "
                                f"state={name}: y off by {np.max(err):.3g} "
                                f"(bound {bound.max():.3g})")
                continue
            old = st["mean"][rows] if per_device else st["mean"]
            old_v = st["var"][rows] if per_device else st["var"]
            counts = st["count"][rows] if per_device else st["count"]
            has = n > 0
            for key, o, b, spread in (("mean", old, mean, np.sqrt(var)),
                                      ("var", old_v, var, var)):
                want = update_rule(o, b, momentum, counts)
                want = np.where(has, want, np.asarray(o, np.float64))  # empty: unchanged
                got = new_mean[rows] if key == "mean" else new_var[rows]
                if not per_device:
                    got = new_mean if key == "mean" else new_var
                o64 = np.asarray(o, np.float64)
                mag = np.where(np.isfinite(o64), np.abs(o64), 0.0) + np.abs(b)
                tol = (n_tot + 8) * U * (mag + spread) + 4 * U * np.abs(want)
                both_nan = np.isnan(got) & np.isnan(want)
                same_inf = np.isinf(got) & (got == want)
                ok = both_nan | same_inf | (np.abs(got - want) <= tol)
                if not np.all(ok):
                    failures.append(f"{mode} D={d} m={momentum} masked={masked} "
                                    f"groups={groups} state={name}: new {key} off by "
                                    f"{np.nanmax(np.abs(got - want)):.3g}")
    return failures


def main(modes):
    failures = []
    for mode in modes:
        for d in DEVICE_COUNTS:
            for momentum in MOMENTA:
                failures += check(mode, d, momentum)
            failures += check(mode, d, 0.9, masked=True)
            if d % 2 == 0 and mode in ("pmap", "shard_map_novma"):
                failures += check(mode, d, 0.9, groups=2)
    return failures


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:] or MODES)))
