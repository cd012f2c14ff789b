"""Precision and robustness of the core against float64 NumPy: FMA contraction, large offsets,
padding that holds anything, features with no valid element, rank promotion, forward mode and
the residuals reverse mode keeps."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxbn
from tests import reference as ref

F = 3


def _params(feats=F, seed=0):
    rng = np.random.default_rng(seed)
    return {"scale": jnp.asarray(rng.uniform(0.5, 2.0, feats), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=feats), jnp.float32)}


def test_mean_is_correctly_rounded_under_jit():
    """XLA:CPU fuses sum * (1/n) into x - m0 as an FMA unless m0 is opaque; the deviations are
    then taken about the unrounded product and corr corrects the wrong m0. The corrected
    two-pass mean must be the float64 mean correctly rounded (n = 100: 1/n is inexact)."""
    rng = np.random.default_rng(0)
    x = (123.456 + 0.1 * rng.normal(size=(100, 1024))).astype(np.float32)
    params, state = jaxbn.bn_init(1024)
    _, new = jax.jit(lambda x: jaxbn.bn_apply(params, state, x, True, momentum=0.0))(x)
    truth = x.astype(np.float64).mean(0)
    nearest = truth.astype(np.float32)
    half_ulp = np.spacing(nearest).astype(np.float64) / 2
    rounded_err = np.abs(nearest.astype(np.float64) - truth)
    err = np.abs(np.asarray(new["mean"], np.float64) - truth)
    # Before its rounding, the corrected mean is within e_mean (~0.06 ulp here, whatever the
    # summation order) of the truth: rounded, within half an ulp more, and equal to the
    # correctly rounded truth unless that lies within e_mean of a tie. Contracted (the bug):
    # max 0.97 ulp, 26% of features not the correctly rounded truth.
    e_mean = ref.moments_bound(x)["e_mean"].ravel()
    ref.assert_within(new["mean"], truth, half_ulp + e_mean, "mean")
    not_nearest = err > rounded_err
    near_tie = half_ulp - rounded_err <= e_mean
    assert np.all(near_tie[not_nearest]), (
        f"{int(np.sum(not_nearest & ~near_tie))} features not correctly rounded")


def test_output_at_a_large_offset_matches_float64():
    """Single device, 1e6 + N(0, 1): the mean is subtracted as its two floats.

    The bound scales with the deviations about the first pass's mean, not with 1e6; but that
    mean is itself off by up to ~(N + 3) u 1e6 in the worst summation order, which the
    deviations inherit: 32 rows keep the bound near 1e-4 (256 would allow 3e-2), while a
    rounded mean (half an ulp of 1e6: 0.03) moves y by up to 0.06 (8 features: some near that).
    """
    rng = np.random.default_rng(1)
    feats = 8
    x = (1e6 + rng.normal(size=(32, feats))).astype(np.float32)
    params = _params(feats)
    _, state = jaxbn.bn_init(feats)
    y, _ = jax.jit(lambda x: jaxbn.bn_apply(params, state, x, True))(x)
    ref.assert_within(y, ref.bn_forward(x, params["scale"], params["bias"]),
                      ref.bn_forward_bound(x, params["scale"], params["bias"]), "y")


@pytest.mark.slow
@pytest.mark.parametrize("padding", [np.nan, np.inf, -np.inf, 3.0e38])
def test_padding_holds_anything(padding):
    """Masked-out rows cannot influence valid outputs, statistics or gradients."""
    rng = np.random.default_rng(2)
    valid = rng.normal(2.0, 3.0, (6, F)).astype(np.float32)
    x = np.concatenate([valid, np.full((2, F), padding, np.float32)])
    mask = np.array([True] * 6 + [False] * 2)[:, None]
    dy = rng.normal(size=(8, F)).astype(np.float32)
    params = _params()
    _, state = jaxbn.bn_init(F)

    def loss(p, x, m):
        y, new = jaxbn.bn_apply(p, state, x, True, mask=m, momentum=0.5)
        n = x.shape[0] if m is None else 6
        return jnp.sum(jnp.where(m if m is not None else True, y, 0)[:n] * dy[:n]), (y, new)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    (gp, gx), (y, new) = grad(params, jnp.asarray(x), mask)
    (gp0, gx0), (y0, new0) = grad(params, jnp.asarray(valid), None)
    assert np.all(gx[6:] == 0)
    # With and without the padded rows (which XLA may sum in another order), the valid
    # outputs, statistics and gradients are those of the 6 valid rows: each run within the
    # float32 bound of the float64 reference on them.
    y_ref = ref.bn_forward(valid, params["scale"], params["bias"])
    y_bound = ref.bn_forward_bound(valid, params["scale"], params["bias"])
    mo = ref.moments_bound(valid)
    grads_ref = ref.bn_grads(valid, params["scale"], dy[:6])
    grads_bound = ref.bn_grads_bound(valid, params["scale"], dy[:6])
    for run, (g_p, g_x, y_, new_) in (("padded", (gp, gx, y, new)),
                                      ("unpadded", (gp0, gx0, y0, new0))):
        ref.assert_within(y_[:6], y_ref, y_bound, f"{run} y")
        for k in ("mean", "var"):
            old, batch = state[k], mo[k].ravel()
            ref.assert_within(new_[k], ref.ema(old, batch, 0.5), ref.ema_bound(
                old, batch, mo[f"e_{k}_stored"].ravel(), 0.5), f"{run} running {k}")
        for got, want, bound, what in zip((g_x[:6], g_p["scale"], g_p["bias"]), grads_ref,
                                          grads_bound, ("dx", "dscale", "dbias"), strict=True):
            ref.assert_within(got, want, bound, f"{run} {what}")


@pytest.mark.slow
def test_feature_without_valid_element_uses_running_statistics():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, F)).astype(np.float32) * 10
    mask = np.ones((5, F), bool)
    mask[:, 1] = False  # feature 1 has no valid element
    params = _params()
    state = {"mean": jnp.array([0.5, -1.0, 2.0]), "var": jnp.array([2.0, 4.0, 0.5]),
             "count": jnp.zeros((), jnp.int32)}
    y, new = jaxbn.bn_apply(params, state, jnp.asarray(x), True, mask=mask)
    args = (x, params["scale"], params["bias"], state["mean"], state["var"])
    ref.assert_within(y[:, 1], ref.bn_eval(*args)[:, 1], ref.bn_eval_bound(*args)[:, 1],
                      "y of the empty feature")
    args = (x, params["scale"], params["bias"], -1, mask)
    ref.assert_within(y[:, [0, 2]], ref.bn_forward(*args)[:, [0, 2]],
                      ref.bn_forward_bound(*args)[:, [0, 2]], "y of the other features")
    # the empty feature's running statistics are left as they were
    assert float(new["mean"][1]) == -1.0 and float(new["var"][1]) == 4.0
    gx = jax.grad(lambda x: jnp.sum(jaxbn.bn_apply(params, state, x, True, mask=mask)[0]))(x)
    assert np.all(np.isfinite(gx))


@pytest.mark.slow
def test_clean_under_rank_promotion_raise():
    """Flax's CI runs with jax_numpy_rank_promotion='raise'; so must every jaxbn path."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, 2, 5, F)).astype(np.float32)
    mask = rng.random((4, 2, 5)) < 0.7
    params = _params()
    _, state = jaxbn.bn_init(F)
    with jax.numpy_rank_promotion("raise"):
        def dev(x, m):
            y, new = jaxbn.bn_apply(params, state, x, True, axis_name="d", mask=m[..., None])
            return y, new
        f = jax.vmap(jax.grad(lambda x, m: jnp.sum(dev(x, m)[0] ** 2)), axis_name="d")
        g = f(x, mask)
        y, _ = jax.vmap(dev, axis_name="d")(x, mask)
        jax.jvp(lambda x: jaxbn.bn_apply(params, state, x, True, mask=mask[0, :, :, None],
                                         )[0],
                (x[0],), (x[0],))
    assert np.all(np.isfinite(g))
    args = (x.reshape(-1, F), params["scale"], params["bias"], -1, mask.reshape(-1, 1))
    ref.assert_within(np.asarray(y).reshape(-1, F), ref.bn_forward(*args),
                      ref.bn_forward_bound(*args), "y")


def _plain_bn64(x, scale, bias, mask=None, eps=1e-5):
    """Plain float64 jnp BatchNorm (mask as weights), differentiable in every mode by JAX."""
    w = jnp.ones_like(x) if mask is None else jnp.broadcast_to(mask, x.shape).astype(x.dtype)
    n = w.sum(0, keepdims=True)
    mean = (w * x).sum(0, keepdims=True) / n
    var = (w * (x - mean) ** 2).sum(0, keepdims=True) / n
    return (x - mean) / jnp.sqrt(var + eps) * scale[None] + bias[None]


@pytest.mark.slow
@pytest.mark.parametrize("masked", [False, True])
def test_forward_mode_matches_plain_float64(masked):
    rng = np.random.default_rng(5)
    x = rng.normal(1.0, 2.0, (6, F))
    mask = (rng.random((6, 1)) < 0.7) if masked else None
    with jax.enable_x64(True):
        p = {k: v.astype(jnp.float64) for k, v in _params().items()}
        _, state = jaxbn.bn_init(F, stats_dtype=jnp.float64)
        x64 = jnp.asarray(x)

        @jax.jit  # compiled once per transform (op-by-op dispatch of check_grads: 30 s)
        def ours(x, p):
            return jaxbn.bn_apply(p, state, x, True, mask=mask)[0]

        @jax.jit
        def plain(x, p):
            return _plain_bn64(x, p["scale"], p["bias"], mask)

        tangent = (jnp.asarray(rng.normal(size=x.shape)),
                   jax.tree.map(lambda a: jnp.ones_like(a) * 0.3, p))
        # Two float64 computations of O(1-100) values from 6 rows: their rounding errors are
        # ~1e-14 at most; 1e-10 (1e-8 for the cubic's Hessian) is loose but a wrong rule is
        # off by O(1).
        for a, b in zip(jax.jvp(ours, (x64, p), tangent), jax.jvp(plain, (x64, p), tangent),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(jax.jacfwd(ours)(x64, p), jax.jacfwd(plain)(x64, p),
                                   rtol=1e-10, atol=1e-10)
        _, lin = jax.linearize(ours, x64, p)
        _, lin_ref = jax.linearize(plain, x64, p)
        np.testing.assert_allclose(lin(*tangent), lin_ref(*tangent), rtol=1e-10, atol=1e-10)

        def cubic(fn):
            return lambda x: jnp.sum(fn(x, p) ** 3)

        np.testing.assert_allclose(jax.hessian(cubic(ours))(x64), jax.hessian(cubic(plain))(x64),
                                   rtol=1e-8, atol=1e-8)
        check_grads(ours, (x64, p), order=2, modes=("fwd", "rev"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_reverse_mode_saves_only_the_input(dtype):
    """Residuals: x itself (1x its bytes) and per-feature vectors, whatever the dtype."""
    x = jnp.ones((16, 4, 4, 8), dtype)
    params, state = jaxbn.bn_init(8)

    def f(x, p):
        return jaxbn.bn_apply(p, state, x, True)[0]

    _, vjp_fn = jax.vjp(f, x, params)  # a pytree whose leaves are what reverse mode keeps
    saved = [leaf for leaf in jax.tree.leaves(vjp_fn) if hasattr(leaf, "size")]
    big = [a for a in saved if a.size > 8]
    assert sum(a.size * a.dtype.itemsize for a in big) <= x.size * x.dtype.itemsize, [
        (a.shape, a.dtype) for a in saved]


@pytest.mark.slow
def test_forward_mode_through_the_flax_wrappers_matches_flax():
    """jvp through jaxbn.linen and jaxbn.nnx in training mode equals Flax's own (plain jnp)."""
    import flax.linen as nn
    from flax import nnx

    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(1.0, 2.0, (8, F)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(8, F)), jnp.float32)
    ours = jaxbn.linen.BatchNorm(use_running_average=False, use_fast_variance=False)
    theirs = nn.BatchNorm(use_running_average=False, use_fast_variance=False)
    v = theirs.init(jax.random.key(0), x)

    def call(mod):
        return lambda x: mod.apply(v, x, mutable=["batch_stats"])[0]

    want = jax.jvp(call(theirs), (x,), (t,))
    got = jax.jvp(call(ours), (x,), (t,))
    # BatchNorm's Jacobian is symmetric: the tangent for t has dx's form for dy = t, and each
    # is within its float32 bound of the float64 truth (Flax's plain mean: stable=False)
    x64 = np.asarray(x, np.float64)

    def tangent_bound(t):
        return sum(ref.bn_grads_bound(x64, None, t, stable=stable)[0] for stable in (True, False))

    ref.assert_within(got[1], want[1], tangent_bound(np.asarray(t, np.float64)), "linen jvp")
    unit = np.eye(x.size).reshape((x.size,) + x.shape)  # the tangent of each column of J
    jac_bound = np.stack([tangent_bound(e) for e in unit], axis=-1).reshape(x.shape * 2)
    ref.assert_within(jax.jacfwd(call(ours))(x), jax.jacfwd(call(theirs))(x), jac_bound,
                      "linen jacfwd")

    def nnx_jvp(cls):
        graphdef, state = nnx.split(cls(F, use_fast_variance=False, rngs=nnx.Rngs(0)))
        zeros = jax.tree.map(jnp.zeros_like, state)
        return jax.jvp(lambda x, s: nnx.merge(graphdef, s)(x), (x, state), (t, zeros))[1]

    ref.assert_within(nnx_jvp(jaxbn.nnx.BatchNorm), nnx_jvp(nnx.BatchNorm),
                      tangent_bound(np.asarray(t, np.float64)), "nnx jvp")


@pytest.mark.parametrize("sync", [False, True], ids=["one_device", "8_devices_offset"])
def test_gradients_at_a_large_offset_match_float64(sync):
    """The backward's full-size passes subtract the provisional mean alone (issue 20):
    ``sum(xhat * dy)`` is taken as ``(sum((x - m0) * dy) - corr * sum(dy)) / sigma``. At
    1e4 + N(0, 1), on one device and over 8 devices whose batches sit 3 apart (there ``corr``,
    the offset of one device's provisional mean from the global mean, is far from 0), the
    gradients stay within their float32 bounds of the float64 closed form."""
    rng = np.random.default_rng(5)
    d, rows = 8, 32
    offsets = 3.0 * np.arange(d)[:, None, None] if sync else 0.0
    x = (1e4 + offsets + rng.normal(size=(d, rows, F))).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    params = _params()
    _, state = jaxbn.bn_init(F)

    def loss(p, x, dy, axis_name=None):
        y, _ = jaxbn.bn_apply(p, state, x, True, axis_name=axis_name)
        return jnp.sum(y * dy)

    grad = jax.grad(loss, argnums=(0, 1))
    if sync:
        g_p, g_x = jax.jit(jax.vmap(functools.partial(grad, axis_name="d"), in_axes=(None, 0, 0),
                                    axis_name="d"))(params, x, dy)
        g_p = jax.tree.map(lambda g: g.sum(0), g_p)  # per-device gradients of replicated params
    else:
        g_p, g_x = jax.jit(grad)(params, x.reshape(-1, F), dy.reshape(-1, F))
    flat_x, flat_dy = x.reshape(-1, F), dy.reshape(-1, F)
    want = ref.bn_grads(flat_x, params["scale"], flat_dy)
    bound = ref.bn_grads_bound(flat_x, params["scale"], flat_dy)
    for got, w, b, what in zip((g_x.reshape(-1, F), g_p["scale"], g_p["bias"]), want, bound,
                               ("dx", "dscale", "dbias"), strict=True):
        ref.assert_within(got, w, b, what)
