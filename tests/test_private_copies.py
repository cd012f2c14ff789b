"""``jaxbn._src.private_copies``: ``fresh`` (the private-copy primitive: the identity) and
``cast_sum`` (a linear primitive with its own transpose) against float64 NumPy in every
transformation, their errors, and what they are for: a low-precision layer whose
forward+backward needs no float32 copy of its input on a CPU. Their lowerings, per platform,
are tested in ``test_lowering.py``."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn._src import collectives
from jaxbn._src.private_copies import cast_sum, fresh, private_copy_p
from tests import reference as ref

RNG = np.random.default_rng(3)
U = RNG.normal(size=(2, 3, 4)).astype(np.float32)
V = RNG.normal(size=(1, 1, 4)).astype(np.float32)
W = RNG.normal(size=(2, 3, 4)).astype(np.float32)
CT = RNG.normal(size=(2, 3, 4)).astype(np.float32)


def _rounded(a, dtype):
    """float64 ``a`` rounded to ``dtype`` (round to nearest even, as XLA's convert)."""
    np_dtype = ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.dtype(dtype)
    return np.asarray(a, np.float64).astype(np_dtype).astype(np.float64)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("jit", [False, True])
def test_value_transpose_and_jvp_match_float64(dtype, jit):
    def f(u, v, w):
        return cast_sum([u, v, w], dtype)

    g = jax.jit(f) if jit else f
    total = U.astype(np.float64) + V + W
    # float32 sums: a few ulps of the largest term; then one rounding to dtype (a tie may round
    # either way after the float32 sum: one ulp of dtype)
    tol = dict(rtol=float(jnp.finfo(dtype).eps),
               atol=4e-7 * float(np.max(np.abs(U) + np.abs(V) + np.abs(W))))
    y = g(U, V, W)
    assert y.dtype == dtype and y.shape == U.shape
    np.testing.assert_allclose(np.asarray(y, np.float64), _rounded(total, dtype), **tol)
    ct = jnp.asarray(CT, dtype)  # each term's cotangent: ct in float32, summed to its shape
    ct64 = np.asarray(ct.astype(jnp.float32), np.float64)
    tu, tv, tw = jax.linear_transpose(g, U, V, W)(ct)
    np.testing.assert_array_equal(tu, ct64)
    # 6 float32 terms summed in an order XLA:CPU picks per machine: a nearly cancelling sum is
    # only good to the error bound of the magnitudes summed, not to a relative tolerance
    bound = ref.sum_error_bound(np.abs(ct64).sum(axis=(0, 1), keepdims=True), 6)
    ref.assert_within(tv, ct64.sum(axis=(0, 1), keepdims=True), bound, "transpose of v")
    np.testing.assert_array_equal(tw, ct64)
    assert tu.dtype == tv.dtype == tw.dtype == jnp.float32
    _, tangent = jax.jvp(g, (U, V, W), (W, V, U))
    np.testing.assert_allclose(np.asarray(tangent, np.float64), _rounded(total, dtype), **tol)


def test_vmap_of_batched_and_unbatched_terms_matches_float64():
    us = RNG.normal(size=(5,) + U.shape).astype(np.float32)
    vs = RNG.normal(size=(5,) + V.shape).astype(np.float32)
    want = us.astype(np.float64) + V
    got = jax.vmap(lambda u: cast_sum([u, V], jnp.float32))(us)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    got = jax.vmap(lambda v: cast_sum([U, v], jnp.float32))(vs)  # the full-shape term unbatched
    np.testing.assert_allclose(got, U.astype(np.float64) + vs, rtol=1e-6)
    got = jax.vmap(lambda u, v: cast_sum([u, v], jnp.float32), in_axes=(1, 0))(
        np.moveaxis(us, 0, 1), vs)
    np.testing.assert_allclose(got, us.astype(np.float64) + vs, rtol=1e-6)
    # vmap of the gradient: each example's term gets its own summed cotangent
    grads = jax.vmap(jax.grad(lambda v: jnp.sum(cast_sum([U, v], jnp.float32) * CT)))(vs)
    ct64 = CT.astype(np.float64)
    bound = ref.sum_error_bound(np.abs(ct64).sum(axis=(0, 1), keepdims=True), 6)
    ref.assert_within(grads, np.broadcast_to(ct64.sum(axis=(0, 1), keepdims=True), vs.shape),
                      bound, "vmap of the gradient")


@pytest.mark.slow
def test_derivatives_of_every_order_match_the_closed_form():
    """f(u) = sum(sin(u * u + v)): gradient cos(.) 2u, Hessian diagonal 2 cos(.) - 4u^2 sin(.)."""
    u = U[0, 0]
    v = V[0, 0]

    def f(u):
        return jnp.sum(jnp.sin(cast_sum([u * u, v], jnp.float32)))

    a = u.astype(np.float64) ** 2 + v
    np.testing.assert_allclose(jax.grad(f)(u), np.cos(a) * 2 * u, rtol=1e-5)
    hess = np.diag(2 * np.cos(a) - 4 * u.astype(np.float64) ** 2 * np.sin(a))
    for h in (jax.hessian(f), jax.jacfwd(jax.jacrev(f)), jax.jacrev(jax.jacrev(f)),
              jax.jacfwd(jax.jacfwd(f))):
        np.testing.assert_allclose(h(u), hess, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(jax.grad(jax.checkpoint(f))(u), np.cos(a) * 2 * u, rtol=1e-5)


def test_shard_map_gradient_and_varying_terms(devices):
    mesh = jax.make_mesh((8,), ("b",), axis_types=(jax.sharding.AxisType.Auto,))
    us = RNG.normal(size=(8, 3, 4)).astype(np.float32)

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("b"), P()), out_specs=P())
    def loss(u, v):
        v = jax.lax.pcast(v, ("b",), to="varying")
        return jax.lax.psum(jnp.sum(cast_sum([u, v], jnp.bfloat16).astype(jnp.float32) ** 2),
                            "b")

    with jax.set_mesh(mesh):
        gu, gv = jax.jit(jax.grad(loss, (0, 1)))(us, V)
    y = _rounded(us.astype(np.float64) + V, jnp.bfloat16)
    y_ct = _rounded(2 * y, jnp.bfloat16)  # the cotangent reaches cast_sum in bfloat16
    np.testing.assert_allclose(gu, y_ct, rtol=1e-6)
    # 24 float32 terms over 8 devices (per-device sums, then the all-reduce): the sum's bound
    ref.assert_within(gv, y_ct.sum(axis=(0, 1), keepdims=True),
                      ref.sum_error_bound(np.abs(y_ct).sum(axis=(0, 1), keepdims=True), 24),
                      "gradient of the broadcast term")

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("b"), P()), out_specs=P("b"))
    def mixed(u, v):
        return cast_sum([u, v], jnp.float32)

    with pytest.raises(TypeError, match="vary over the same shard_map axes"):
        jax.jit(mixed)(us, V)


@pytest.mark.parametrize("terms, match", [
    ([np.ones((2, 3), np.float32), np.ones((2, 4), np.float32)], "broadcast to the first"),
    ([np.ones((2, 3), np.float32), np.ones((3,), np.float32)], "broadcast to the first"),
    ([np.ones((2, 3), np.float32), np.ones((2, 3), np.float16)], "broadcast to the first"),
])
def test_terms_that_do_not_fit_raise(terms, match):
    with pytest.raises(TypeError, match=match):
        cast_sum(terms, jnp.float32)


def test_fresh_copies_hold_the_same_values_under_jit():
    a, b = jax.jit(lambda u, v: fresh(u, v))(U, V)
    np.testing.assert_array_equal(a, U)
    np.testing.assert_array_equal(b, V)


def test_fresh_copies_hold_the_same_values_eagerly():
    a, b = fresh(U, V)
    np.testing.assert_array_equal(a, U)
    np.testing.assert_array_equal(b, V)
    assert fresh() == ()


def _copied(u, v):
    """sum(sin(a) * b) with (a, b) a private copy of (u * u, v), and a second copy of those."""
    a, b = fresh(u * u, v)
    a, b = fresh(a, b)
    return jnp.sum(jnp.sin(a) * b)


def _f64(a):
    return np.asarray(a, np.float64)


EPS32 = float(np.finfo(np.float32).eps)


def _sin_cos(u):
    """sin(u^2), cos(u^2) in float64, and what bounds their float32 errors: u^2 rounded to
    float32 moves the argument by up to half an ulp of u^2, so each is good to a few ulps of
    (1 + u^2)."""
    u = _f64(u)
    return np.sin(u * u), np.cos(u * u), 1 + u * u


def _grad_u_bound(u, v):
    """cos(u^2) * 2u * v: a few float32 ulps of (1 + u^2) |2u v|."""
    _, _, m = _sin_cos(u)
    return 4 * EPS32 * m * np.abs(2 * _f64(u) * _f64(v))


@pytest.mark.parametrize("jit", [False, True])
def test_fresh_under_grad_jvp_and_linear_transpose_matches_float64(jit):
    """Value, gradient (both arguments, or one: a symbolic zero tangent), forward mode, the
    Hessian (forward over reverse) and the transpose of the copy itself, against closed forms.
    """
    wrap = jax.jit if jit else (lambda f: f)
    u64, v64 = _f64(U), _f64(V)
    s, c, m = _sin_cos(U)
    ref.assert_within(wrap(_copied)(U, V), np.sum(s * v64),
                      ref.sum_error_bound((m * np.abs(v64)).sum(), s.size, ulps=4), "value")
    gu, gv = wrap(jax.grad(_copied, (0, 1)))(U, V)
    want_gu = c * 2 * u64 * v64
    ref.assert_within(gu, want_gu, _grad_u_bound(U, V), "du")
    ref.assert_within(gv, s.sum(axis=(0, 1), keepdims=True),
                      ref.sum_error_bound(m.sum(axis=(0, 1), keepdims=True), 6, ulps=4), "dv")
    np.testing.assert_array_equal(wrap(jax.grad(_copied))(U, V), gu)  # v's tangent a zero
    # forward mode along (du, dv) = (W, W summed to V's shape)
    dv = W.sum(axis=(0, 1), keepdims=True)
    _, tangent = wrap(lambda u, v, du, dv: jax.jvp(_copied, (u, v), (du, dv)))(U, V, W, dv)
    want = np.sum(want_gu * _f64(W)) + np.sum(s * _f64(dv))
    mags = np.concatenate([(m * np.abs(2 * u64 * v64 * _f64(W))).ravel(),
                           (m * np.abs(_f64(dv))).ravel()])
    ref.assert_within(tangent, want, ref.sum_error_bound(mags.sum(), mags.size, ulps=8), "jvp")
    # Hessian in u (one row of U, v fixed): diagonal (2 cos(u^2) - 4 u^2 sin(u^2)) v
    u0, v0 = U[0, 0], V[0, 0]
    s0, c0, m0 = _sin_cos(u0)
    u0_64, v0_64 = _f64(u0), _f64(v0)
    hess = wrap(jax.hessian(lambda u: _copied(u, v0)))(u0)
    want = np.diag((2 * c0 - 4 * u0_64 ** 2 * s0) * v0_64)
    bound = np.diag(16 * EPS32 * m0 * (2 + 4 * u0_64 ** 2) * np.abs(v0_64))
    ref.assert_within(hess, want, bound, "hessian")
    # the copy is linear; its transpose is the identity (an unused output: a zero cotangent)
    ta, tb = wrap(jax.linear_transpose(lambda a, b: fresh(a, b)[0], U, V))(CT)
    np.testing.assert_array_equal(ta, CT)
    np.testing.assert_array_equal(tb, np.zeros_like(V))


def test_fresh_under_vmap_with_batched_and_unbatched_operands():
    us = RNG.normal(size=(5,) + U.shape).astype(np.float32)
    a, b = jax.vmap(lambda u: fresh(u, V))(us)  # V unbatched: stays unbatched inside
    np.testing.assert_array_equal(a, us)
    np.testing.assert_array_equal(b, np.broadcast_to(V, (5,) + V.shape))
    a, b = jax.vmap(lambda u, v: fresh(u, v), in_axes=(1, None), out_axes=(2, 0))(
        np.moveaxis(us, 0, 1), V)
    np.testing.assert_array_equal(a, np.moveaxis(us, 0, 2))
    # per-example gradients under vmap against the closed form
    grads = jax.jit(jax.vmap(jax.grad(_copied), in_axes=(0, None)))(us, V)
    want = _sin_cos(us)[1] * 2 * _f64(us) * _f64(V)
    ref.assert_within(grads, want, _grad_u_bound(us, V), "vmap")


@pytest.mark.parametrize("check_vma", [True, False])
def test_fresh_under_shard_map(check_vma, devices):
    """u sharded, v replicated: the copies vary over the mesh axis (with check_vma), and the
    gradient of the replicated v is summed over the devices."""
    mesh = jax.make_mesh((8,), ("b",), axis_types=(jax.sharding.AxisType.Auto,))
    us = RNG.normal(size=(8, 3, 4)).astype(np.float32)

    def local(u, v):
        a, b = fresh(u * u, v)
        if check_vma:
            assert collectives.varying_axes(b) == {"b"}, jax.typeof(b)
        return jax.lax.psum(jnp.sum(jnp.sin(a) * b), "b")

    loss = jax.shard_map(local, mesh=mesh, in_specs=(P("b"), P()), out_specs=P(),
                         check_vma=check_vma)
    with jax.set_mesh(mesh):
        gu, gv = jax.jit(jax.grad(loss, (0, 1)))(us, V)
    s, c, m = _sin_cos(us)
    ref.assert_within(gu, c * 2 * _f64(us) * _f64(V), _grad_u_bound(us, V), "du")
    # 3 terms per device, then 8 devices: a 24-term float32 sum's bound
    ref.assert_within(gv, s.sum(axis=(0, 1), keepdims=True), ref.sum_error_bound(
        m.sum(axis=(0, 1), keepdims=True), 24, ulps=4), "dv")


def test_private_copy_of_differently_varying_operands_raises(devices):
    mesh = jax.make_mesh((8,), ("b",), axis_types=(jax.sharding.AxisType.Auto,))
    us = RNG.normal(size=(8, 3, 4)).astype(np.float32)

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("b"), P()), out_specs=P("b"))
    def bad(u, v):
        return private_copy_p.bind(u, v)[0]

    with pytest.raises(TypeError, match="vary over the same shard_map axes"):
        jax.jit(bad)(us, V)


def test_fresh_under_pmap_gives_per_device_gradients(devices):
    us = RNG.normal(size=(8, 3, 4)).astype(np.float32)

    v = V[0]  # each device's u is (3, 4)
    gu, gv = jax.pmap(jax.grad(_copied, (0, 1)), axis_name="i", in_axes=(0, None))(us, v)
    s, c, m = _sin_cos(us)
    ref.assert_within(gu, c * 2 * _f64(us) * _f64(v), _grad_u_bound(us, v), "du")
    # per replica: that device's 3-term sum (pmap's gradients are per replica)
    ref.assert_within(gv, s.sum(axis=1, keepdims=True), ref.sum_error_bound(
        m.sum(axis=1, keepdims=True), 3, ulps=4), "dv")


def _fwd_bwd_temp_bytes(apply, params, x):
    def out(p, x):
        return apply(p, x)[0]

    dy = jnp.ones(jax.eval_shape(out, params, x).shape, jax.eval_shape(out, params, x).dtype)
    fwd_bwd = jax.jit(lambda p, x, dy: jax.vjp(out, p, x)[1](dy))
    analysis = fwd_bwd.lower(params, x, dy).compile().memory_analysis()
    return int(analysis.temp_size_in_bytes)


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's fusion rules")
@pytest.mark.parametrize("shape", [(16, 8, 8, 32), (512, 64)])
def test_low_precision_layer_makes_no_float32_copy_of_its_input(shape):
    """Before: two float32 copies of a bfloat16 input (4x its bytes; Flax's one copy: 2x)."""
    import flax.linen as nn

    x = jnp.asarray(RNG.normal(3.0, 2.0, shape), jnp.bfloat16)
    params, state = jaxbn.bn_init(shape[-1])
    ours = _fwd_bwd_temp_bytes(lambda p, x: jaxbn.bn_apply(p, state, x, True), params, x)
    mod = nn.BatchNorm(use_running_average=False)
    v = mod.init(jax.random.key(0), x)
    flax_temp = _fwd_bwd_temp_bytes(
        lambda p, x: mod.apply({"params": p, "batch_stats": v["batch_stats"]}, x,
                               mutable=["batch_stats"]), v["params"], x)
    assert ours < x.nbytes // 4, (ours, x.nbytes)
    assert ours <= flax_temp, (ours, flax_temp)


@pytest.mark.parametrize("dtype, tol", [(jnp.bfloat16, 2e-2), (jnp.float16, 2e-3)])
def test_low_precision_gradients_match_float64(dtype, tol):
    """dx, dscale, dbias of sum(dy * y) for a low-precision input, under jit, against the closed
    form in float64 on the values actually given."""
    x = jnp.asarray(RNG.normal(3.0, 2.0, (32, 4, 5)), dtype)
    dy = jnp.asarray(RNG.normal(size=(32, 4, 5)), dtype)
    params, state = jaxbn.bn_init(5)
    params = {"scale": jnp.linspace(0.5, 2.0, 5), "bias": jnp.zeros(5)}

    def loss(x, p):
        y = jaxbn.bn_apply(p, state, x, True)[0]
        return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))

    gx, gp = jax.jit(jax.grad(loss, (0, 1)))(x, params)
    assert gx.dtype == dtype
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    dy64 = np.asarray(dy.astype(jnp.float32), np.float64)
    dx, dscale, dbias = ref.bn_grads(x64, params["scale"], dy64)
    scale = np.abs(dx).max()
    np.testing.assert_allclose(np.asarray(gx, np.float64), dx, atol=tol * scale, rtol=tol)
    np.testing.assert_allclose(gp["scale"], dscale, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gp["bias"], dbias, rtol=1e-4, atol=1e-4)
