"""Synchronized statistics on 8 fake CPU devices against the float64 full-batch reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn.counting import count_collectives
from tests import reference as ref

D = 8
F = 3


def _data(seed=0, n=4, offsets=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(D, n, F))
    if offsets:  # large, different per device: mean 1e4 with unit spread
        x = x + 1e4 + rng.normal(0, 1.0, (D, 1, F))
    dy = rng.normal(size=(D, n, F))
    return x.astype(np.float32), dy.astype(np.float32)


def _params():
    rng = np.random.default_rng(99)
    params = {"scale": jnp.asarray(rng.uniform(0.5, 2, F), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=F), jnp.float32)}
    _, state = jaxbn.bn_init(F)
    return params, state


def _full(x, mask=None):
    """Full-batch reference on the concatenation of all devices' data."""
    flat = x.reshape(-1, F)
    m = None if mask is None else np.broadcast_to(mask, x.shape[:2] + (1,)).reshape(-1, 1)
    return flat, m


def _check(y, new, dx, x, dy, params, state, mask=None, momentum=0.9, tol=1e-4):
    flat, m = _full(x, mask)
    y_ref = ref.bn_forward(flat, params["scale"], params["bias"], mask=m)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, F), y_ref, rtol=tol, atol=tol)
    mean, var, _ = ref.batch_stats(flat, mask=m)
    for k, b in (("mean", mean), ("var", var)):
        want = ref.ema(state[k], b.ravel(), momentum)
        got = np.asarray(new[k]).reshape(-1, F)  # every device holds the same statistics
        np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=tol, atol=tol)
    if dx is not None:
        dx_ref, _, _ = ref.bn_grads(flat, params["scale"], dy.reshape(-1, F), mask=m)
        np.testing.assert_allclose(np.asarray(dx).reshape(-1, F), dx_ref, rtol=1e-3, atol=tol)


def _per_device(params, state, x, dy, mask, axis_name, **kw):
    """One device's forward and vjp: y, new state, dx and parameter gradients."""
    def f(p, x):
        return jaxbn.bn_apply(p, state, x, True, momentum=0.9, axis_name=axis_name, mask=mask,
                              **kw)
    (y, new), vjp = jax.vjp(f, params, x)
    dp, dx = vjp((dy, jax.tree.map(jnp.zeros_like, new)))
    return y, new, dx, dp


@pytest.mark.parametrize("offsets", [False, True])
def test_pmap(offsets):
    x, dy = _data(offsets=offsets)
    params, state = _params()
    rep = jax.tree.map(lambda a: jnp.stack([a] * D), params)
    y, new, dx, dp = jax.pmap(
        lambda p, x, dy: _per_device(p, state, x, dy, None, "d"), axis_name="d")(rep, x, dy)
    _check(y, new, dx, x, dy, params, state, tol=2e-3 if offsets else 1e-4)
    # Parameter gradients are per replica under pmap: local sums with the global statistics.
    flat = x.reshape(-1, F).astype(np.float64)
    mean, var, _ = ref.batch_stats(flat)
    xhat = (x - mean.reshape(1, 1, F)) / np.sqrt(var.reshape(1, 1, F) + 1e-5)
    np.testing.assert_allclose(dp["bias"], dy.sum(1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dp["scale"], (dy * xhat).sum(1), rtol=1e-3, atol=2e-3)


def test_large_offsets_variance_within_one_percent():
    x, _ = _data(offsets=True, n=16)
    params, state = _params()
    _, new = jax.pmap(lambda x: jaxbn.bn_apply(params, state, x, True, momentum=0.0,
                                               axis_name="d"), axis_name="d")(x)
    _, var, _ = ref.batch_stats(x.reshape(-1, F))
    np.testing.assert_allclose(new["var"][0], var.ravel(), rtol=1e-2)


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((D,), ("d",))


def test_shard_map_with_replicated_params(mesh):
    x, dy = _data(seed=1)
    params, state = _params()
    xs, dys = (jax.device_put(a.reshape(-1, F), NamedSharding(mesh, P("d"))) for a in (x, dy))

    def body(p, x, dy):
        return _per_device(p, state, x, dy, None, "d")

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("d"), P("d")),
                               out_specs=(P("d"), P(), P("d"), P())))
    with jax.set_mesh(mesh):
        y, new, dx, dp = fn(params, xs, dys)
    _check(np.asarray(y), jax.tree.map(np.asarray, new), np.asarray(dx), x, dy, params, state)
    # Replicated parameters: the gradient is already summed over devices (full-batch grads).
    _, dscale, dbias = ref.bn_grads(x.reshape(-1, F), params["scale"], dy.reshape(-1, F))
    np.testing.assert_allclose(dp["scale"], dscale, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dp["bias"], dbias, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_vmap_with_local_batch_and_uneven_masks():
    x, dy = _data(seed=2)
    params, state = _params()
    mask = np.random.default_rng(3).random((D, 4, 1)) < 0.5
    mask[2] = False  # an empty device
    mask[5] = True
    y, new, dx, _ = jax.vmap(
        lambda x, dy, m: _per_device(params, state, x, dy, m, "d"), axis_name="d")(x, dy, mask)
    assert bool(jnp.all(jnp.isfinite(dx))) and bool(jnp.all(jnp.isfinite(y)))
    _check(y, new, dx, x, dy, params, state, mask=mask)


@pytest.mark.slow
def test_vmap_without_local_batch_axis():
    """Equinox style: each call sees one example of shape (F,); the batch is the named axis."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(D, F)).astype(np.float32)
    dy = rng.normal(size=(D, F)).astype(np.float32)
    params, state = _params()
    y, new, dx, _ = jax.vmap(
        lambda x, dy: _per_device(params, state, x, dy, None, "b"), axis_name="b")(x, dy)
    _check(y, new, dx, x[:, None], dy[:, None], params, state)


@pytest.mark.slow
def test_nested_axis_names_under_vmap():
    x, dy = _data(seed=5)
    params, state = _params()
    xs, dys = x.reshape(2, 4, 4, F), dy.reshape(2, 4, 4, F)
    f = jax.vmap(jax.vmap(lambda x, dy: _per_device(params, state, x, dy, None, ("h", "d")),
                          axis_name="d"), axis_name="h")
    y, new, dx, _ = f(xs, dys)
    _check(y.reshape(x.shape), jax.tree.map(lambda a: a.reshape((D,) + a.shape[2:]), new),
           dx.reshape(x.shape), x, dy, params, state)


@pytest.mark.slow
def test_nested_axis_names_under_shard_map():
    x, dy = _data(seed=6)
    params, state = _params()
    mesh2 = jax.make_mesh((2, 4), ("h", "d"))
    xs, dys = (jax.device_put(a.reshape(-1, F), NamedSharding(mesh2, P(("h", "d"))))
               for a in (x, dy))
    fn = jax.jit(jax.shard_map(
        lambda x, dy: _per_device(params, state, x, dy, None, ("h", "d"))[:3], mesh=mesh2,
        in_specs=(P(("h", "d")), P(("h", "d"))), out_specs=(P(("h", "d")), P(), P(("h", "d")))))
    with jax.set_mesh(mesh2):
        y, new, dx = fn(xs, dys)
    _check(np.asarray(y), jax.tree.map(np.asarray, new), np.asarray(dx), x, dy, params, state)


def test_grouped_statistics_on_a_2d_mesh():
    """Reducing a 2-D mesh over one axis gives per-group statistics (the shard_map way)."""
    x, _ = _data(seed=7)
    params, state = _params()
    mesh2 = jax.make_mesh((2, 4), ("h", "d"))
    xs = jax.device_put(x.reshape(-1, F), NamedSharding(mesh2, P(("h", "d"))))
    fn = jax.jit(jax.shard_map(
        lambda x: jaxbn.bn_apply(params, state, x, True, momentum=0.0, axis_name="d")[1]["mean"],
        mesh=mesh2, in_specs=P(("h", "d")), out_specs=P("h")))
    with jax.set_mesh(mesh2):
        means = np.asarray(fn(xs)).reshape(2, F)
    for g in range(2):
        np.testing.assert_allclose(means[g], x[4 * g:4 * g + 4].reshape(-1, F).mean(0),
                                   rtol=1e-5, atol=1e-6)


def test_axis_index_groups_under_pmap():
    x, dy = _data(seed=8)
    params, state = _params()
    groups = [[0, 2, 4, 6], [1, 3, 5, 7]]
    y, new, dx, _ = jax.pmap(
        lambda x, dy: _per_device(params, state, x, dy, None, "d", axis_index_groups=groups),
        axis_name="d")(x, dy)
    y, new, dx = np.asarray(y), jax.tree.map(np.asarray, new), np.asarray(dx)
    for g in map(np.asarray, groups):
        _check(y[g], jax.tree.map(lambda a, g=g: a[g], new), dx[g], x[g], dy[g], params, state)


@pytest.mark.slow
def test_groups_under_vmap_raise_clearly():
    x, _ = _data()
    params, state = _params()
    with pytest.raises(NotImplementedError, match="axis_index_groups is not supported"):
        jax.vmap(lambda x: jaxbn.bn_apply(params, state, x, True, axis_name="d",
                                          axis_index_groups=[[0, 1, 2, 3], [4, 5, 6, 7]]),
                 axis_name="d")(x)


def test_jit_over_sharded_batch_is_global(mesh):
    x, dy = _data(seed=9)
    params, state = _params()
    flat = x.reshape(-1, F)
    xs = jax.device_put(flat, NamedSharding(mesh, P("d")))
    with jax.set_mesh(mesh):
        y, new = jax.jit(lambda x: jaxbn.bn_apply(params, state, x, True, momentum=0.9))(xs)
    _check(np.asarray(y), jax.tree.map(np.asarray, new), None, x, dy, params, state)


def test_sync_state_averages():
    params, state = _params()
    rng = np.random.default_rng(10)
    states = {"mean": jnp.asarray(rng.normal(size=(D, F)), jnp.float32),
              "var": jnp.asarray(rng.uniform(1, 2, (D, F)), jnp.float32),
              "count": jnp.zeros((D,), jnp.int32)}
    synced = jax.pmap(lambda s: jaxbn.sync_state(s, "d"), axis_name="d")(states)
    np.testing.assert_allclose(synced["mean"], np.broadcast_to(states["mean"].mean(0), (D, F)),
                               rtol=1e-6)
    np.testing.assert_allclose(synced["var"], np.broadcast_to(states["var"].mean(0), (D, F)),
                               rtol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_collective_counts(masked):
    x, dy = _data()
    params, state = _params()
    mask = np.ones((D, 4, 1), bool) if masked else None

    def fwd(x, m):
        return jaxbn.bn_apply(params, state, x, True, axis_name="d", mask=m)

    def fwd_bwd(x, dy, m):
        return _per_device(params, state, x, dy, m, "d")

    assert count_collectives(jax.pmap(fwd, axis_name="d"), x, mask) == (1, 1)
    assert count_collectives(jax.pmap(fwd_bwd, axis_name="d"), x, dy, mask) == (2, 2)


def test_collective_counts_shard_map_replicated_params(mesh):
    x, dy = _data()
    params, state = _params()
    xs, dys = (jax.device_put(a.reshape(-1, F), NamedSharding(mesh, P("d"))) for a in (x, dy))
    fn = jax.jit(jax.shard_map(lambda p, x, dy: _per_device(p, state, x, dy, None, "d"),
                               mesh=mesh, in_specs=(P(), P("d"), P("d")),
                               out_specs=(P("d"), P(), P("d"), P())))
    with jax.set_mesh(mesh):
        assert count_collectives(fn, params, xs, dys) == (2, 2)


def test_counting_sees_combined_tuple_collectives():
    """XLA merges independent all-reduces into one tuple-shaped instruction; it still counts."""
    f = jax.pmap(lambda a, b: (jax.lax.psum(a, "d"), jax.lax.psum(b, "d")), axis_name="d")
    traced, compiled = count_collectives(f, jnp.ones((D, 3)), jnp.ones((D, 5)))
    assert traced == 2 and compiled in (1, 2)


def test_unbound_axis_in_sync_state():
    _, state = _params()
    with pytest.raises(NameError, match="'nope' is not bound"):
        jax.jit(lambda s: jaxbn.sync_state(s, "nope"))(state)


@pytest.mark.slow
def test_single_example_per_device_needs_no_local_batch():
    # Unsynchronized, one value per feature is an error; synchronized it is fine.
    params, state = _params()
    x = jnp.ones((D, 1, F))
    jax.vmap(lambda x: jaxbn.bn_apply(params, state, x, True, axis_name="d"),
             axis_name="d")(x)
    with pytest.raises(ValueError, match="more than one value"):
        jax.vmap(lambda x: jaxbn.bn_apply(params, state, x, True))(x)
