"""The transformation matrix (issue 11): sync mode x transform x option, float64 reference.

Every case builds one per-device function from ``jaxbn.bn_apply``, lifts it to a function of
the global batch with the sync mode (vmap, pmap, shard_map, jit over a sharded batch...), applies
the transform to that global function, and compares with the same transform applied to the
float64 plain-``jnp`` reference (``tests/reference_jnp.py``) on the whole (global) batch. The
2-D mesh reduced over one of its axes has per-group statistics: its reference runs on each
half of the batch. In the Explicit-mesh modes, ``y`` and the gradient/tangent with respect to
``x`` must also keep the input's sharding.

Transforms: ``forward`` (y and new state), ``grad`` (wrt x, scale, bias), ``jvp`` (wrt x and
params), ``gradgrad`` (reverse-over-reverse: the gradient of a linear function of the
gradient), ``hvp`` (forward-over-reverse Hessian-vector product, as ``jax.hessian`` does),
``remat`` (``jax.checkpoint`` around the layer, forward and gradient) and ``scan`` (``lax.scan``
over three layers with stacked params and states, forward and gradient).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from tests import reference as bounds_ref
from tests import reference_jnp as ref

D, R, F, L = 8, 4, 4, 3  # devices, rows per device, features, layers (scan)
N = D * R
MOMENTUM = 0.9
RENORM = (1.5, 0.5)
TRANSFORMS = ("forward", "grad", "jvp", "gradgrad", "hvp", "remat", "scan")
OPTIONS = ("plain", "mask", "momentum_none", "renorm", "ghost", "precise")
# First-order transforms of one layer are checked against a computed error bound: the running
# error analysis of the float64 reference's own program run in float32 (reference_jnp.
# rounding_bound: a textbook two-pass BatchNorm and JAX's derivatives of it, any summation
# order), times ALGORITHM_FACTOR for what jaxbn computes differently (moments pooled across
# devices by Chan's rule, closed-form derivative rules). jaxbn's errors reach at most 0.16 of
# it over the matrix (also with its sums reversed); it is at most ~2.5e-3 (1 + |value|) (ghost
# batches of two rows' gradients), far below what a wrong synchronization, count, cotangent or
# Bessel factor does (1e-2 and more: an unbiased-variance bug fails every option).
ALGORITHM_FACTOR = 2.0
# The second-order transforms and the 3-layer scan carry that analysis through programs where
# it compounds absolute values along every path (5-500x these tolerances for second order,
# 1e-1 relative for the scan's gradient), which would no longer catch a wrong rule. They keep
# fixed tolerances, at least 13x the errors seen (also with jaxbn's sums reversed), but NOT
# derived from a bound: a CPU that rounds very differently could in principle exceed them.
TOL = {"gradgrad": 1e-3, "hvp": 1e-3, "scan": 1e-4}
BOUNDED = ("forward", "grad", "jvp", "remat")

# ---------------------------------------------------------------------------------------------
# Data: one global batch (N, F) and everything a transform needs, as float32 NumPy.

_rng = np.random.default_rng(11)
X = (_rng.normal(size=(N, F)) * [1.0, 2.0, 0.5, 3.0] + [0.0, 5.0, -2.0, 1.0]).astype(np.float32)
MASK = _rng.random((N, 1)) < 0.6
MASK[2 * R:3 * R] = False  # an empty device
MASK[5 * R:6 * R] = True
MASK[0] = MASK[R + 1] = True  # every 2-D group and every device half keeps something
W, V, TX = (_rng.normal(size=(N, F)).astype(np.float32) for _ in range(3))


def _params_like(scale_lo=0.5):
    return {"scale": _rng.uniform(scale_lo, 2.0, F).astype(np.float32),
            "bias": _rng.normal(size=F).astype(np.float32)}


PARAMS, TP, VP = _params_like(), _params_like(-1.0), _params_like(-1.0)
_STATE = {"mean": _rng.normal(size=F).astype(np.float32),
          "var": _rng.uniform(0.5, 2.0, F).astype(np.float32), "count": np.int32(5)}
# Renorm: running statistics chosen so r and d are clipped on some features and not others.
_RENORM_STATE = {"mean": np.array([0.1, 3.0, -2.0, 1.0], np.float32),
                 "var": np.array([1.0, 1.0, 0.01, 9.0], np.float32), "count": np.int32(5)}
# Precise statistics: a state that has already seen 6 examples of other data.
_PRIOR = _rng.normal(size=(6, F)) * 2 + 1
_PRECISE_STATE = {"mean": _PRIOR.mean(0).astype(np.float32),
                  "var": _PRIOR.var(0).astype(np.float32),
                  "seen": np.full(F, 6.0, np.float32), "count": np.int32(1)}


def _option(name: str, ghost: int) -> tuple[dict, dict, np.ndarray | None]:
    """``(bn_apply keyword arguments, state, mask)`` of an option."""
    kw: dict[str, Any] = {"momentum": MOMENTUM}
    state, mask = _STATE, None
    if name == "mask":
        mask = MASK
    elif name == "momentum_none":
        kw["momentum"] = None
        state = dict(_STATE, count=np.int32(3))
    elif name == "renorm":
        kw["renorm"] = RENORM
        state = _RENORM_STATE
    elif name == "ghost":
        kw["virtual_batch_size"] = ghost
    elif name == "precise":
        state = _PRECISE_STATE
    return kw, state, mask


def _stacked(tree, vary: bool = False):
    """Stacks ``L`` copies, one per layer (``vary``: layer i is scaled by ``1 + i / 10``)."""
    return jax.tree.map(lambda a: np.stack([a * (1 + 0.1 * i) if vary else a
                                            for i in range(L)]), tree)


# ---------------------------------------------------------------------------------------------
# Per-device bodies: (params, state, x, mask) -> (y, new_state).


def _body(bn: Callable, transform: str) -> Callable:
    """The layer (or layers) a transform runs, from ``bn(p, s, x, m) -> (y, s')``."""
    if transform == "remat":
        return jax.checkpoint(bn)
    if transform == "scan":
        def layers(p, s, x, m):
            def step(h, ps):
                y, ns = bn(ps[0], ps[1], h, m)
                return jnp.tanh(y), ns
            return lax.scan(step, x, (p, s))
        return layers
    return bn


def _jaxbn_layer(kw: dict, axis_name) -> Callable:
    def bn(p, s, x, m):
        return jaxbn.bn_apply(p, s, x, True, axis_name=axis_name, mask=m, **kw)
    return bn


def _ref_layer(kw: dict) -> Callable:
    def bn(p, s, x, m):
        return ref.bn_train(p, s, x, mask=m, **kw)
    return bn


def _ref_global(body: Callable, groups: int) -> Callable:
    """Reference over the global batch; ``groups`` blocks of rows have their own statistics."""
    def g(p, s, x, m):
        xs = jnp.split(x, groups)
        ms = [None] * groups if m is None else jnp.split(m, groups)
        outs = [body(p, s, xb, mb) for xb, mb in zip(xs, ms, strict=True)]
        y = jnp.concatenate([o[0] for o in outs])
        return y, jax.tree.map(lambda *a: jnp.stack(a), *[o[1] for o in outs])
    return g


# ---------------------------------------------------------------------------------------------
# Transforms of a global function gfn(p, s, x, m) -> (y, state copies).


def _loss(gfn, s, m, w):
    def loss(p, x):
        y, s2 = gfn(p, s, x, m)
        return jnp.sum(y * w), (y, s2)
    return loss


def _vdot(dp, dx, vp, v):
    return jnp.sum(dx * v) + sum(jnp.sum(dp[k] * vp[k]) for k in dp)


def apply_transform(transform: str, gfn: Callable, p, s, x, m, c: dict) -> dict:
    """Runs one transform; ``c`` holds the cotangent ``w``, tangents ``tp, tx``, ``vp, v``."""
    loss = _loss(gfn, s, m, c["w"])
    if transform == "forward":
        y, s2 = gfn(p, s, x, m)
        return {"y": y, "state": s2}
    if transform == "grad":
        dp, dx = jax.grad(lambda p, x: loss(p, x)[0], (0, 1))(p, x)
        return {"dp": dp, "dx": dx}
    if transform in ("remat", "scan"):
        (_, (y, s2)), (dp, dx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(p, x)
        return {"y": y, "state": s2, "dp": dp, "dx": dx}
    if transform == "jvp":
        (y, s2), (dy, ds) = jax.jvp(lambda p, x: gfn(p, s, x, m), (p, x), (c["tp"], c["tx"]))
        return {"y": y, "dy": dy, "dstate": {k: ds[k] for k in ("mean", "var")}}
    grad = jax.grad(lambda p, x: loss(p, x)[0], (0, 1))
    if transform == "gradgrad":
        dp, dx = jax.grad(lambda p, x: _vdot(*grad(p, x), c["vp"], c["v"]), (0, 1))(p, x)
        return {"dp": dp, "dx": dx}
    if transform == "hvp":
        _, (dp, dx) = jax.jvp(grad, (p, x), (c["tp"], c["tx"]))
        return {"dp": dp, "dx": dx}
    raise ValueError(transform)


# ---------------------------------------------------------------------------------------------
# Sync modes.


@functools.cache
def _mesh(shape: tuple[int, ...], names: tuple[str, ...], auto: bool = False):
    types = {"axis_types": (AxisType.Auto,) * len(shape)} if auto else {}
    return jax.make_mesh(shape, names, **types)


def _copies(s):
    return jax.tree.map(lambda a: a[None], s)


@dataclasses.dataclass(frozen=True)
class Mode:
    """How a per-device body becomes a function of the global batch."""

    name: str
    axis_name: Any = None  # what bn_apply synchronizes over
    groups: int = 1  # blocks of the global batch with their own statistics
    ghost: int = 8  # virtual_batch_size (per-device modes: 2, inside the 4 local rows)
    split: bool = False  # (N, ...) -> (D, R, ...) for vmap/pmap
    mesh: tuple | None = None  # (shape, names, auto)
    xspec: Any = None  # sharding of x (and of the batch axis of the mask)
    explicit: bool = False  # jax.set_mesh and sharding checks
    kind: str = "jit"  # jit | vmap | pmap | shard_map
    smap: tuple | None = None  # shard_map: (in spec of x, out spec of state copies, axis_names)

    def get_mesh(self):
        return None if self.mesh is None else _mesh(*self.mesh)

    def put(self, a, features: bool = True):
        if a is None:
            return None
        if self.split:
            a = a.reshape((D, R) + a.shape[1:])
        if self.xspec is None:
            return jnp.asarray(a)
        spec = self.xspec if features else P(*tuple(self.xspec)[:1])
        return jax.device_put(a, NamedSharding(self.get_mesh(), spec))

    def context(self):
        return jax.set_mesh(self.get_mesh()) if self.explicit else contextlib.nullcontext()

    def wrap(self, body: Callable) -> Callable:
        if self.kind == "jit":
            return lambda p, s, x, m: (lambda y, s2: (y, _copies(s2)))(*body(p, s, x, m))
        if self.kind == "vmap":
            return jax.vmap(body, in_axes=(None, None, 0, 0), axis_name=self.axis_name)
        if self.kind == "pmap":
            return jax.pmap(body, axis_name=self.axis_name, in_axes=(None, None, 0, 0))
        xin, sout, names = self.smap
        kw = {} if names is None else {"axis_names": names}
        bspec = P(*tuple(xin)[:1])
        return jax.shard_map(lambda p, s, x, m: (lambda y, s2: (y, _copies(s2)))(
            *body(p, s, x, m)), mesh=self.get_mesh(), in_specs=(P(), P(), xin, bspec),
            out_specs=(xin, sout), **kw)


MODES = {m.name: m for m in [
    Mode("none"),
    Mode("vmap", axis_name="d", ghost=2, split=True, kind="vmap"),
    Mode("vmap_explicit", axis_name="d", ghost=2, split=True, kind="vmap",
         mesh=((D,), ("d",)), xspec=P("d"), explicit=True),
    Mode("pmap", axis_name="d", ghost=2, split=True, kind="pmap"),
    Mode("shard_map_explicit", axis_name="d", ghost=2, kind="shard_map", mesh=((D,), ("d",)),
         xspec=P("d"), explicit=True, smap=(P("d"), P("d"), None)),
    Mode("shard_map_auto", axis_name="d", ghost=2, kind="shard_map",
         mesh=((D,), ("d",), True), xspec=P("d"), smap=(P("d"), P("d"), None)),
    Mode("shard_map_2d_grouped", axis_name="d", groups=2, ghost=2, kind="shard_map",
         mesh=((2, 4), ("h", "d")), xspec=P(("h", "d")), explicit=True,
         smap=(P(("h", "d")), P(("h", "d")), None)),
    Mode("shard_map_partial", axis_name="a", ghost=2, kind="shard_map",
         mesh=((2, 4), ("a", "b")), xspec=P("a", "b"), explicit=True,
         smap=(P("a"), P("a"), frozenset({"a"}))),
    Mode("jit_auto_batch", mesh=((D,), ("d",), True), xspec=P("d")),
    Mode("jit_explicit_batch", mesh=((D,), ("d",)), xspec=P("d", None), explicit=True),
    Mode("jit_explicit_features", mesh=((2, 4), ("d", "m")), xspec=P(None, "m"),
         explicit=True),
]}


# ---------------------------------------------------------------------------------------------
# Running a case and checking it.


def _consts(put, transform, option):
    # With a mask, the loss looks only at the valid outputs: what a masked-out (padding)
    # output passes to the statistics and parameters is a convention this matrix leaves open.
    w = W * MASK if option == "mask" else W
    c = {"w": put(w), "tx": put(TX), "v": put(V), "tp": TP, "vp": VP}
    if transform == "scan":
        c["tp"], c["vp"] = _stacked(TP, True), _stacked(VP, True)
    return c


def _inputs(transform, option, ghost):
    kw, state, mask = _option(option, ghost)
    params = PARAMS
    if transform == "scan":
        params, state = _stacked(PARAMS, True), _stacked(state)
    return kw, params, state, mask


# Compiling dominates this file's time; LLVM's optimizations do not change what is tested.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _all(transforms, fns):
    """One function computing several transforms (one compilation shared by their tests)."""
    return lambda args: {t: fns[t](*args[t]) for t in transforms}


@functools.cache
def _reference(option: str, groups: int, ghost: int) -> dict:
    """The float64 reference of every transform, from one jitted function."""
    fns, args = _reference_fns(option, groups, ghost)
    return ref.in_float64(_jit(_all(TRANSFORMS, fns)))(args)


def _reference_fns(option: str, groups: int, ghost: int) -> tuple[dict, dict]:
    fns, args = {}, {}
    for t in TRANSFORMS:
        kw, params, state, mask = _inputs(t, option, ghost)
        gfn = _ref_global(_body(_ref_layer(kw), t), groups)
        fns[t] = functools.partial(apply_transform, t, gfn)
        args[t] = (params, state, X, mask, _consts(np.asarray, t, option))
    return fns, args


@functools.cache
def _bound(option: str, groups: int, ghost: int, transform: str) -> dict:
    """A bound on the float32 error of ``transform`` (see ALGORITHM_FACTOR)."""
    fns, args = _reference_fns(option, groups, ghost)
    _, bound = ref.rounding_bound(fns[transform], *args[transform])
    return jax.tree.map(lambda b: ALGORITHM_FACTOR * b, bound)


# Transforms compiled together (one function per mode, option and tier); the heavy tier's
# second-order and scanned programs take most of the compile time.
HEAVY = ("gradgrad", "hvp", "scan")
LIGHT = tuple(t for t in TRANSFORMS if t not in HEAVY)
_RESULTS: dict[tuple, dict] = {}


def _results(mode_name: str, option: str, transforms: tuple[str, ...],
             wrap: Callable | None = None, shared: bool = True) -> dict:
    """jaxbn's result (or the exception it raised) for ``transforms`` of one mode and option.

    ``shared``: the transforms are compiled together, in one function (``wrap``: ``jit`` or a
    chex variant) whose results their tests share; when that fails, each runs on its own, so
    an error stays with its transform. Otherwise each runs on its own, wrapped by ``wrap``.
    """
    key = (mode_name, option, transforms) if shared and wrap is None else None
    if key in _RESULTS:
        return _RESULTS[key]
    mode = MODES[mode_name]
    wrap = _jit if wrap is None else wrap
    fns, args, results = {}, {}, {}
    for t in transforms:
        kw, params, state, mask = _inputs(t, option, mode.ghost)
        gfn = mode.wrap(_body(_jaxbn_layer(kw, mode.axis_name), t))
        fns[t] = functools.partial(apply_transform, t, gfn)
        with mode.context():
            args[t] = (params, state, mode.put(X), mode.put(mask, features=False),
                       _consts(mode.put, t, option))
    with mode.context():
        if shared:
            try:
                results.update(jax.block_until_ready(wrap(_all(transforms, fns))(args)))
            except Exception:  # noqa: BLE001 - isolate the failing transform below
                pass
        for t in transforms:
            if t not in results:
                try:
                    results[t] = jax.block_until_ready(wrap(fns[t])(*args[t]))
                except Exception as e:  # noqa: BLE001 - reported by the test of ``t``
                    results[t] = e
    if key is not None:
        _RESULTS[key] = results
    return results


def _spec(a) -> tuple:
    spec = tuple(jax.typeof(a).sharding.spec)
    return spec + (None,) * (a.ndim - len(spec))


def check_case(mode_name: str, transform: str, option: str, wrap: Callable | None = None,
               shared: bool = True) -> None:
    """Compares one case with the float64 reference (and checks shardings)."""
    mode = MODES[mode_name]
    tier = HEAVY if transform in HEAVY else LIGHT
    got = _results(mode_name, option, tier if shared else (transform,), wrap, shared)[transform]
    if isinstance(got, Exception):
        raise got
    if mode.explicit:
        with mode.context():
            want_spec = _spec(mode.put(X))
        for key in ("y", "dx", "dy"):
            if key in got:
                assert _spec(got[key]) == want_spec, (key, jax.typeof(got[key]).sharding)
    key_args = (option, mode.groups, mode.ghost if option == "ghost" else 0)
    want = _reference(*key_args)[transform]
    bounds = _bound(*key_args, transform) if transform in BOUNDED else None
    for key, value in got.items():
        value = jax.tree.map(np.asarray, value)
        expect = want[key]
        bound = None if bounds is None else bounds[key]
        if key in ("y", "dx", "dy"):
            value = value.reshape(expect.shape)
            if key == "dy" and option == "mask":  # tangents of valid outputs only (see above)
                value, expect = np.where(MASK, value, 0), np.where(MASK, expect, 0)
                bound = None if bound is None else np.where(MASK, bound, 0)
        elif key in ("state", "dstate"):  # copy i holds the statistics of group i*G//copies
            copies = jax.tree.leaves(value)[0].shape[0]
            expect, bound = (None if tree is None else jax.tree.map(
                lambda a, n=copies: a[np.arange(n) * mode.groups // n], tree)
                for tree in (expect, bound))
        what = f"{mode.name}/{transform}/{option}: {key}"
        if bound is None:
            tol = TOL[transform]
            chex.assert_trees_all_close(value, expect, rtol=tol, atol=tol, custom_message=what)
            continue
        chex.assert_trees_all_equal_shapes(value, expect)
        for (path, v), e, b in zip(jax.tree_util.tree_leaves_with_path(value),
                                   jax.tree.leaves(expect), jax.tree.leaves(bound), strict=True):
            bounds_ref.assert_within(v, e, b, what + jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------------------------
# The matrix.

SKIP: dict[tuple[str, str, str], str] = {}


# The fast subset's slice: the first-order transforms of the plain option under one mode of
# each kind of axis binding (compiled together per mode: a few seconds in all).
FAST_MODES = ("shard_map_auto", "pmap", "vmap", "jit_explicit_batch")
FAST_TRANSFORMS = ("forward", "grad", "jvp", "remat")


def _cases():
    """Every case; those outside the fast slice are marked slow."""
    for mode in MODES:
        for option in OPTIONS:
            for transform in HEAVY if mode == "none" else TRANSFORMS:  # chex variants below
                marks = []
                if not (mode in FAST_MODES and transform in FAST_TRANSFORMS
                        and option == "plain"):
                    marks.append(pytest.mark.slow)
                reason = SKIP.get((mode, transform, option))
                if reason:
                    marks.append(pytest.mark.skip(reason=reason))
                yield pytest.param(mode, transform, option, marks=marks,
                                   id=f"{mode}-{transform}-{option}")


@pytest.mark.parametrize(("mode", "transform", "option"), list(_cases()))
def test_matrix(mode: str, transform: str, option: str) -> None:
    check_case(mode, transform, option)


@pytest.mark.slow  # the matrix's fast slice covers the first-order tier
class NoSyncTest(chex.TestCase):
    """No synchronization, with and without ``jit`` (chex variants): the first-order tier.

    The heavy tier runs (under ``jit``) in ``test_matrix``: op-by-op dispatch of second-order
    and scanned programs costs seconds and tests nothing more.
    """

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(option=OPTIONS, transform=LIGHT)
    def test_matrix(self, option: str, transform: str) -> None:
        check_case("none", transform, option, self.variant, shared=False)
