"""The functional core against the float64 NumPy reference (tests/reference.py)."""

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import jaxbn
from tests import reference as ref

CASES = [  # (shape, axis)
    ((16, 3), -1),
    ((4, 5, 6, 3), -1),  # NHWC
    ((4, 3, 5, 6), 1),  # NCHW
    ((4, 3, 5, 2), (1, 3)),  # two feature axes
]


def _features(shape, axis):
    axes = (axis,) if isinstance(axis, int) else axis
    return tuple(shape[a] for a in sorted(a % len(shape) for a in axes))


def _random_params(feats, seed=0):
    rng = np.random.default_rng(seed)
    params = {"scale": jnp.asarray(rng.uniform(0.5, 2.0, feats), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=feats), jnp.float32)}
    state = {"mean": jnp.asarray(rng.normal(size=feats), jnp.float32),
             "var": jnp.asarray(rng.uniform(0.5, 2.0, feats), jnp.float32),
             "count": jnp.zeros((), jnp.int32)}
    return params, state


def _check_state(new, state, x, axis, mask, momentum, keys=("mean", "var")):
    """The running statistics against the float64 EMA, within the EMA's float32 error bound
    (the batch statistic's bound, see tests.reference.moments_bound, then the update's)."""
    feats = _features(np.shape(x), axis)
    mo = ref.moments_bound(x, axis, mask)
    for k in keys:
        batch = mo[k].reshape(feats)
        ref.assert_within(new[k], ref.ema(state[k], batch, momentum),
                          ref.ema_bound(state[k], batch, mo[f"e_{k}_stored"].reshape(feats),
                                        momentum), f"running {k}")


@functools.partial(jax.jit, static_argnames=("train", "axis", "momentum"))
def _apply(params, state, x, mask=None, *, train, axis, momentum=0.99):
    return jaxbn.bn_apply(params, state, x, train, axis=axis, momentum=momentum, mask=mask)


def test_init_shapes_and_dtypes():
    params, state = jaxbn.bn_init((3, 4), param_dtype=jnp.bfloat16)
    assert params["scale"].shape == (3, 4) and params["scale"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(params["scale"], 1)
    np.testing.assert_array_equal(params["bias"], 0)
    np.testing.assert_array_equal(state["mean"], 0)
    np.testing.assert_array_equal(state["var"], 1)
    assert state["mean"].dtype == jnp.float32 and state["var"].dtype == jnp.float32
    assert set(jaxbn.bn_init(3, use_scale=False)[0]) == {"bias"}
    assert set(jaxbn.bn_init(3, use_bias=False)[0]) == {"scale"}
    assert jaxbn.bn_init(3, use_bias=False, use_scale=False)[0] == {}


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_train_matches_reference(shape, axis, masked):
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, shape).astype(np.float32)
    feats = _features(shape, axis)
    params, state = _random_params(feats)
    mask = None
    if masked:  # mask varies along the batch axis only; broadcasts over the rest
        mask = rng.random((shape[0],) + (1,) * (len(shape) - 1)) < 0.6
        mask[0] = True
    y, new = _apply(params, state, jnp.asarray(x), mask, train=True, axis=axis, momentum=0.9)
    ref.assert_within(y, ref.bn_forward(x, params["scale"], params["bias"], axis, mask),
                      ref.bn_forward_bound(x, params["scale"], params["bias"], axis, mask), "y")
    _check_state(new, state, x, axis, mask, 0.9)
    assert int(new["count"]) == 1


@pytest.mark.parametrize("shape,axis", CASES[:3])
def test_eval_uses_running_stats_and_keeps_state(shape, axis):
    x = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    params, state = _random_params(_features(shape, axis))
    y, new = _apply(params, state, jnp.asarray(x), train=False, axis=axis)
    args = (x, params["scale"], params["bias"], state["mean"], state["var"], axis)
    ref.assert_within(y, ref.bn_eval(*args), ref.bn_eval_bound(*args), "eval y")
    jax.tree.map(np.testing.assert_array_equal, new, state)
    assert jaxbn.bn_apply(params, state, jnp.asarray(x), False, axis=axis)[1] is state


@pytest.mark.parametrize("momentum", [0.0, 0.5, 1.0])
def test_momentum_extremes(momentum):
    x = np.random.default_rng(3).normal(5.0, 2.0, (8, 2)).astype(np.float32)
    params, state = _random_params((2,))
    _, new = _apply(params, state, jnp.asarray(x), train=True, axis=-1, momentum=momentum)
    _check_state(new, state, x, -1, None, momentum)


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(st.data())
def test_random_shapes_and_axes(data):
    ndim = data.draw(st.integers(1, 4), label="ndim")
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    axes = data.draw(st.lists(st.integers(-ndim, ndim - 1), min_size=1, max_size=ndim,
                              unique_by=lambda a: a % ndim), label="axes")
    axis = axes[0] if len(axes) == 1 else tuple(axes)
    feats = _features(shape, axis)
    n = int(np.prod(shape)) // int(np.prod(feats))
    if n < 2:
        shape = (2,) + shape
        axis = tuple(a % ndim + 1 for a in axes)
        feats = _features(shape, axis)
    x = np.random.default_rng(4).normal(size=shape).astype(np.float32)
    params, state = _random_params(feats)
    y, new = jaxbn.bn_apply(params, state, jnp.asarray(x), True, axis=axis)
    ref.assert_within(y, ref.bn_forward(x, params["scale"], params["bias"], axis),
                      ref.bn_forward_bound(x, params["scale"], params["bias"], axis), "y")
    _check_state(new, state, x, axis, None, 0.99)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape,axis", [CASES[1], CASES[2]])
def test_gradients_match_closed_form(shape, axis, masked):
    rng = np.random.default_rng(5)
    x = rng.normal(1.0, 2.0, shape).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    params, state = _random_params(_features(shape, axis))
    mask = None
    if masked:
        mask = rng.random(shape) < 0.7

    def loss(p, x):
        y, _ = jaxbn.bn_apply(p, state, x, True, axis=axis, mask=mask)
        return jnp.sum(y * dy)

    gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, jnp.asarray(x))
    want = ref.bn_grads(x, params["scale"], dy, axis, mask)
    bounds = ref.bn_grads_bound(x, params["scale"], dy, axis, mask)
    for got, w, b, what in zip((gx, gp["scale"], gp["bias"]), want, bounds,
                               ("dx", "dscale", "dbias"), strict=True):
        ref.assert_within(got, w, b, what)


@pytest.mark.slow
def test_gradient_without_scale_and_bias():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(12, 3)).astype(np.float32)
    dy = rng.normal(size=(12, 3)).astype(np.float32)
    params, state = jaxbn.bn_init(3, use_scale=False, use_bias=False)
    gx = jax.grad(lambda x: jnp.sum(jaxbn.bn_apply(params, state, x, True)[0] * dy))(x)
    ref.assert_within(gx, ref.bn_grads(x, None, dy)[0], ref.bn_grads_bound(x, None, dy)[0], "dx")


@pytest.mark.slow
def test_running_stats_carry_no_gradient():
    x = jnp.asarray(np.random.default_rng(7).normal(size=(8, 2)), jnp.float32)
    params, state = jaxbn.bn_init(2)
    g = jax.grad(lambda x: jnp.sum(jaxbn.bn_apply(params, state, x, True)[1]["var"]))(x)
    np.testing.assert_array_equal(g, 0.0)


@pytest.mark.slow
def test_jit_equals_eager():
    """Eager and jitted calls (fused differently, summing in other orders) each within the
    float32 bound of the float64 reference, rather than within a fixed distance of each other."""
    x = np.random.default_rng(8).normal(size=(6, 4, 3)).astype(np.float32)
    params, state = _random_params((3,))
    eager = jaxbn.bn_apply(params, state, jnp.asarray(x), True)
    jitted = jax.jit(jaxbn.bn_apply, static_argnames="train")(params, state, jnp.asarray(x),
                                                              train=True)
    want = ref.bn_forward(x, params["scale"], params["bias"])
    bound = ref.bn_forward_bound(x, params["scale"], params["bias"])
    for (y, new), what in ((eager, "eager"), (jitted, "jit")):
        ref.assert_within(y, want, bound, f"{what} y")
        _check_state(new, state, x, -1, None, 0.99)
        assert int(new["count"]) == 1


@pytest.mark.slow
def test_vmap_ensemble_equals_loop():
    rng = np.random.default_rng(9)
    k = 3
    xs = jnp.asarray(rng.normal(size=(k, 10, 4)), jnp.float32)
    ens = [_random_params((4,), seed=s) for s in range(k)]
    params = jax.tree.map(lambda *a: jnp.stack(a), *[e[0] for e in ens])
    states = jax.tree.map(lambda *a: jnp.stack(a), *[e[1] for e in ens])
    ys, new = jax.vmap(lambda p, s, x: jaxbn.bn_apply(p, s, x, True))(params, states, xs)
    for i in range(k):  # member i: its own parameters, state and batch (float64 reference)
        p_i, s_i, x_i = ens[i][0], ens[i][1], np.asarray(xs[i])
        ref.assert_within(ys[i], ref.bn_forward(x_i, p_i["scale"], p_i["bias"]),
                          ref.bn_forward_bound(x_i, p_i["scale"], p_i["bias"]), f"y of {i}")
        _check_state(jax.tree.map(lambda a, i=i: a[i], new), s_i, x_i, -1, None, 0.99)


@pytest.mark.slow
def test_scan_and_checkpoint_compose():
    rng = np.random.default_rng(10)
    xs = jnp.asarray(rng.normal(3.0, 2.0, size=(4, 8, 2)), jnp.float32)
    params, state = jaxbn.bn_init(2)

    def step(s, x):
        y, s = jax.checkpoint(lambda s, x: jaxbn.bn_apply(params, s, x, True, momentum=0.5))(s, x)
        return s, jnp.sum(y ** 2)

    final, _ = jax.jit(lambda s: jax.lax.scan(step, s, xs))(state)
    run = {"mean": (np.zeros(2), 0.0), "var": (np.ones(2), 0.0)}  # (value, error bound)
    for x in np.asarray(xs):
        mo = ref.moments_bound(x)
        run = {k: (ref.ema(old, mo[k].ravel(), 0.5),
                   ref.ema_bound(old, mo[k].ravel(), mo[f"e_{k}_stored"].ravel(), 0.5,
                                 e_old=e_old)) for k, (old, e_old) in run.items()}
    for k, (want, bound) in run.items():
        ref.assert_within(final[k], want, bound, f"running {k} after 4 steps")
    assert int(final["count"]) == 4
    # gradient through scan + checkpoint equals the closed form step by step
    dy = rng.normal(size=(8, 2)).astype(np.float32)
    g = jax.grad(lambda x: jnp.sum(jax.checkpoint(
        lambda x: jaxbn.bn_apply(params, state, x, True)[0])(x) * dy))(xs[0])
    ref.assert_within(g, ref.bn_grads(xs[0], params["scale"], dy)[0],
                      ref.bn_grads_bound(xs[0], params["scale"], dy)[0], "dx")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs(dtype):
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(4.0, 2.0, (16, 6, 3)), dtype)
    params, state = jaxbn.bn_init(3)
    y, new = jaxbn.bn_apply(params, state, x, True, momentum=0.999)
    assert y.dtype == dtype
    assert new["mean"].dtype == jnp.float32 and new["var"].dtype == jnp.float32
    x64 = np.asarray(x.astype(jnp.float32), np.float64)  # the values actually given
    # float32 statistics and arithmetic, then one rounding of y to dtype
    ref.assert_within(y, ref.bn_forward(x64, None, None),
                      ref.bn_forward_bound(x64, None, None, out_dtype=dtype), "y")
    _check_state(new, state, x64, -1, None, 0.999)
    assert bool(jnp.all(new["var"] != 1.0))  # momentum 0.999 did not round away the update
    yb, _ = jaxbn.bn_apply(params, new, x, False)
    assert yb.dtype == dtype


def test_large_offset_is_stable():
    rng = np.random.default_rng(12)
    x = (1e4 + rng.normal(size=(256, 4))).astype(np.float32)
    params, state = jaxbn.bn_init(4)
    y, new = jax.jit(lambda x: jaxbn.bn_apply(params, state, x, True, momentum=0.0))(x)
    # the stable algorithm's bound scales with the spread (1), not the mean (1e4): ~1e-4 on y
    # where one-pass E[x^2] - E[x]^2 is off by O(1) and a plain float32 mean by ~1e-3
    ref.assert_within(y, ref.bn_forward(x, None, None), ref.bn_forward_bound(x, None, None),
                      "y")
    _check_state(new, state, x, -1, None, 0.0)


@pytest.mark.slow
def test_fully_masked_batch_leaves_state_and_no_nan():
    x = jnp.asarray(np.random.default_rng(13).normal(size=(6, 2)), jnp.float32)
    params, state = _random_params((2,))
    mask = np.zeros((6, 1), bool)
    y, new = jaxbn.bn_apply(params, state, x, True, mask=mask)
    assert bool(jnp.all(jnp.isfinite(y)))
    np.testing.assert_array_equal(new["mean"], state["mean"])
    np.testing.assert_array_equal(new["var"], state["var"])
    gx = jax.grad(lambda x: jnp.sum(jaxbn.bn_apply(params, state, x, True, mask=mask)[0]))(x)
    assert bool(jnp.all(jnp.isfinite(gx)))


class TestErrors:
    params, state = jaxbn.bn_init(3)
    x = jnp.ones((4, 3))

    def test_feature_mismatch(self):
        with pytest.raises(ValueError, match=r"shape \(3,\).*features \(5,\)"):
            jaxbn.bn_apply(self.params, self.state, jnp.ones((4, 5)), True)

    @pytest.mark.parametrize("momentum", [-0.1, 1.5])
    def test_momentum(self, momentum):
        with pytest.raises(ValueError, match="momentum"):
            jaxbn.bn_apply(self.params, self.state, self.x, True, momentum=momentum)

    @pytest.mark.parametrize("eps", [0.0, -1e-5])
    def test_epsilon(self, eps):
        with pytest.raises(ValueError, match="epsilon"):
            jaxbn.bn_apply(self.params, self.state, self.x, True, epsilon=eps)

    def test_integer_input(self):
        with pytest.raises(TypeError, match="floating.*int32"):
            jaxbn.bn_apply(self.params, self.state, jnp.ones((4, 3), jnp.int32), True)

    def test_axis_out_of_range(self):
        with pytest.raises(ValueError, match="axis 2 is out of range"):
            jaxbn.bn_apply(self.params, self.state, self.x, True, axis=2)

    def test_mask_shape(self):
        with pytest.raises(ValueError, match=r"mask of shape \(5, 1\)"):
            jaxbn.bn_apply(self.params, self.state, self.x, True, mask=jnp.ones((5, 1), bool))

    def test_mask_dtype(self):
        with pytest.raises(TypeError, match="boolean"):
            jaxbn.bn_apply(self.params, self.state, self.x, True, mask=jnp.ones((4, 1)))

    def test_single_element_per_feature(self):
        with pytest.raises(ValueError, match="more than one value per feature"):
            jaxbn.bn_apply(self.params, self.state, jnp.ones((1, 3)), True)
        jaxbn.bn_apply(self.params, self.state, jnp.ones((1, 3)), False)  # eval is fine

    def test_unbound_axis_name(self):
        with pytest.raises(NameError, match="'batch' is not bound"):
            jax.jit(lambda x: jaxbn.bn_apply(self.params, self.state, x, True,
                                             axis_name="batch"))(self.x)

    def test_traced_train_flag(self):
        with pytest.raises(TypeError, match="Python bool"):
            jax.jit(lambda t: jaxbn.bn_apply(self.params, self.state, self.x, t))(True)

    def test_groups_without_axis_name(self):
        with pytest.raises(ValueError, match="axis_index_groups"):
            jaxbn.bn_apply(self.params, self.state, self.x, True, axis_index_groups=[[0, 1]])


@pytest.mark.slow
@pytest.mark.parametrize("shape,axis", [CASES[1], CASES[2]])
def test_side_by_side_with_flax_stable_mode(shape, axis):
    import flax.linen as nn

    rng = np.random.default_rng(14)
    x = jnp.asarray(rng.normal(3.0, 2.0, shape), jnp.float32)
    mod = nn.BatchNorm(use_running_average=False, axis=axis, momentum=0.9,
                       use_fast_variance=False)
    variables = mod.init(jax.random.key(0), x)
    y_flax, upd = mod.apply(variables, x, mutable=["batch_stats"])
    params = dict(variables["params"])
    state = dict(variables["batch_stats"])
    y, new = jaxbn.bn_apply(params, state, x, True, axis=axis, momentum=0.9)
    # each within its float32 bound of the float64 truth (Flax's plain two-pass mean: stable=False)
    x64 = np.asarray(x, np.float64)
    ref.assert_within(y, y_flax, ref.bn_forward_bound(x64, None, None, axis) + (
        ref.bn_forward_bound(x64, None, None, axis, stable=False)), "y vs Flax")
    feats = _features(shape, axis)
    ours, theirs = ref.moments_bound(x64, axis), ref.moments_bound(x64, axis, stable=False)
    for k in ("mean", "var"):
        old, batch = state[k], ours[k].reshape(feats)
        bound = sum(ref.ema_bound(old, batch, mo[f"e_{k}_stored"].reshape(feats), 0.9)
                    for mo in (ours, theirs))
        ref.assert_within(new[k], upd["batch_stats"][k], bound, f"running {k} vs Flax")


def test_gradient_with_large_offset_matches_closed_form():
    rng = np.random.default_rng(15)
    x = (1e4 + rng.normal(size=(64, 3))).astype(np.float32)
    dy = rng.normal(size=(64, 3)).astype(np.float32)
    params, state = _random_params((3,))
    gx = jax.jit(jax.grad(lambda x: jnp.sum(jaxbn.bn_apply(params, state, x, True)[0] * dy)))(x)
    # bounded by the spread (1), not the offset (1e4), as in the forward pass
    ref.assert_within(gx, ref.bn_grads(x, params["scale"], dy)[0],
                      ref.bn_grads_bound(x, params["scale"], dy)[0], "dx")
