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
    np.testing.assert_allclose(np.where(valid, y1, 0), np.where(valid, want, 0), atol=1e-5)
    np.testing.assert_allclose(np.where(valid, y1, 0), np.where(valid, y2, 0), atol=1e-5)
    _close(v1, v2, 0)  # init leaves the running statistics at zeros/ones
    (_, u1), (_, u2) = (mod.apply(v2, x, mask=m, mutable=["batch_stats"]) for mod in (
        jaxbn.linen.BatchNorm(momentum=0.9, use_running_average=False),
        _flax_linen(momentum=0.9, use_running_average=False)))
    _close(u1, u2, 1e-5)
    np.testing.assert_allclose(u1["batch_stats"]["mean"], 0.1 * mean.ravel(), rtol=1e-5)
    np.testing.assert_allclose(u1["batch_stats"]["var"], 0.9 + 0.1 * var.ravel(), rtol=1e-5)


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
    _close((a1, a2, v1), (b1, b2, v2), 1e-5)
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
    np.testing.assert_allclose(np.where(valid, y1, 0), np.where(valid, want, 0), atol=1e-5)
    np.testing.assert_allclose(np.where(valid, y1, 0), np.where(valid, y2, 0), atol=1e-5)
    (z1, u1), (z2, u2) = (mod.apply(v1, x, mask=m, mutable=["batch_stats"])
                          for mod in (ours, theirs))
    np.testing.assert_allclose(np.where(valid, z1, 0), np.where(valid, z2, 0), atol=1e-5)
    _close(u1, u2, 1e-5)  # complex running mean, real running variance, as in Flax
    np.testing.assert_allclose(u1["batch_stats"]["mean"], 0.1 * mean.ravel(), atol=1e-6)
    np.testing.assert_allclose(u1["batch_stats"]["var"], 0.9 + 0.1 * var.ravel(), rtol=1e-5)
    e1, e2 = (mod.clone(use_running_average=True).apply({"params": v1["params"], **u1}, x)
              for mod in (ours, theirs))
    np.testing.assert_allclose(np.where(valid, e1, 0), np.where(valid, e2, 0), atol=1e-5)


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

    g1 = jax.grad(loss, argnums=(1, 2))(ours, params, jnp.where(m, x, 0))
    g2 = jax.grad(loss, argnums=(1, 2))(theirs, params, jnp.where(m, x, 0))
    _close(g1, g2, 1e-4)


def test_complex_synchronized_over_axis_name_like_flax():
    x = jax.random.normal(jax.random.key(2), (4, 3, 2), dtype=jnp.complex64)
    outs = []
    for cls in (jaxbn.linen.BatchNorm, _flax_linen):
        mod = cls(use_running_average=False, axis_name="d", momentum=0.5, dtype=jnp.complex64)
        v = mod.init(KEY, x[0])
        outs.append(jax.vmap(lambda xx, mod=mod, v=v: mod.apply(v, xx, mutable=["batch_stats"]),
                             axis_name="d")(x))
    _close(outs[0], outs[1], 1e-5)
    mean, _, want = _ref(x.reshape(12, 2), None, (0,))
    np.testing.assert_allclose(outs[0][0].reshape(12, 2), want.astype(np.complex128), atol=1e-5)
    np.testing.assert_allclose(outs[0][1]["batch_stats"]["mean"][0], 0.5 * mean.ravel(),
                               atol=1e-6)


def test_nnx_complex_normalizes_like_flax():
    x, _ = _complex_x(False)
    ours = jaxbn.nnx.BatchNorm(2, momentum=0.9, dtype=jnp.complex64, rngs=nnx.Rngs(0))
    theirs = _flax_nnx(2, momentum=0.9, dtype=jnp.complex64, rngs=nnx.Rngs(0))
    y1 = ours(x)
    with pytest.warns(Warning):  # Flax's nnx drops the imaginary part of its running mean
        y2 = theirs(x)
    _close(y1, y2, 1e-5)
    mean, var, _ = _ref(x, None, (0, 1))
    np.testing.assert_allclose(ours.mean[...], 0.1 * mean.ravel(), atol=1e-6)  # complex kept
    np.testing.assert_allclose(ours.var[...], theirs.var[...], rtol=1e-6)
    ours.eval()
    rm, rv = np.asarray(ours.mean[...]), np.asarray(ours.var[...])
    np.testing.assert_allclose(ours(x), (np.asarray(x) - rm) / np.sqrt(rv + 1e-5), atol=1e-5)


# ----------------------------------------------------------------------------- C: one value


def test_linen_one_value_per_feature_returns_bias_like_flax():
    x = jnp.array([[1.0, 2.0, 3.0]])
    variables = {"params": {"scale": jnp.full(3, 2.0), "bias": jnp.arange(3.0)},
                 "batch_stats": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}
    outs = [mod.apply(variables, x, mutable=["batch_stats"]) for mod in (
        jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.9),
        _flax_linen(use_running_average=False, momentum=0.9))]
    _close(outs[0], outs[1], 1e-6)
    np.testing.assert_allclose(outs[0][0], [[0.0, 1.0, 2.0]])
    np.testing.assert_allclose(outs[0][1]["batch_stats"]["var"], [0.9] * 3, rtol=1e-6)
    # a 1-d input: its only axis holds the features (Flax's bind test)
    v = jaxbn.linen.BatchNorm(use_running_average=False).init(KEY, jnp.ones(3))
    np.testing.assert_allclose(v["params"]["scale"], np.ones(3))


class _Model(nnx.Module):
    def __init__(self, bn, rngs):
        self.linear = nnx.Linear(2, 3, rngs=rngs)
        self.bn = bn(3, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.linear(x))


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
    _close(outs[0], outs[1], 1e-6)
    _close(states[0], states[1], 1e-6)
    t1, t2 = (nnx.tabulate(_Model(bn, nnx.Rngs(0)), jnp.ones((1, 2)))
              for bn in (jaxbn.nnx.BatchNorm, nnx.BatchNorm))
    assert t1 == t2


# ----------------------------------------------------------------------------- D: rank promotion


def test_axis_name_under_rank_promotion_raise_like_flax():
    x = _x((4, 5, 3))
    with jax.numpy_rank_promotion("raise"):
        outs = []
        for cls in (jaxbn.linen.BatchNorm, _flax_linen):
            mod = cls(use_running_average=False, axis_name="b", momentum=0.9)
            v = mod.init(KEY, x[0])
            outs.append(jax.vmap(lambda xx, mod=mod, v=v: mod.apply(v, xx, mutable=["batch_stats"]),
                                 axis_name="b")(x))
        _close(outs[0], outs[1], 1e-5)
        ours = jaxbn.nnx.BatchNorm(3, axis_name="b", rngs=nnx.Rngs(0))
        theirs = _flax_nnx(3, axis_name="b", rngs=nnx.Rngs(0))
        ys = [nnx.vmap(lambda m, xx: m(xx), in_axes=(None, 0), axis_name="b")(bn, x)
              for bn in (ours, theirs)]
        _close(ys[0], ys[1], 1e-5)
        _close(nnx.state(ours), nnx.state(theirs), 1e-5)


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
    _close(f(gdef, state, x), step(state, x), 1e-6)
    _close(f(gdef, state, x), _flax_nnx(3, rngs=nnx.Rngs(0))(x), 1e-5)
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
    _close(ev(x), nnx.view(theirs, use_running_average=True)(x), 1e-6)
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
    _close(ys[0], ys[1], 1e-5)  # the promoted (float32) x is normalized, as in Flax


def test_non_boolean_masks_are_cast_like_flax():
    x = _x((6, 2, 3))
    m = jnp.asarray(np.random.default_rng(2).random((6, 2, 1)) < 0.6).at[0].set(True)
    mi = m.astype(jnp.int32)
    y1, u1 = jaxbn.linen.BatchNorm(use_running_average=False).init_with_output(KEY, x, mask=mi)
    y2, u2 = _flax_linen(use_running_average=False).init_with_output(KEY, x, mask=mi)
    _close((y1, u1), (y2, u2), 1e-5)
    ours = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    theirs = _flax_nnx(3, rngs=nnx.Rngs(0))
    _close(ours(x, mask=mi.astype(jnp.float32)), theirs(x, mask=m), 1e-5)  # Flax nnx: bool only
    _close(nnx.state(ours), nnx.state(theirs), 1e-6)


# ----------------------------------------------------------------------------- linen == nnx


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
    tol = 1e-5 if dtype == param_dtype == jnp.float32 else 2e-3
    _close((y_l, u_l), (y_f, u_f), tol)


# ----------------------------------------------------------------------------- J: empty feature


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
    _close(y[:, ok], y_f[:, ok], 1e-5)
    _close(u["batch_stats"]["mean"][ok], u_f["batch_stats"]["mean"][ok], 1e-5)
    # Flax gives NaN there; jaxbn keeps the running statistics and normalizes with them
    np.testing.assert_array_equal(u["batch_stats"]["mean"][~ok], stats["mean"][~ok])
    np.testing.assert_array_equal(u["batch_stats"]["var"][~ok], stats["var"][~ok])
    want = (np.asarray(x)[:, ~ok] - np.asarray(stats["mean"])[~ok]) / np.sqrt(4.0 + 1e-5)
    np.testing.assert_allclose(y[:, ~ok], want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- float64


def test_float64_statistics_like_flax_linen():
    with jax.enable_x64(True):
        x = 12345.678901 + 1e-3 * jnp.asarray(np.random.default_rng(5).normal(size=(64, 3)))
        ours, theirs = (cls(use_running_average=False, momentum=0.5)
                        for cls in (jaxbn.linen.BatchNorm, _flax_linen))
        v = ours.init(KEY, x)
        assert v["batch_stats"]["mean"].dtype == jnp.float64  # float64 from init on
        (y1, u1), (y2, u2) = (m.apply(v, x, mutable=["batch_stats"]) for m in (ours, theirs))
        _close((y1, u1), (y2, u2), 1e-8)
        mean, var, want = _ref(x, None, (0,))
        np.testing.assert_allclose(y1, want.astype(np.float64), atol=1e-13)  # Flax: 1e-9
        np.testing.assert_allclose(u1["batch_stats"]["mean"], 0.5 * mean.ravel(), rtol=1e-14)
        ev = ours.clone(use_running_average=True).apply({"params": v["params"], **u1}, x)
        assert ev.dtype == jnp.float64
        bn = jaxbn.nnx.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0))
        _close(bn(x), y1, 1e-9)
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


def test_linen_tabulate_bridge_and_spectral_norm_like_flax():
    x = _x((2, 6, 6, 3))
    t1, t2 = (nn.tabulate(_ConvBlock(bn), KEY)(x)
              for bn in (jaxbn.linen.BatchNorm, nn.BatchNorm))
    assert t1 == t2

    outs = []
    for bn in (jaxbn.linen.BatchNorm, nn.BatchNorm):
        m = bridge.ToNNX(bn(use_running_average=False, momentum=0.9), rngs=nnx.Rngs(0))
        bridge.lazy_init(m, x)
        outs.append((m(x, mutable=["batch_stats"]), nnx.state(m, nnx.BatchStat)))
    _close(outs[0], outs[1], 1e-5)

    xs = _x((10, 5))
    outs = []
    for bn in (jaxbn.nnx.BatchNorm, _flax_nnx):
        seq = nnx.Sequential(nnx.Linear(5, 4, rngs=nnx.Rngs(1)), nnx.relu,
                             bn(4, rngs=nnx.Rngs(2)))
        sn = nnx.SpectralNorm(seq, rngs=nnx.Rngs(3))
        outs.append((sn(xs), nnx.state(sn, nnx.BatchStat)))
    _close(outs[0], outs[1], 1e-5)
