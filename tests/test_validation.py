"""Issue 12 (no silent wrong answer) and issue 11's feature-sharded Explicit mesh.

Every number is checked against float64 NumPy or a closed form; every error against the text
that names what was expected and what was given.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import freeze
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from tests import reference as ref

F = 3


def _batches(means=(0.0, 2.0, 4.0, 6.0), n=4):
    rng = np.random.RandomState(0)
    return [(rng.randn(n, 1) + m).astype(np.float32) for m in means]


def _check_pooled(mean, var, batches, unbiased=False, ghost=None):
    """Precise statistics against those of all the batches together (float64), within the
    bound of Chan's pooled update applied batch after batch (ghost batches: group by group);
    ``unbiased``: Bessel's factor once, for the pooled count (a few ulps more)."""
    groups = [g for b in batches for g in (np.split(b, len(b) // ghost) if ghost else [b])]
    acc = (0.0, 0.0, 0.0, 0.0, 0.0)
    for g in groups:
        acc = ref.accumulate_bound(acc, ref.stats_with_bounds(g))
    data = np.concatenate(batches).astype(np.float64)
    n = len(data)
    e_var = acc[4]
    if unbiased:  # stored unbiased, un-biased and re-biased at each update: a few ulps each
        e_var = (e_var + 6 * len(groups) * ref.unit_roundoff(np.float32) * data.var(0)
                 ) * n / (n - 1)
    if mean is not None:
        ref.assert_within(mean, data.mean(0), acc[3], "pooled mean")
    ref.assert_within(var, data.var(0, ddof=1 if unbiased else 0), e_var, "pooled var")


# ----------------------------------------------------------------------------- item 1


class _Holder(NamedTuple):
    layers: dict
    tag: int


@pytest.mark.slow
@pytest.mark.parametrize("wrap, get", [
    (lambda s: [s], lambda t: t[0]),
    (lambda s: (s, {"other": jnp.ones(2)}), lambda t: t[0]),
    (lambda s: freeze({"block": {"bn": s}}), lambda t: t["block"]["bn"]),
    (lambda s: _Holder({"bn": [s]}, 7), lambda t: t.layers["bn"][0]),
], ids=["list", "tuple", "FrozenDict", "NamedTuple"])
def test_precise_stats_through_any_pytree(wrap, get):
    params, state = jaxbn.bn_init(1)
    tree = jaxbn.reset_stats(wrap(state))
    st = get(tree)
    assert "seen" in st
    batches = _batches()
    for b in batches:
        _, st = jaxbn.bn_apply(params, st, jnp.asarray(b), True)
    out = jaxbn.finish_stats(wrap(st))
    assert type(out) is type(wrap(state))
    final = get(out)
    assert "seen" not in final
    _check_pooled(final["mean"], final["var"], batches)


@pytest.mark.slow
def test_precise_stats_mean_of_batches_0_2_4_6_is_3():
    params, state = jaxbn.bn_init(1)
    for tree_of, get in ((lambda s: [s], lambda t: t[0]),
                         (lambda s: freeze({"bn": s}), lambda t: t["bn"])):
        st = get(jaxbn.reset_stats(tree_of(state)))
        for m in (0.0, 2.0, 4.0, 6.0):  # batches with means 0, 2, 4, 6 (was 4.96: an EMA)
            _, st = jaxbn.bn_apply(params, st, jnp.array([[m - 1.0], [m + 1.0]]), True)
        # every step is exact in float32 (small integers and halves): 3 exactly
        assert float(get(jaxbn.finish_stats(tree_of(st)))["mean"][0]) == 3.0


def test_precise_linen_stats_on_frozen_variables():
    bn = jaxbn.linen.BatchNorm(use_running_average=False)
    v = freeze(bn.init(jax.random.key(0), jnp.ones((4, 1))))
    batches = _batches()
    out = jaxbn.precise_linen_stats(bn.apply, v, [jnp.asarray(b) for b in batches])
    _check_pooled(out["batch_stats"]["mean"], out["batch_stats"]["var"], batches)
    assert "seen" not in out["batch_stats"]


# ------------------------------------------------------------------------- items 2, 10


def _ema_run(state, steps, momentum):
    params = {}
    x = jnp.array([[4.0], [6.0]])  # mean 5, variance 1
    step = jax.jit(lambda s: jaxbn.bn_apply(params, s, x, True, momentum=momentum)[1])
    for _ in range(steps):
        state = step(state)
    return state


@pytest.mark.parametrize("dtype, momentum", [(jnp.bfloat16, 0.999), (jnp.float16, 0.99),
                                             (jnp.bfloat16, 0.99), (jnp.float32, 0.999)])
def test_low_precision_state_keeps_its_dtype_and_warns_when_it_stalls(dtype, momentum):
    """The state comes back in its dtype (a lax.scan carry, a checkpoint's layout); where the
    EMA cannot follow in that dtype, tracing the step warns, and the stall stays within the
    documented gap eps / (2 (1 - momentum)) of the closed-form EMA."""
    from jaxbn._src.state import stall_gap

    _, state = jaxbn.bn_init(1)
    state = jax.tree.map(lambda v: v.astype(dtype) if v.dtype == jnp.float32 else v, state)
    steps = 2000
    gap = stall_gap(dtype, momentum)
    if gap > 0.01:
        with pytest.warns(UserWarning, match=f"kept in {jnp.dtype(dtype).name}"):
            out = _ema_run(state, steps, momentum)
    else:
        out = _ema_run(state, steps, momentum)
    assert out["mean"].dtype == dtype and out["var"].dtype == dtype
    truth = 5.0 * (1.0 - momentum ** steps)  # closed form of the EMA from 0: 4.3239 at 0.999
    # stalled at most `gap` (relative) below the target it approaches, plus the dtype's
    # rounding of the value itself
    eps = float(jnp.finfo(dtype).eps)
    assert abs(float(out["mean"][0]) - truth) <= gap * 5.0 + eps * truth + 1e-4
    assert abs(float(out["var"][0]) - 1.0) <= gap + eps  # var starts at 1, every batch's is 1


@pytest.mark.slow
def test_stats_dtype_float64_keeps_float64_statistics():
    with jax.enable_x64(True):
        params, state = jaxbn.bn_init(1, stats_dtype=jnp.float64)
        assert state["mean"].dtype == jnp.float64
        rng = np.random.RandomState(0)
        x = jnp.asarray(12345.678901 + 1e-3 * rng.randn(64, 1))
        _, new = jaxbn.bn_apply(params, state, x, True, momentum=0.0)
        assert new["mean"].dtype == jnp.float64
        y, _ = jaxbn.bn_apply(params, new, x, False)
        # eval on the training batch with its own statistics: mean(y) is 0 up to the stored
        # mean's error over sigma, the eval's float64 roundings and the 64-term mean (~1e-9;
        # was 0.18 in float32)
        x64 = np.asarray(x)
        mean, var, _, e_mean, e_var = ref.stats_with_bounds(x64, dtype=np.float64)
        sigma = np.sqrt(var + 1e-5)
        eval_bound = ref.bn_eval_bound(x64, None, None, new["mean"], new["var"], dtype=np.float64)
        y_size = np.abs(x64 - mean) / sigma
        bound = (e_mean / sigma + eval_bound.mean(0)
                 + ref.sum_error_bound(y_size.sum(0), 64, np.float64, ulps=2) / 64)
        ref.assert_within(jnp.mean(y, 0), 0.0, bound, "mean of y")
        ref.assert_within(new["var"], var, e_var, "float64 var")
        # a default (float32) state keeps its dtype: the float64 statistics, rounded once
        _, kept = jaxbn.bn_apply(*jaxbn.bn_init(1), x, True, momentum=0.0)
        assert kept["mean"].dtype == jnp.float32
        np.testing.assert_allclose(kept["mean"], mean.ravel(), rtol=2.0**-23, atol=0)  # 1 ulp


def test_stats_dtype_refused_clearly():
    with pytest.raises(ValueError, match="stats_dtype must be float32 or float64.*bfloat16"):
        jaxbn.bn_init(2, stats_dtype=jnp.bfloat16)
    if not jax.config.read("jax_enable_x64"):
        with pytest.raises(ValueError, match="needs 64-bit JAX"):
            jaxbn.bn_init(2, stats_dtype=jnp.float64)


# ------------------------------------------------------------------------- items 3, 14


def test_unknown_param_keys_raise():
    _, state = jaxbn.bn_init(F)
    x = jnp.ones((4, F))
    bad = {"gamma": jnp.ones(F), "beta": jnp.zeros(F)}
    with pytest.raises(ValueError, match=r"params must have keys among \('scale', 'bias'\).*"
                                         r"got keys \['beta', 'gamma'\]"):
        jaxbn.bn_apply(bad, state, x, True)


def test_state_keys_missing_or_unknown_raise():
    params, state = jaxbn.bn_init(F)
    x = jnp.ones((4, F))
    with pytest.raises(ValueError, match=r"state must have keys 'mean' and 'var'.*"
                                         r"missing: \['var'\]"):
        jaxbn.bn_apply(params, {"mean": state["mean"]}, x, True)
    with pytest.raises(ValueError, match=r"unknown: \['running_mean'\]"):
        jaxbn.bn_apply(params, dict(state, running_mean=state["mean"]), x, False)


def test_params_none_and_swapped_raise():
    params, state = jaxbn.bn_init(F)
    x = jnp.ones((4, F))
    with pytest.raises(TypeError, match=r"params must be a dict.*got None"):
        jaxbn.bn_apply(None, state, x, True)
    with pytest.raises(ValueError, match="params and state look swapped"):
        jaxbn.bn_apply(state, params, x, True)
    with pytest.raises(TypeError, match=r"state must be a dict.*got None"):
        jaxbn.bn_apply(params, None, x, True)
    jaxbn.bn_apply({}, state, x, True)  # no scale, no bias: fine


# ------------------------------------------------------------------------------ item 4


def test_precise_unbiased_variance_uses_the_pooled_count():
    params, state = jaxbn.bn_init(1)
    batches = _batches(n=3)
    st = jaxbn.reset_stats(state)
    for b in batches:
        _, st = jaxbn.bn_apply(params, st, jnp.asarray(b), True, unbiased_running_var=True)
    st = jaxbn.finish_stats(st)
    # Bessel's factor once, for the 12 pooled values (per batch it would be 3/2 each time)
    _check_pooled(st["mean"], st["var"], batches, unbiased=True)


@pytest.mark.slow
def test_precise_unbiased_variance_with_ghost_batches():
    params, state = jaxbn.bn_init(1)
    batches = _batches(n=4)
    st = jaxbn.reset_stats(state)
    for b in batches:
        _, st = jaxbn.bn_apply(params, st, jnp.asarray(b), True, unbiased_running_var=True,
                               virtual_batch_size=2)
    _check_pooled(None, jaxbn.finish_stats(st)["var"], batches, unbiased=True, ghost=2)


# ------------------------------------------------------------------------------ item 5


def _folded_bound(magnitude, scale, var, beta, bias_dev, terms):
    """Bound on a Dense layer folded with an inference BatchNorm, in float32: every term of
    ``x @ (k * a) + (b - mean) * a + beta`` (``a = scale / sigma``, itself a few ulps of rsqrt
    off) rounded a few times, plus the ``terms``-term sum. ``magnitude``: ``|x| @ |k|``."""
    u = ref.unit_roundoff(np.float32)
    a = np.abs(scale) / np.sqrt(np.asarray(var, np.float64) + 1e-5)
    e_a = (ref.RSQRT_ULPS + 2) * u
    return (magnitude * a + bias_dev * a) * (e_a + (terms + 3) * u) + (terms + 3) * u * np.abs(
        np.asarray(beta, np.float64))


class _Net(nn.Module):
    use_bias: bool
    use_scale: bool = True

    @nn.compact
    def __call__(self, x):
        z = nn.Dense(F, use_bias=self.use_bias)(x)
        return jaxbn.linen.BatchNorm(use_running_average=True, use_scale=self.use_scale)(z)


@pytest.mark.slow
@pytest.mark.parametrize("use_bias, use_scale", [(False, True), (False, False), (True, True)])
def test_fold_linen_keeps_the_original_model_right(use_bias, use_scale):
    rng = np.random.RandomState(1)
    x = jnp.asarray(rng.randn(5, 4), jnp.float32)
    net = _Net(use_bias, use_scale)
    v = jax.tree.map(lambda a: a, nn.meta.unbox(net.init(jax.random.key(0), x)))
    v = {"params": dict(v["params"]), "batch_stats": dict(v["batch_stats"])}
    mean, var = rng.randn(F) * 3, rng.rand(F) * 4 + 0.5
    v["batch_stats"]["BatchNorm_0"] = {"mean": jnp.asarray(mean, jnp.float32),
                                       "var": jnp.asarray(var, jnp.float32)}
    bnp = {}
    if use_scale:
        bnp["scale"] = jnp.asarray(rng.randn(F), jnp.float32)
    bnp["bias"] = jnp.asarray(rng.randn(F), jnp.float32)
    v["params"]["BatchNorm_0"] = bnp
    folded = jaxbn.fold_linen(v, {"Dense_0": "BatchNorm_0"})
    # float64 reference: Dense then eval-mode BN
    k = np.asarray(v["params"]["Dense_0"]["kernel"], np.float64)
    z = np.asarray(x, np.float64) @ k
    if use_bias:
        z = z + np.asarray(v["params"]["Dense_0"]["bias"], np.float64)
    s = np.asarray(bnp["scale"], np.float64) if use_scale else 1.0
    want = (z - mean) / np.sqrt(var + 1e-5) * s + np.asarray(bnp["bias"], np.float64)
    bias = (np.asarray(v["params"]["Dense_0"]["bias"], np.float64) if use_bias else 0.0)
    bound = _folded_bound(np.abs(np.asarray(x, np.float64)) @ np.abs(k), s, var,
                          np.abs(bnp["bias"]), np.abs(bias - mean), 4)
    ref.assert_within(net.apply(folded, x), want, bound, "folded model")  # was off by 8
    assert ("bias" in folded["params"]["Dense_0"]) == use_bias


def test_fold_linen_bad_path_names_the_available_keys():
    x = jnp.ones((2, 4))
    v = _Net(True).init(jax.random.key(0), x)
    with pytest.raises(KeyError, match=r"layer path 'Conv_0' not found.*"
                                       r"\['BatchNorm_0', 'Dense_0'\]"):
        jaxbn.fold_linen(v, {"Conv_0": "BatchNorm_0"})
    with pytest.raises(KeyError, match=r"'BatchNorm_1' not found"):
        jaxbn.fold_linen(v, {"Dense_0": "BatchNorm_1"})
    with pytest.raises(KeyError, match="'batch_stats'"):
        jaxbn.fold_linen({"params": v["params"]}, {"Dense_0": "BatchNorm_0"})


# ------------------------------------------------------------- items 6, 16, 17, decision


@pytest.mark.slow
def test_one_value_under_vmap_of_size_one_raises():
    params, state = jaxbn.bn_init(F)
    x = jnp.ones((1, 1, F))  # axis of size 1, one example: 1 value per feature in total
    with pytest.raises(ValueError, match="1 value per feature"):
        jax.vmap(lambda v: jaxbn.bn_apply(params, state, v, True, axis_name="i"),
                 axis_name="i")(x)
    # two devices of one example each: 2 values, fine, and equal to the pooled reference
    x2 = jnp.asarray(np.random.RandomState(0).randn(2, 1, F), jnp.float32)
    y, _ = jax.vmap(lambda v: jaxbn.bn_apply(params, state, v, True, axis_name="i"),
                    axis_name="i")(x2)
    x2 = np.asarray(x2).reshape(2, F)
    ref.assert_within(np.asarray(y).reshape(2, F), ref.bn_forward(x2, None, None),
                      ref.bn_forward_bound(x2, None, None), "y")


def test_one_value_per_group_under_pmap_raises(devices):
    params, state = jaxbn.bn_init(F)
    groups = [[i] for i in range(len(devices))]
    x = jnp.ones((len(devices), 1, F))
    with pytest.raises(ValueError, match="1 value per feature"):
        jax.pmap(lambda v: jaxbn.bn_apply(params, state, v, True, axis_name="d",
                                          axis_index_groups=groups),
                 axis_name="d", devices=devices)(x)


def test_virtual_batch_size_one_raises():
    params, state = jaxbn.bn_init(F)
    with pytest.raises(ValueError, match="ghost batch of virtual_batch_size=1"):
        jaxbn.bn_apply(params, state, jnp.ones((4, F)), True, virtual_batch_size=1)


def test_allow_single_value_normalizes_with_variance_zero():
    params, state = jaxbn.bn_init(F)
    params = dict(params, bias=jnp.array([1.0, -2.0, 0.5]))
    x = jnp.array([[3.0, 4.0, 5.0]])
    with pytest.raises(ValueError, match="allow_single_value=True"):
        jaxbn.bn_apply(params, state, x, True)
    y, new = jaxbn.bn_apply(params, state, x, True, momentum=0.9, allow_single_value=True)
    np.testing.assert_array_equal(y, [[1.0, -2.0, 0.5]])  # y = bias exactly (x - mean = 0)
    ref.assert_within(new["var"], [0.9] * F, ref.ema_bound(1.0, 0.0, 0.0, 0.9),
                      "var")  # 0.9 * 1 + 0.1 * 0
    ref.assert_within(new["mean"], [0.3, 0.4, 0.5], ref.ema_bound(0.0, x[0], 0.0, 0.9), "mean")


def test_empty_batch_returns_empty_and_keeps_the_state():
    params, state = jaxbn.bn_init(F)
    state = dict(state, mean=jnp.array([1.0, 2.0, 3.0]))
    y, new = jaxbn.bn_apply(params, state, jnp.zeros((0, F)), True)
    assert y.shape == (0, F)
    for k in state:
        np.testing.assert_array_equal(new[k], state[k])  # as with an all-False mask


# --------------------------------------------------------------------------- item 12


@pytest.mark.slow
def test_numpy_integers_are_accepted():
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(4, F, 2), jnp.float32)
    params, state = jaxbn.bn_init(np.int64(F))
    params2, _ = jaxbn.bn_init(jnp.array(F))
    assert params["scale"].shape == params2["scale"].shape == (F,)
    x64 = np.asarray(x, np.float64)
    for axis in (np.int64(1), np.array(1), jnp.array(-2), (np.int32(1),)):
        y, _ = jaxbn.bn_apply(params, state, x, True, axis=axis)
        ref.assert_within(y, ref.bn_forward(x64, None, None, axis=1),
                          ref.bn_forward_bound(x64, None, None, axis=1), f"y, axis={axis!r}")
    y, _ = jaxbn.bn_apply(params, state, x[..., 0], True, virtual_batch_size=np.int64(2))
    groups = (x64[:2, :, 0], x64[2:, :, 0])
    ref.assert_within(y, np.concatenate([ref.bn_forward(g, None, None) for g in groups]),
                      np.concatenate([ref.bn_forward_bound(g, None, None) for g in groups]),
                      "ghost-batch y")


@pytest.mark.parametrize("kwargs, err, text", [
    ({"axis": 1.0}, TypeError, r"axis must be an int, got 1.0 \(float\)"),
    ({"axis": True}, TypeError, "axis must be an int, got the bool True"),
    ({"axis": (1, 1.5)}, TypeError, "must be an int, got 1.5"),
    ({"virtual_batch_size": 2.0}, TypeError, "virtual_batch_size must be an int, got 2.0"),
    ({"virtual_batch_size": True}, TypeError, "virtual_batch_size must be an int, got the bool"),
])
def test_non_integer_axis_and_sizes_refused(kwargs, err, text):
    params, state = jaxbn.bn_init(F)
    with pytest.raises(err, match=text):
        jaxbn.bn_apply(params, state, jnp.ones((4, F)), True, **kwargs)


@pytest.mark.parametrize("features", [2.0, True, "3", (2, 0)])
def test_bad_features_refused(features):
    with pytest.raises((TypeError, ValueError), match="features"):
        jaxbn.bn_init(features)


# --------------------------------------------------------------------------- item 13


@pytest.mark.parametrize("momentum, err, text", [
    ("0.9", TypeError, "momentum must be a real number, got '0.9'"),
    (True, TypeError, "momentum must be a real number, got the bool True"),
    (jnp.array(1.5), ValueError, r"momentum must be a real number in \[0, 1\].*1.5"),
    (np.float32(-0.1), ValueError, r"in \[0, 1\]"),
    (float("nan"), ValueError, r"in \[0, 1\]"),
    (jnp.ones(F) * 0.9, TypeError, "momentum must be a real number, got ArrayImpl"),
])
def test_bad_momentum_refused(momentum, err, text):
    params, state = jaxbn.bn_init(F)
    with pytest.raises(err, match=text):
        jaxbn.bn_apply(params, state, jnp.ones((4, F)), True, momentum=momentum)


def test_traced_momentum_is_accepted():
    params, state = jaxbn.bn_init(1)
    x = jnp.array([[4.0], [6.0]])
    f = jax.jit(lambda m: jaxbn.bn_apply(params, state, x, True, momentum=m)[1]["mean"])
    assert float(f(0.75)[0]) == pytest.approx(0.25 * 5.0)
    assert float(f(jnp.float32(0.5))[0]) == pytest.approx(2.5)


@pytest.mark.parametrize("epsilon, err, text", [
    (float("inf"), ValueError, "epsilon must be a finite number > 0, got inf"),
    (0.0, ValueError, "epsilon must be a finite number > 0"),
    (-1e-5, ValueError, "epsilon must be a finite number > 0"),
    (1e-50, ValueError, r"epsilon=1e-50 is zero or subnormal in float32"),
    (True, TypeError, "epsilon must be a real number, got the bool"),
    ("1e-5", TypeError, "epsilon must be a real number"),
])
def test_bad_epsilon_refused(epsilon, err, text):
    params, state = jaxbn.bn_init(F)
    for train in (True, False):
        with pytest.raises(err, match=text):
            jaxbn.bn_apply(params, state, jnp.ones((4, F)), train, epsilon=epsilon)


def test_numpy_epsilon_is_accepted():
    params, state = jaxbn.bn_init(F)
    x = jnp.asarray(np.random.RandomState(0).randn(4, F), jnp.float32)
    y, _ = jaxbn.bn_apply(params, state, x, True, epsilon=np.float32(1e-3))
    eps = float(np.float32(1e-3))  # the epsilon given
    ref.assert_within(y, ref.bn_forward(np.asarray(x), None, None, eps=eps),
                      ref.bn_forward_bound(np.asarray(x), None, None, eps=eps), "y")


# --------------------------------------------------------------------------- item 15


@pytest.mark.parametrize("groups, text", [
    ([[0, 1], [2, 3]], r"missing: \[4, 5, 6, 7\]"),
    ([[0, 1], [1, 2], [3, 4], [5, 6]], r"repeated: \[1\].*missing: \[7\]"),
    ([[0, 8], [1, 2], [3, 4], [5, 6]], r"out of range: \[8\]"),
])
def test_axis_index_groups_must_partition_the_devices(devices, groups, text):
    params, state = jaxbn.bn_init(F)
    x = jnp.ones((len(devices), 2, F))
    with pytest.raises(ValueError, match="axis_index_groups must split the 8 device indices "
                                         r"0..7 of axis_name='d'.*" + text):
        jax.pmap(lambda v: jaxbn.bn_apply(params, state, v, True, axis_name="d",
                                          axis_index_groups=groups),
                 axis_name="d", devices=devices)(x)


# ---------------------------------------------------- issue 11: feature-sharded Explicit mesh


@pytest.mark.parametrize("opts", [{}, {"momentum": None}, {"skip_nonfinite": True},
                                  {"unbiased_running_var": True}, {"renorm": (3.0, 5.0)},
                                  {"mask": "rows"}],
                         ids=["plain", "cumulative", "skip_nonfinite", "unbiased", "renorm",
                              "mask"])
def test_feature_sharded_explicit_mesh(devices, opts):
    mesh = jax.make_mesh((4,), ("m",), devices=devices[:4])
    rng = np.random.RandomState(0)
    x = (rng.randn(16, 8) * 2 + 3).astype(np.float32)
    mask = None
    opts = dict(opts)
    if opts.get("mask") == "rows":
        mask = rng.rand(16, 1) > 0.3
        opts["mask"] = jnp.asarray(mask)
    params, state = jaxbn.bn_init(8)
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P(None, "m")))
        y, new = jax.jit(lambda v, s: jaxbn.bn_apply(params, s, v, True, **opts))(xs, state)
    assert y.sharding.spec == P(None, "m")
    assert new["mean"].sharding.spec == P("m") and new["var"].sharding.spec == P("m")
    mean, var, n, e_mean, e_var = ref.stats_with_bounds(x, mask=mask)
    if "renorm" not in opts:  # renorm's y depends on the running statistics (r, d clipped)
        ref.assert_within(y, ref.bn_forward(x, None, None, mask=mask),
                          ref.bn_forward_bound(x, None, None, mask=mask), "y")
    if opts.get("unbiased_running_var"):
        e_var = (e_var + 3 * ref.unit_roundoff(np.float32) * var) * n / (n - 1)
        var = var * n / (n - 1)
    if "momentum" in opts:  # cumulative average of one batch: the batch statistics
        want = {"mean": (mean, ref.cumulative_bound(0.0, mean, 0.0, e_mean, 0)),
                "var": (var, ref.cumulative_bound(1.0, var, 0.0, e_var, 0))}
    else:
        want = {"mean": (0.01 * mean, ref.ema_bound(0.0, mean, e_mean, 0.99)),
                "var": (0.99 + 0.01 * var, ref.ema_bound(1.0, var, e_var, 0.99))}
    for k, (value, bound) in want.items():
        ref.assert_within(new[k], value, bound, f"running {k}")


def test_fold_linen_add_bias_for_a_model_rebuilt_with_biases():
    rng = np.random.RandomState(2)
    x = jnp.asarray(rng.randn(5, 4), jnp.float32)
    v = _Net(False).init(jax.random.key(0), x)
    v = {"params": dict(v["params"]), "batch_stats": dict(v["batch_stats"])}
    mean, var = rng.randn(F) * 3, rng.rand(F) * 4 + 0.5
    v["batch_stats"]["BatchNorm_0"] = {"mean": jnp.asarray(mean, jnp.float32),
                                       "var": jnp.asarray(var, jnp.float32)}
    folded = jaxbn.fold_linen(v, {"Dense_0": "BatchNorm_0"}, add_bias=True)
    k = np.asarray(v["params"]["Dense_0"]["kernel"], np.float64)
    z = np.asarray(x, np.float64) @ k
    want = (z - mean) / np.sqrt(var + 1e-5)
    bound = _folded_bound(np.abs(np.asarray(x, np.float64)) @ np.abs(k), 1.0, var, 0.0,
                          np.abs(mean), 4)
    ref.assert_within(_Net(True).apply(folded, x), want, bound, "rebuilt model")
