"""Beyond the anchors: cumulative averages, unbiased variance, ghost BN, batch renorm,
skipping non-finite batches, folding and precise BN, each against float64 formulas."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn
from tests import reference as ref

F = 3


def _batches(k=4, n=8, seed=0, loc=2.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(loc, 2.0, (k, n, F)) * rng.uniform(0.5, 2, (k, 1, 1))).astype(np.float32)


def test_cumulative_average_is_plain_mean_of_batch_stats():
    xs = _batches()
    params, state = jaxbn.bn_init(F)
    step = jax.jit(lambda s, x: jaxbn.bn_apply(params, s, x, True, momentum=None)[1])
    for x in xs:
        state = step(state, x)
    stats = [ref.batch_stats(x) for x in xs]
    np.testing.assert_allclose(state["mean"], np.mean([s[0].ravel() for s in stats], 0),
                               rtol=1e-5)
    np.testing.assert_allclose(state["var"], np.mean([s[1].ravel() for s in stats], 0),
                               rtol=1e-5)
    assert int(state["count"]) == len(xs)


def test_unbiased_running_var():
    x = _batches(k=1)[0]
    params, state = jaxbn.bn_init(F)
    _, new = jaxbn.bn_apply(params, state, x, True, momentum=0.0, unbiased_running_var=True)
    np.testing.assert_allclose(new["var"], np.var(x.astype(np.float64), 0, ddof=1), rtol=1e-5)


def test_virtual_batches():
    x = _batches(k=1, n=12)[0]
    params, state = jaxbn.bn_init(F)
    y, new = jax.jit(lambda x: jaxbn.bn_apply(params, state, x, True, momentum=0.0,
                                              virtual_batch_size=4))(x)
    groups = x.reshape(3, 4, F)
    want = np.concatenate([ref.bn_forward(g, None, None) for g in groups])
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(new["mean"], np.mean([g.mean(0) for g in groups], 0), rtol=1e-5)
    np.testing.assert_allclose(new["var"], np.mean([g.astype(np.float64).var(0)
                                                    for g in groups], 0), rtol=1e-5)
    with pytest.raises(ValueError, match="not divisible by virtual_batch_size=5"):
        jaxbn.bn_apply(params, state, x, True, virtual_batch_size=5)


def _renorm_reference(x, scale, bias, rmean, rvar, r_max, d_max, eps=1e-5):
    x = x.astype(np.float64)
    mu, var = x.mean(0), x.var(0)
    sb, s = np.sqrt(var + eps), np.sqrt(rvar + eps)
    r = np.clip(sb / s, 1 / r_max, r_max)
    d = np.clip((mu - rmean) / s, -d_max, d_max)
    return ((x - mu) / sb * r + d) * scale + bias, r


def test_batch_renorm_with_traced_limits():
    x = _batches(k=1, n=16)[0]
    rng = np.random.default_rng(1)
    params = {"scale": jnp.asarray(rng.uniform(0.5, 2, F), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=F), jnp.float32)}
    _, state = jaxbn.bn_init(F)
    state = dict(state, mean=jnp.asarray([1.0, 2.5, 3.0]), var=jnp.asarray([0.5, 4.0, 30.0]))

    @jax.jit
    def f(x, r_max, d_max):
        return jaxbn.bn_apply(params, state, x, True, renorm=(r_max, d_max))[0]

    for r_max, d_max in ((1.0, 0.0), (1.5, 0.5), (10.0, 10.0)):
        want, r = _renorm_reference(x, np.asarray(params["scale"]), np.asarray(params["bias"]),
                                    np.asarray(state["mean"]), np.asarray(state["var"]),
                                    r_max, d_max)
        np.testing.assert_allclose(f(x, r_max, d_max), want, rtol=1e-4, atol=1e-4)
    # gradient: r and d are constants, so dx is the BN closed form scaled by r
    dy = rng.normal(size=x.shape).astype(np.float32)
    gx = jax.grad(lambda x: jnp.sum(f(x, 1.5, 0.5) * dy))(x)
    _, r = _renorm_reference(x, 1, 0, np.asarray(state["mean"]), np.asarray(state["var"]), 1.5,
                             0.5)
    dx, _, _ = ref.bn_grads(x, np.asarray(params["scale"]) * r, dy)
    np.testing.assert_allclose(gx, dx, rtol=1e-3, atol=1e-4)


def test_skip_nonfinite():
    params, state = jaxbn.bn_init(F)
    x = _batches(k=1)[0].copy()
    x[3, 1] = np.nan
    step = jax.jit(lambda x, skip: jaxbn.bn_apply(params, state, x, True, skip_nonfinite=skip)[1],
                   static_argnums=1)
    kept = step(x, True)
    np.testing.assert_array_equal(kept["mean"], state["mean"])
    np.testing.assert_array_equal(kept["var"], state["var"])
    assert int(kept["count"]) == 0
    assert not bool(jnp.all(jnp.isfinite(step(x, False)["mean"])))


def test_features_with_axis_name_match_full_batch():
    """Cumulative + unbiased + renorm + per-device ghost batches, synced over 4 vmapped devices."""
    xs = _batches(k=4, n=8, seed=3)  # 4 devices x 8 examples
    params, state = jaxbn.bn_init(F)
    state = dict(state, mean=jnp.full(F, 2.0), var=jnp.full(F, 3.0))

    def dev(x):
        return jaxbn.bn_apply(params, state, x, True, axis_name="d", momentum=None,
                              unbiased_running_var=True, renorm=(2.0, 1.0),
                              virtual_batch_size=4)

    y, new = jax.jit(jax.vmap(dev, axis_name="d"))(xs)
    # ghost batches are each device's own consecutive examples: 4 devices x 2 groups of 4
    groups = xs.reshape(8, 4, F)
    ys = [_renorm_reference(g, 1.0, 0.0, 2.0, 3.0, 2.0, 1.0)[0] for g in groups]
    np.testing.assert_allclose(y, np.stack(ys).reshape(4, 8, F), rtol=1e-4, atol=1e-4)
    want_mean = np.mean([g.mean(0) for g in groups], 0)
    want_var = np.mean([g.astype(np.float64).var(0, ddof=1) for g in groups], 0)
    # cumulative average of one update from bn_init's count 0: the batch statistics, the same
    # on every device (averaged over all devices' groups)
    for d in range(4):
        np.testing.assert_allclose(new["mean"][d], want_mean, rtol=1e-5)
        np.testing.assert_allclose(new["var"][d], want_var, rtol=1e-5)


def test_sync_state_under_shard_map():
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4,), ("d",), devices=jax.devices()[:4])
    means = np.arange(4 * F, dtype=np.float32).reshape(4, F)
    states = jax.device_put({"mean": means, "var": means + 1},
                            jax.sharding.NamedSharding(mesh, P("d")))
    fn = jax.jit(jax.shard_map(lambda s: jaxbn.sync_state(
        jax.tree.map(lambda a: a[0], s), "d"), mesh=mesh, in_specs=P("d"), out_specs=P()))
    with jax.set_mesh(mesh):
        out = fn(states)
    np.testing.assert_allclose(out["mean"], means.mean(0), rtol=1e-6)


class CNN(nn.Module):
    conv0_bias: bool = False  # the folded model needs a bias where the original had none

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(6, (3, 3), use_bias=self.conv0_bias)(x)
        x = jaxbn.linen.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        x = nn.Conv(5, (3, 3))(x)
        x = jaxbn.linen.BatchNorm(use_running_average=not train, use_scale=False)(x)
        x = nn.relu(x).mean((1, 2))
        x = nn.Dense(4)(x)
        return jaxbn.linen.BatchNorm(use_running_average=not train)(x)


def _trained_cnn_variables():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(1.0, 2.0, (6, 8, 8, 3)), jnp.float32)
    model = CNN()
    v = model.init(jax.random.key(1), x)
    v = {"params": jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(2),
                                                                        p.shape), v["params"]),
         "batch_stats": jax.tree.map(lambda s: s * 1.7 + 0.2, v["batch_stats"])}
    return model, v, x


def test_fold_dense_and_conv_match_eval_bn():
    rng = np.random.default_rng(5)
    params, state = jaxbn.bn_init(4)
    params = {"scale": jnp.asarray(rng.uniform(0.5, 2, 4), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=4), jnp.float32)}
    state = dict(state, mean=jnp.asarray(rng.normal(size=4), jnp.float32),
                 var=jnp.asarray(rng.uniform(0.5, 2, 4), jnp.float32))
    x = rng.normal(size=(5, 3)).astype(np.float32)
    kernel = rng.normal(size=(3, 4)).astype(np.float32)
    b = rng.normal(size=4).astype(np.float32)
    k2, b2 = jaxbn.fold_dense(kernel, b, params, state)
    z = x.astype(np.float64) @ kernel + b
    want = ref.bn_eval(z, params["scale"], params["bias"], state["mean"], state["var"])
    np.testing.assert_allclose(x @ np.asarray(k2) + np.asarray(b2), want, rtol=1e-5, atol=1e-5)
    ck = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)
    img = rng.normal(size=(2, 6, 6, 2)).astype(np.float32)
    conv = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    kf, bf = jaxbn.fold_conv(ck, None, params, state)
    want = ref.bn_eval(np.asarray(conv(img, ck), np.float64), params["scale"], params["bias"],
                       state["mean"], state["var"])
    np.testing.assert_allclose(conv(img, kf) + bf.reshape(1, 1, 1, -1), want, rtol=1e-4,
                               atol=1e-4)


def test_fold_linen_on_a_cnn():
    model, v, x = _trained_cnn_variables()
    folded = jaxbn.fold_linen(v, {"Conv_0": "BatchNorm_0", "Conv_1": "BatchNorm_1",
                                  "Dense_0": "BatchNorm_2"}, add_bias=True)
    want = model.apply(v, x)
    got = CNN(conv0_bias=True).apply(folded, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_precise_bn_equals_concatenated_statistics():
    xs = _batches(k=3, n=8, seed=6)
    mask = np.ones((3, 8, 1), bool)
    mask[1, 5:] = False  # uneven counts: weights matter
    params, state = jaxbn.bn_init(F)
    state = jaxbn.reset_stats(state)
    step = jax.jit(lambda s, x, m: jaxbn.bn_apply(params, s, x, True, mask=m)[1])
    for x, m in zip(xs, mask, strict=True):
        state = step(state, x, m)
    state = jaxbn.finish_stats(state)
    assert "seen" not in state
    valid = xs.reshape(-1, F)[mask.reshape(-1)].astype(np.float64)
    np.testing.assert_allclose(state["mean"], valid.mean(0), rtol=1e-5)
    np.testing.assert_allclose(state["var"], valid.var(0), rtol=1e-5)


def test_precise_bn_linen_and_nnx_helpers():
    xs = _batches(k=3, n=6, seed=7)
    concat = xs.reshape(-1, F).astype(np.float64)
    bn = jaxbn.linen.BatchNorm(use_running_average=False)
    v = bn.init(jax.random.key(0), xs[0])
    v = jaxbn.precise_linen_stats(jax.jit(bn.apply, static_argnames="mutable"), v, list(xs))
    np.testing.assert_allclose(v["batch_stats"]["mean"], concat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(v["batch_stats"]["var"], concat.var(0), rtol=1e-5)
    m = jaxbn.nnx.BatchNorm(F, rngs=nnx.Rngs(0))
    jaxbn.nnx.precise_stats(m, list(xs))
    np.testing.assert_allclose(m.mean[...], concat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(m.var[...], concat.var(0), rtol=1e-5)
    assert not hasattr(m, "seen")


def test_wrappers_expose_the_features():
    xs = _batches(k=2, n=8, seed=8)
    lin = jaxbn.linen.BatchNorm(use_running_average=False, momentum=None,
                                unbiased_running_var=True)
    v = lin.init(jax.random.key(0), xs[0])
    assert "count" in v["batch_stats"]
    for x in xs:
        _, upd = lin.apply(v, x, mutable=["batch_stats"])
        v = {**v, **upd}
    want = np.mean([x.astype(np.float64).var(0, ddof=1) for x in xs], 0)
    np.testing.assert_allclose(v["batch_stats"]["var"], want, rtol=1e-5)
    m = jaxbn.nnx.BatchNorm(F, virtual_batch_size=4, momentum=0.0, rngs=nnx.Rngs(0))
    y = m(xs[0])
    want_y = np.concatenate([ref.bn_forward(g, None, None) for g in xs[0].reshape(2, 4, F)])
    np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-4)


def test_precise_and_skip_nonfinite_with_axis_name():
    xs = _batches(k=2, n=8, seed=9).reshape(2, 4, 2, F)  # 2 batches x 4 devices x 2 examples
    params, state = jaxbn.bn_init(F)
    state = jaxbn.reset_stats(state)
    step = jax.jit(jax.vmap(lambda s, x: jaxbn.bn_apply(params, s, x, True, axis_name="d",
                                                        skip_nonfinite=True)[1],
                            in_axes=(None, 0), out_axes=None, axis_name="d"))
    for x in xs:
        state = step(state, x)
    bad = xs[0].copy()
    bad[1, 0, 0] = np.inf
    state = step(state, bad)  # skipped on every device
    state = jaxbn.finish_stats(state)
    concat = xs.reshape(-1, F).astype(np.float64)
    np.testing.assert_allclose(state["mean"], concat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(state["var"], concat.var(0), rtol=1e-5)
    assert int(state["count"]) == 2
