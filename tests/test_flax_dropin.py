"""jaxbn's Flax wrappers as drop-ins (issue 16): each behaviour that Flax's own BatchNorm tests
exercise, checked side by side with flax.linen.BatchNorm / flax.nnx.BatchNorm (same inputs,
numbers compared), or against a float64 NumPy reference where Flax itself differs on purpose.
"""

import inspect

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import bridge

import jaxbn.linen
import jaxbn.nnx
from tests import reference as ref

KEY = jax.random.key(0)


def _x(shape, dtype=jnp.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(1.0, 2.0, shape), dtype)


def _mask(shape, seed=1):
    m = np.random.default_rng(seed).random(shape) < 0.6
    m.reshape(-1, m.shape[-1])[0] = True  # at least one valid element per feature
    return jnp.asarray(m)


def _close(a, b, tol, *, dtypes=True):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert u.shape == v.shape, (u.shape, v.shape)
        if dtypes:
            assert u.dtype == v.dtype, (u.dtype, v.dtype)
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol)


def _bounds(x, mask=None, scale=None, bias=None, momentum=0.9, old=(0.0, 1.0),
            out_dtype=None, dtype=np.float32, pair=True, flax_algorithm=False):
    """Bounds on one training step's ``(y, running mean, running var)`` (feature axis last):
    jaxbn's float32 (``dtype``) error by the stable algorithm, plus, with ``pair``, Flax's
    (use_fast_variance=False: the plain two-pass one; ``flax_algorithm="fast"`` for Flax's
    default), so that two float32 results, each within its bound of the exact one, are within
    the sum of each other (tests.reference)."""
    y = mean = var = 0.0
    f = np.shape(x)[-1:]
    for stable in (True, flax_algorithm) if pair else (True,):
        y = y + ref.bn_forward_bound(x, scale, bias, -1, mask, dtype=dtype, out_dtype=out_dtype,
                                     stable=stable)
        mo = ref.moments_bound(x, -1, mask, dtype, stable)
        mean = mean + ref.ema_bound(old[0], mo["mean"].reshape(f),
                                    mo["e_mean_stored"].reshape(f), momentum, dtype)
        var = var + ref.ema_bound(old[1], mo["var"].reshape(f), mo["e_var_stored"].reshape(f),
                                  momentum, dtype)
    return y, mean, var


def _within(a, b, bound, what, valid=True):
    """``a`` within ``bound`` of ``b`` where ``valid`` (padding may hold anything); complex
    values part by part (each part of a difference is at most its modulus)."""
    a, b, bound = (np.where(valid, v, 0) for v in (a, b, bound))
    for part in (np.real, np.imag) if np.iscomplexobj(a) or np.iscomplexobj(b) else (np.real,):
        ref.assert_within(part(a), part(b), bound, what)


def _stats_within(a, b, bounds, what):
    """Running statistics ``{"mean", "var"}`` (dicts or nnx states) within their bounds."""
    for k, bound in zip(("mean", "var"), bounds, strict=True):
        _within(np.asarray(a[k]), np.asarray(b[k]), bound, f"{what}: running {k}")


def _ref(x, mask, axes, eps=1e-5):
    """Batch statistics and normalized x in extended precision (mask: valid elements)."""
    x = np.asarray(x).astype(np.clongdouble if np.iscomplexobj(x) else np.longdouble)
    w = np.broadcast_to(np.ones((), bool) if mask is None else np.asarray(mask), x.shape)
    n = w.sum(axes, keepdims=True)
    mean = np.where(w, x, 0).sum(axes, keepdims=True) / n
    var = (np.where(w, np.abs(x - mean) ** 2, 0)).sum(axes, keepdims=True) / n
    return mean, var, (x - mean) / np.sqrt(var + eps)


def _flax_linen(**kw):
    return nn.BatchNorm(use_fast_variance=False, **kw)


def _flax_nnx(*a, **kw):
    return nnx.BatchNorm(*a, use_fast_variance=False, **kw)


# ----------------------------------------------------------------------------- A: linen init


@pytest.mark.slow
@pytest.mark.parametrize("masked", [False, True])
def test_linen_init_in_training_normalizes_with_batch_statistics(masked):
    x = _x((4, 3, 2))
    m = _mask((4, 3, 1)) if masked else None
    if masked:
        x = jnp.where(m, x, jnp.nan)  # masked-out positions may hold anything
    y1, v1 = jaxbn.linen.BatchNorm(momentum=0.9, use_running_average=False).init_with_output(
        KEY, x, mask=m)
    y2, v2 = _flax_linen(momentum=0.9, use_running_average=False).init_with_output(KEY, x, mask=m)
    valid = np.broadcast_to(True if m is None else np.asarray(m), x.shape)
    mean, var, want = _ref(x, m, (0, 1))
    y_pair, mean_pair, var_pair = _bounds(x, m)
    y_ours, mean_ours, var_ours = _bounds(x, m, pair=False)
    _within(y1, want, y_ours, "y", valid)
    _within(y1, y2, y_pair, "y vs Flax", valid)
    _close(v1, v2, 0)  # init leaves the running statistics at zeros/ones
    (_, u1), (_, u2) = (mod.apply(v2, x, mask=m, mutable=["batch_stats"]) for mod in (
        jaxbn.linen.BatchNorm(momentum=0.9, use_running_average=False),
        _flax_linen(momentum=0.9, use_running_average=False)))
    _stats_within(u1["batch_stats"], u2["batch_stats"], (mean_pair, var_pair), "vs Flax")
    _stats_within(u1["batch_stats"], {"mean": 0.1 * mean.ravel(), "var": 0.9 + 0.1 * var.ravel()},
                  (mean_ours, var_ours), "vs extended precision")


@pytest.mark.slow
def test_linen_init_with_axis_name_issues_no_collective():
    def model(cls):
        class Foo(nn.Module):
            @nn.compact
            def __call__(self, x):
                norm = cls(name="norm", use_running_average=False, axis_name="batch")
                x = norm(x)
                return x, norm(x)
        return Foo()

    x = _x((2, 4))
    (a1, a2), v1 = model(jaxbn.linen.BatchNorm).init_with_output(KEY, x)
    (b1, b2), v2 = model(_flax_linen).init_with_output(KEY, x)
    _close(v1, v2, 0)  # init: the running statistics are not updated
    y_pair = _bounds(x)[0]
    _within(a1, b1, y_pair, "first layer vs Flax")
    # the second layer normalizes the first's outputs: its own bound at the exact input, plus
    # each input's error carried through (tests.reference.bn_forward_propagated)
    h = ref.bn_forward(x, None, None)
    second = _bounds(h)[0] + sum(
        ref.bn_forward_propagated(h, None, ref.bn_forward_bound(x, None, None, stable=stable))
        for stable in (True, False))
    _within(a2, b2, second, "second layer vs Flax")
    jaxpr = str(jax.make_jaxpr(lambda x: model(jaxbn.linen.BatchNorm).init(KEY, x))(x))
    assert "psum" not in jaxpr and "all_gather" not in jaxpr and "all_reduce" not in jaxpr


# ----------------------------------------------------------------------------- B: complex


def _complex_x(masked):
    x = jax.random.normal(jax.random.key(1), (4, 3, 2), dtype=jnp.complex64)
    m = None
    if masked:
        m = _mask((4, 3, 1))
        x = jnp.where(m, x, jnp.nan)
    return x, m


@pytest.mark.slow
@pytest.mark.parametrize("masked", [False, True])
def test_linen_complex_matches_flax(masked):
    x, m = _complex_x(masked)
    ours = jaxbn.linen.BatchNorm(momentum=0.9, use_running_average=False, dtype=jnp.complex64)
    theirs = _flax_linen(momentum=0.9, use_running_average=False, dtype=jnp.complex64)
    y1, v1 = ours.init_with_output(KEY, x, mask=m)
    y2, _ = theirs.init_with_output(KEY, x, mask=m)
    assert y1.dtype == y2.dtype == jnp.complex64
    valid = np.broadcast_to(True if m is None else np.asarray(m), x.shape)
    mean, var, want = _ref(x, m, (0, 1))
    # complex bounds: moduli, and complex roundings (tests.reference._unit)
    y_pair, mean_pair, var_pair = _bounds(x, m)
    y_ours, mean_ours, var_ours = _bounds(x, m, pair=False)
    _within(y1, want, y_ours, "y", valid)
    _within(y1, y2, y_pair, "y vs Flax", valid)
    (z1, u1), (z2, u2) = (mod.apply(v1, x, mask=m, mutable=["batch_stats"])
                          for mod in (ours, theirs))
    _within(z1, z2, y_pair, "y vs Flax (apply)", valid)
    assert jax.tree.map(lambda a: a.dtype, u1) == jax.tree.map(lambda a: a.dtype, u2)
    _stats_within(u1["batch_stats"], u2["batch_stats"], (mean_pair, var_pair), "vs Flax")
    _stats_within(u1["batch_stats"], {"mean": 0.1 * mean.ravel(), "var": 0.9 + 0.1 * var.ravel()},
                  (mean_ours, var_ours), "vs extended precision")
    e1, e2 = (mod.clone(use_running_average=True).apply({"params": v1["params"], **u1}, x)
              for mod in (ours, theirs))
    stats = (u1["batch_stats"]["mean"], u1["batch_stats"]["var"])
    _within(e1, e2, 2 * ref.bn_eval_bound(x, None, None, *stats), "eval vs Flax", valid)


@pytest.mark.slow
def test_complex_gradients_match_flax():
    x, m = _complex_x(True)
    ours = jaxbn.linen.BatchNorm(use_running_average=False, dtype=jnp.complex64)
    theirs = _flax_linen(use_running_average=False, dtype=jnp.complex64)
    variables = ours.init(KEY, x)
    params = jax.tree.map(lambda p: p * 1.3 + 0.2, variables["params"])
    w = jnp.asarray(np.random.default_rng(3).normal(size=x.shape), jnp.complex64)

    def loss(mod, p, x):
        y, _ = mod.apply({"params": p, "batch_stats": variables["batch_stats"]}, x, mask=m,
                         mutable=["batch_stats"])
        return jnp.sum(jnp.where(m, jnp.real(y * w), 0))

    x0 = jnp.where(m, x, 0)
    g1 = jax.grad(loss, argnums=(1, 2))(ours, params, x0)
    g2 = jax.grad(loss, argnums=(1, 2))(theirs, params, x0)
    assert jax.tree.structure(g1) == jax.tree.structure(g2)
    # the cotangent of y is w on valid elements; each implementation within the closed form's
    # float32 bound (complex: moduli and complex roundings), Flax's by the plain algorithm
    dy = np.where(np.asarray(m), np.asarray(w), 0)
    e_dx, e_dscale, e_dbias = (sum(b) for b in zip(*(
        ref.bn_grads_bound(x0, params["scale"], dy, -1, m, stable=stable)
        for stable in (True, False)), strict=True))
    (gp1, gx1), (gp2, gx2) = g1, g2
    _within(gx1, gx2, e_dx, "dx vs Flax")
    ref.assert_within(gp1["scale"], gp2["scale"], e_dscale, "dscale vs Flax")
    ref.assert_within(gp1["bias"], gp2["bias"], e_dbias, "dbias vs Flax")


@pytest.mark.slow
def test_complex_synchronized_over_axis_name_like_flax():
    x = jax.random.normal(jax.random.key(2), (4, 3, 2), dtype=jnp.complex64)
    outs = []
    for cls in (jaxbn.linen.BatchNorm, _flax_linen):
        mod = cls(use_running_average=False, axis_name="d", momentum=0.5, dtype=jnp.complex64)
        v = mod.init(KEY, x[0])
        outs.append(jax.vmap(lambda xx, mod=mod, v=v: mod.apply(v, xx, mutable=["batch_stats"]),
                             axis_name="d")(x))
    flat = x.reshape(12, 2)  # statistics over the 4 devices' 3 examples
    y_pair, mean_pair, var_pair = _bounds(flat, momentum=0.5)
    (y1, u1), (y2, u2) = outs
    _within(y1.reshape(12, 2), y2.reshape(12, 2), y_pair, "y vs Flax")
    for d in range(4):
        _stats_within(jax.tree.map(lambda a, d=d: a[d], u1["batch_stats"]),
                      jax.tree.map(lambda a, d=d: a[d], u2["batch_stats"]),
                      (mean_pair, var_pair), f"device {d} vs Flax")
    mean, _, want = _ref(flat, None, (0,))
    y_ours, mean_ours, _ = _bounds(flat, momentum=0.5, pair=False)
    _within(y1.reshape(12, 2), want.astype(np.complex128), y_ours, "y")
    _within(u1["batch_stats"]["mean"][0], 0.5 * mean.ravel(), mean_ours, "running mean")


@pytest.mark.slow
def test_nnx_complex_normalizes_like_flax():
    x, _ = _complex_x(False)
    ours = jaxbn.nnx.BatchNorm(2, momentum=0.9, dtype=jnp.complex64, rngs=nnx.Rngs(0))
    theirs = _flax_nnx(2, momentum=0.9, dtype=jnp.complex64, rngs=nnx.Rngs(0))
    y1 = ours(x)
    with pytest.warns(Warning):  # Flax's nnx drops the imaginary part of its running mean
        y2 = theirs(x)
    assert y1.dtype == y2.dtype
    y_pair, _, var_pair = _bounds(x)
    _within(y1, y2, y_pair, "y vs Flax")
    mean, var, _ = _ref(x, None, (0, 1))
    _, mean_ours, _ = _bounds(x, pair=False)
    _within(ours.mean[...], 0.1 * mean.ravel(), mean_ours, "running mean")  # complex kept
    ref.assert_within(ours.var[...], theirs.var[...], var_pair, "running var vs Flax")
    ours.eval()
    rm, rv = np.asarray(ours.mean[...]), np.asarray(ours.var[...])
    want = (np.asarray(x, np.complex128) - rm) / np.sqrt(np.asarray(rv, np.float64) + 1e-5)
    _within(ours(x), want, ref.bn_eval_bound(x, None, None, rm, rv), "eval y")


# ----------------------------------------------------------------------------- C: one value


@pytest.mark.slow
def test_linen_one_value_per_feature_returns_bias_like_flax():
    x = jnp.array([[1.0, 2.0, 3.0]])
    variables = {"params": {"scale": jnp.full(3, 2.0), "bias": jnp.arange(3.0)},
                 "batch_stats": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}
    outs = [mod.apply(variables, x, mutable=["batch_stats"]) for mod in (
        jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.9),
        _flax_linen(use_running_average=False, momentum=0.9))]
    # one value: x - mean is exactly 0, so y is the bias exactly; the running mean is 0.1 x and
    # the variance 0.9 (0.9 * 1 + 0.1 * 0), each rounded a few times
    assert jax.tree.map(lambda a: a.dtype, outs[0]) == jax.tree.map(lambda a: a.dtype, outs[1])
    for y, upd in outs:
        np.testing.assert_array_equal(y, [[0.0, 1.0, 2.0]])
        _stats_within(upd["batch_stats"], {"mean": 0.1 * np.asarray(x[0]), "var": [0.9] * 3},
                      (ref.ema_bound(0.0, x[0], 0.0, 0.9), ref.ema_bound(1.0, 0.0, 0.0, 0.9)),
                      "one value")
    # a 1-d input: its only axis holds the features (Flax's bind test)
    v = jaxbn.linen.BatchNorm(use_running_average=False).init(KEY, jnp.ones(3))
    np.testing.assert_allclose(v["params"]["scale"], np.ones(3))


class _Model(nnx.Module):
    def __init__(self, bn, rngs):
        self.linear = nnx.Linear(2, 3, rngs=rngs)
        self.bn = bn(3, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.linear(x))


@pytest.mark.slow
def test_nnx_one_example_under_vmap_jit_and_tabulate_like_flax():
    outs, states = [], []
    def ensemble(bn):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=0, out_axes=0)
        def make(rngs):
            return _Model(bn, rngs)
        return make(nnx.Rngs(0))

    for bn in (jaxbn.nnx.BatchNorm, _flax_nnx):
        ens = ensemble(bn)

        @nnx.jit
        @nnx.vmap(in_axes=(0, None), out_axes=0)
        def run(m, x):
            return m(x)

        outs.append(run(ens, jnp.ones((1, 2))))
        states.append(nnx.state(ens))
    # one example per member: x - mean is exactly 0, y is the bias (0) exactly
    _close(outs[0], outs[1], 0)
    # the running mean is 0.01 h (h = the Linear layer's output: a 3-term sum in float32), the
    # variance 0.99; everything else is the same initialization
    s1, s2 = states
    _close(s1["linear"], s2["linear"], 0)
    _close((s1["bn"]["scale"], s1["bn"]["bias"]), (s2["bn"]["scale"], s2["bn"]["bias"]), 0)
    kernel = np.asarray(s1["linear"]["kernel"][...], np.float64)
    bias = np.asarray(s1["linear"]["bias"][...], np.float64)
    h = kernel.sum(1) + bias  # ones @ kernel + bias, per member
    e_h = ref.sum_error_bound(np.abs(kernel).sum(1) + np.abs(bias), 3)
    _stats_within(s1["bn"], s2["bn"], (2 * ref.ema_bound(0.0, h, e_h, 0.99),
                                      2 * ref.ema_bound(1.0, 0.0, 0.0, 0.99)), "vs Flax")
    t1, t2 = (nnx.tabulate(_Model(bn, nnx.Rngs(0)), jnp.ones((1, 2)))
              for bn in (jaxbn.nnx.BatchNorm, nnx.BatchNorm))
    assert t1 == t2


# ----------------------------------------------------------------------------- D: rank promotion


@pytest.mark.slow
def test_axis_name_under_rank_promotion_raise_like_flax():
    x = _x((4, 5, 3))
    with jax.numpy_rank_promotion("raise"):
        outs = []
        for cls in (jaxbn.linen.BatchNorm, _flax_linen):
            mod = cls(use_running_average=False, axis_name="b", momentum=0.9)
            v = mod.init(KEY, x[0])
            outs.append(jax.vmap(lambda xx, mod=mod, v=v: mod.apply(v, xx, mutable=["batch_stats"]),
                                 axis_name="b")(x))
        ours = jaxbn.nnx.BatchNorm(3, axis_name="b", rngs=nnx.Rngs(0))
        theirs = _flax_nnx(3, axis_name="b", rngs=nnx.Rngs(0))
        ys = [nnx.vmap(lambda m, xx: m(xx), in_axes=(None, 0), axis_name="b")(bn, x)
              for bn in (ours, theirs)]
    flat = np.asarray(x).reshape(20, 3)  # statistics over the 4 devices' 5 examples
    y_pair, mean_pair, var_pair = _bounds(flat)
    (y1, u1), (y2, u2) = outs
    assert y1.dtype == y2.dtype
    _within(np.asarray(y1).reshape(20, 3), np.asarray(y2).reshape(20, 3), y_pair, "linen y")
    for d in range(4):
        _stats_within(jax.tree.map(lambda a, d=d: a[d], u1["batch_stats"]),
                      jax.tree.map(lambda a, d=d: a[d], u2["batch_stats"]),
                      (mean_pair, var_pair), f"linen device {d}")
    y_pair, mean_pair, var_pair = _bounds(flat, momentum=0.99)  # nnx's default momentum
    _within(np.asarray(ys[0]).reshape(20, 3), np.asarray(ys[1]).reshape(20, 3), y_pair, "nnx y")
    _stats_within({"mean": ours.mean[...], "var": ours.var[...]},
                  {"mean": theirs.mean[...], "var": theirs.var[...]}, (mean_pair, var_pair),
                  "nnx")
    _close((ours.scale, ours.bias), (theirs.scale, theirs.bias), 0)


# ----------------------------------------------------------------------------- E, F, I: structure


def test_nnx_attributes_repr_and_graphdef_like_flax():
    ours, theirs = (cls(3, rngs=nnx.Rngs(0)) for cls in (jaxbn.nnx.BatchNorm, nnx.BatchNorm))
    assert sorted(vars(ours)) == sorted(vars(theirs))  # no count=None, no extras dict
    assert repr(ours) == repr(theirs)
    gdef, state = nnx.split(ours)
    hash(gdef)
    assert gdef == nnx.graphdef(jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(1)))

    @jax.jit
    def step(state, x):
        return nnx.merge(gdef, state)(x)

    f = jax.jit(lambda g, s, x: nnx.merge(g, s)(x), static_argnums=0)
    x = _x((4, 3))
    y_ours, y_pair = _bounds(x, pair=False)[0], _bounds(x)[0]
    ref.assert_within(f(gdef, state, x), ref.bn_forward(x, None, None), y_ours, "static graphdef")
    ref.assert_within(step(state, x), ref.bn_forward(x, None, None), y_ours, "closed-over")
    _within(f(gdef, state, x), _flax_nnx(3, rngs=nnx.Rngs(0))(x), y_pair, "vs Flax")
    # jaxbn's options, when given, are hashable static attributes; list arguments become tuples
    opt = jaxbn.nnx.BatchNorm(3, momentum=None, renorm=[3.0, 5.0], skip_nonfinite=True,
                              axis=[-1], rngs=nnx.Rngs(0))
    hash(nnx.graphdef(opt))
    assert opt.renorm == (3.0, 5.0) and opt.axis == (-1,) and "count" in vars(opt)
    assert "renorm" not in vars(ours) and ours.renorm is None


def test_nnx_view_info_and_view_like_flax():
    model = _Model(jaxbn.nnx.BatchNorm, nnx.Rngs(0))
    info = nnx.view_info(model)
    assert info.count("BatchNorm:") == 1 and "use_running_average" in info
    x = _x((5, 2))
    ev = nnx.view(model, use_running_average=True)
    theirs = _Model(_flax_nnx, nnx.Rngs(0))
    # the same Linear layer (same initialization), then inference with mean 0 and variance 1:
    # each output within the eval bound at the exact h, plus h's own (2-term sum) error / sigma
    _close(nnx.state(model.linear), nnx.state(theirs.linear), 0)
    kernel = np.asarray(model.linear.kernel[...], np.float64)
    bias = np.asarray(model.linear.bias[...], np.float64)
    h = np.asarray(x, np.float64) @ kernel + bias
    e_h = ref.sum_error_bound(np.abs(np.asarray(x, np.float64)) @ np.abs(kernel) + np.abs(bias), 3)
    bound = 2 * (ref.bn_eval_bound(h, None, None, np.zeros(3), np.ones(3)) + e_h)
    _within(ev(x), nnx.view(theirs, use_running_average=True)(x), bound, "eval view vs Flax")
    assert nnx.with_attributes(model, use_running_average=True).bn.use_running_average


def test_isinstance_and_serialization_like_flax():
    lin = jaxbn.linen.BatchNorm(use_running_average=True)
    assert isinstance(lin, nn.BatchNorm)
    flax_fields = [f for f in nn.BatchNorm.__dataclass_fields__ if f not in ("parent", "name")]
    ours_fields = list(jaxbn.linen.BatchNorm.__dataclass_fields__)
    assert ours_fields[:len(flax_fields)] == flax_fields
    assert (list(inspect.signature(jaxbn.linen.BatchNorm.__call__).parameters)
            == list(inspect.signature(nn.BatchNorm.__call__).parameters))
    x = _x((4, 3, 2))
    v = lin.init(KEY, x)
    restored = flax.serialization.from_bytes(_flax_linen(use_running_average=True).init(KEY, x),
                                             flax.serialization.to_bytes(v))
    _close(restored, v, 0)

    model = _Model(jaxbn.nnx.BatchNorm, nnx.Rngs(0))
    assert isinstance(model.bn, nnx.BatchNorm)
    assert [p for p, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)] == [("bn",)]
    params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat)
    clone = nnx.merge(params, stats, rest)
    assert type(clone.bn) is jaxbn.nnx.BatchNorm
    theirs = _Model(nnx.BatchNorm, nnx.Rngs(0))
    sd1 = flax.serialization.to_state_dict(nnx.state(model))
    sd2 = flax.serialization.to_state_dict(nnx.state(theirs))
    _close(sd1, sd2, 0)
    nnx.update(model, flax.serialization.from_state_dict(nnx.state(model), sd2))
    _close(nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(theirs)), 0)


# ----------------------------------------------------------------------------- G, H: dtypes, masks


@pytest.mark.parametrize("use_scale,use_bias", [(True, True), (False, True), (False, False)])
def test_nnx_custom_promote_dtype_receives_five_values_like_flax(use_scale, use_bias):
    seen = {}

    def make_promote(tag):
        def promote(args, *, dtype=None):
            x, mean, var, scale, bias = args  # Flax's contract: five values, None if disabled
            seen[tag] = tuple(a is None for a in args)
            return tuple(a if a is None else jnp.asarray(a, jnp.float32)
                         for a in (x, mean, var, scale, bias))
        return promote

    x = _x((6, 3), jnp.bfloat16)
    ys = [cls(3, use_scale=use_scale, use_bias=use_bias, promote_dtype=make_promote(tag),
              rngs=nnx.Rngs(0))(x) for tag, cls in (("ours", jaxbn.nnx.BatchNorm),
                                                    ("theirs", _flax_nnx))]
    assert seen["ours"] == seen["theirs"] == (False, False, False, not use_scale, not use_bias)
    # the promoted (float32) x is normalized, as in Flax (scale 1, bias 0 when present)
    assert ys[0].dtype == ys[1].dtype
    _within(ys[0], ys[1], _bounds(np.asarray(x, np.float32))[0], "y vs Flax")


@pytest.mark.slow
def test_non_boolean_masks_are_cast_like_flax():
    x = _x((6, 2, 3))
    m = jnp.asarray(np.random.default_rng(2).random((6, 2, 1)) < 0.6).at[0].set(True)
    mi = m.astype(jnp.int32)
    y1, u1 = jaxbn.linen.BatchNorm(use_running_average=False).init_with_output(KEY, x, mask=mi)
    y2, u2 = _flax_linen(use_running_average=False).init_with_output(KEY, x, mask=mi)
    _close(u1, u2, 0)  # init: the running statistics are not updated
    y_pair, mean_pair, var_pair = _bounds(x, m, momentum=0.99)
    valid = np.broadcast_to(np.asarray(m), x.shape)
    _within(y1, y2, y_pair, "linen y vs Flax", valid)
    ours = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    theirs = _flax_nnx(3, rngs=nnx.Rngs(0))
    y1, y2 = ours(x, mask=mi.astype(jnp.float32)), theirs(x, mask=m)  # Flax nnx: bool only
    _within(y1, y2, y_pair, "nnx y vs Flax", valid)
    _stats_within({"mean": ours.mean[...], "var": ours.var[...]},
                  {"mean": theirs.mean[...], "var": theirs.var[...]}, (mean_pair, var_pair),
                  "nnx vs Flax")
    _close((ours.scale, ours.bias), (theirs.scale, theirs.bias), 0)


# ----------------------------------------------------------------------------- linen == nnx


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.float16])
def test_nnx_equals_linen_bit_for_bit_and_flax_within_rounding(dtype, param_dtype):
    x = _x((10, 5))
    rows = jnp.asarray(np.random.default_rng(4).random((10, 1)) < 0.6).at[0].set(True)
    ours_l = jaxbn.linen.BatchNorm(use_running_average=False, dtype=dtype,
                                   param_dtype=param_dtype)
    v = ours_l.init(KEY, x)
    y_l, u_l = ours_l.apply(v, x, mask=rows, mutable=["batch_stats"])
    ours_n = jaxbn.nnx.BatchNorm(5, dtype=dtype, param_dtype=param_dtype,
                                 promote_dtype=lambda a, **kw: a, rngs=nnx.Rngs(0))
    y_n = ours_n(x, mask=rows)
    np.testing.assert_array_equal(y_l, y_n)
    np.testing.assert_array_equal(u_l["batch_stats"]["mean"], ours_n.mean[...])
    np.testing.assert_array_equal(u_l["batch_stats"]["var"], ours_n.var[...])
    y_f, u_f = _flax_linen(use_running_average=False, dtype=dtype,
                           param_dtype=param_dtype).apply(v, x, mask=rows,
                                                          mutable=["batch_stats"])
    # both compute in float32 (scale 1 and bias 0 are exact in float16) and round y once to
    # dtype: the float32 bounds plus one rounding each
    assert y_l.dtype == y_f.dtype
    y_pair, mean_pair, var_pair = _bounds(x, rows, momentum=0.99, out_dtype=dtype)
    _within(y_l, y_f, y_pair, "y vs Flax")
    _stats_within(u_l["batch_stats"], u_f["batch_stats"], (mean_pair, var_pair), "vs Flax")


# ----------------------------------------------------------------------------- J: empty feature


@pytest.mark.slow
def test_feature_without_valid_element_keeps_running_statistics():
    x = _x((10, 5))
    per_feature = jnp.array([True, False, True, False, True])  # features 1 and 3: no element
    ours = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.9)
    v = ours.init(KEY, x)
    stats = {"mean": jnp.arange(5.0), "var": jnp.full(5, 4.0)}
    v = {"params": v["params"], "batch_stats": stats}
    y, u = ours.apply(v, x, mask=per_feature, mutable=["batch_stats"])
    y_f, u_f = _flax_linen(use_running_average=False, momentum=0.9).apply(
        v, x, mask=per_feature, mutable=["batch_stats"])
    ok = np.asarray(per_feature)
    old = (np.asarray(stats["mean"])[ok], np.asarray(stats["var"])[ok])
    y_pair, mean_pair, var_pair = _bounds(np.asarray(x)[:, ok], old=old)
    _within(y[:, ok], y_f[:, ok], y_pair, "y vs Flax")
    _stats_within(jax.tree.map(lambda a: a[ok], u["batch_stats"]),
                  jax.tree.map(lambda a: a[ok], u_f["batch_stats"]), (mean_pair, var_pair),
                  "vs Flax")
    # Flax gives NaN there; jaxbn keeps the running statistics and normalizes with them
    np.testing.assert_array_equal(u["batch_stats"]["mean"][~ok], stats["mean"][~ok])
    np.testing.assert_array_equal(u["batch_stats"]["var"][~ok], stats["var"][~ok])
    args = (np.asarray(x)[:, ~ok], None, None, np.asarray(stats["mean"])[~ok], np.full(2, 4.0))
    ref.assert_within(y[:, ~ok], ref.bn_eval(*args), ref.bn_eval_bound(*args),
                      "y of the empty features")


# ----------------------------------------------------------------------------- float64


@pytest.mark.slow
def test_float64_statistics_like_flax_linen():
    with jax.enable_x64(True):
        x = 12345.678901 + 1e-3 * jnp.asarray(np.random.default_rng(5).normal(size=(64, 3)))
        ours, theirs = (cls(use_running_average=False, momentum=0.5)
                        for cls in (jaxbn.linen.BatchNorm, _flax_linen))
        v = ours.init(KEY, x)
        assert v["batch_stats"]["mean"].dtype == jnp.float64  # float64 from init on
        (y1, u1), (y2, u2) = (m.apply(v, x, mutable=["batch_stats"]) for m in (ours, theirs))
        # float64 bounds: the offset (12345) against the spread (1e-3) makes Flax's plain mean
        # the larger part (up to ~3e-8 on y in the worst summation order; ~1e-9 seen here)
        f64 = dict(momentum=0.5, dtype=np.float64)
        y_pair, mean_pair, var_pair = _bounds(x, **f64)
        y_ours, mean_ours, _ = _bounds(x, pair=False, **f64)
        assert jax.tree.map(lambda a: a.dtype, (y1, u1)) == jax.tree.map(lambda a: a.dtype,
                                                                        (y2, u2))
        _within(y1, y2, y_pair, "y vs Flax")
        _stats_within(u1["batch_stats"], u2["batch_stats"], (mean_pair, var_pair), "vs Flax")
        mean, var, want = _ref(x, None, (0,))
        ref.assert_within(y1, want, y_ours, "y")  # ~1e-14
        ref.assert_within(u1["batch_stats"]["mean"], 0.5 * mean.ravel(), mean_ours,
                          "running mean")
        ev = ours.clone(use_running_average=True).apply({"params": v["params"], **u1}, x)
        assert ev.dtype == jnp.float64
        bn = jaxbn.nnx.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0))
        ref.assert_within(bn(x), y1, 2 * y_ours, "nnx vs linen")
        # created float32 (Flax's nnx too): the statistics keep their dtype, rounded once
        assert bn.mean[...].dtype == jnp.float32
        # one float32 rounding of a float64 value: within 1 float32 ulp (a tie may go either way)
        np.testing.assert_allclose(bn.var[...], 0.5 + 0.5 * var.ravel(), rtol=2.0**-23, atol=0)
        assert jaxbn.nnx.BatchNorm(3, param_dtype=jnp.float64,
                                   rngs=nnx.Rngs(0)).mean[...].dtype == jnp.float64


# ----------------------------------------------------------------------------- Flax tooling


class _ConvBlock(nn.Module):
    bn: type

    @nn.compact
    def __call__(self, x):
        return nn.relu(self.bn(use_running_average=True)(nn.Conv(4, (3, 3))(x)))


@pytest.mark.slow
def test_linen_tabulate_bridge_and_spectral_norm_like_flax():
    x = _x((2, 6, 6, 3))
    t1, t2 = (nn.tabulate(_ConvBlock(bn), KEY)(x)
              for bn in (jaxbn.linen.BatchNorm, nn.BatchNorm))
    assert t1 == t2

    outs = []
    for bn in (jaxbn.linen.BatchNorm, nn.BatchNorm):  # Flax's default: use_fast_variance=True
        m = bridge.ToNNX(bn(use_running_average=False, momentum=0.9), rngs=nnx.Rngs(0))
        bridge.lazy_init(m, x)
        outs.append((m(x, mutable=["batch_stats"]), nnx.state(m, nnx.BatchStat)))
    y_pair, mean_pair, var_pair = _bounds(x, flax_algorithm="fast")
    _within(outs[0][0], outs[1][0], y_pair, "bridge y vs Flax")
    _stats_within(outs[0][1], outs[1][1], (mean_pair, var_pair), "bridge vs Flax")

    xs = _x((10, 5))
    outs, seen = [], []
    for bn in (jaxbn.nnx.BatchNorm, nnx.BatchNorm):
        log: list = []
        seen.append(log)

        class Recording(bn):  # what the layer is given (input, spectrally normalized params)
            def __call__(self, x, *args, log=log, **kwargs):
                log.append([np.asarray(a) for a in (x, self.scale[...], self.bias[...])])
                return super().__call__(x, *args, **kwargs)

        layer = Recording(4, use_fast_variance=False, rngs=nnx.Rngs(2))
        sn = nnx.SpectralNorm(nnx.Sequential(nnx.Linear(5, 4, rngs=nnx.Rngs(1)), nnx.relu,
                                             layer), rngs=nnx.Rngs(3))
        outs.append((sn(xs), {"mean": layer.mean[...], "var": layer.var[...]}))
    (h, scale, bias), (h2, scale2, bias2) = seen[0][0], seen[1][0]
    np.testing.assert_array_equal(scale, scale2)
    np.testing.assert_array_equal(bias, bias2)
    # both layers' bounds at the same input, plus the effect of any difference in their inputs
    y_pair, mean_pair, var_pair = _bounds(h, scale=scale, bias=bias, momentum=0.99)
    y_pair = y_pair + ref.bn_forward_propagated(h, scale, np.abs(h2 - h.astype(np.float64)))
    _within(outs[0][0], outs[1][0], y_pair, "spectral-normalized y vs Flax")
    _stats_within(outs[0][1], outs[1][1], (mean_pair, var_pair), "spectral norm vs Flax")
