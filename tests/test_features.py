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


def _averaged(batch_stats):
    """The plain average of batches' ``(mean, var, e_mean, e_var)`` as jaxbn's cumulative
    update forms it, with its error bound (tests.reference.cumulative_bound)."""
    avg = {}
    for k, (m, v, em, ev) in enumerate(batch_stats):
        if not avg:
            avg = {"mean": (m, em), "var": (v, ev)}
            continue
        avg = {key: (old + (new - old) / (k + 1), ref.cumulative_bound(old, new, e_old, e_new, k))
               for (key, (old, e_old)), (new, e_new) in zip(avg.items(), ((m, em), (v, ev)),
                                                            strict=True)}
    return avg


def test_cumulative_average_is_plain_mean_of_batch_stats():
    xs = _batches()
    params, state = jaxbn.bn_init(F)
    step = jax.jit(lambda s, x: jaxbn.bn_apply(params, s, x, True, momentum=None)[1])
    for x in xs:
        state = step(state, x)
    stats = [ref.stats_with_bounds(x) for x in xs]
    for k, (want, bound) in _averaged([(m, v, em, ev) for m, v, _, em, ev in stats]).items():
        ref.assert_within(state[k], want, bound, f"cumulative {k}")
    assert int(state["count"]) == len(xs)


@pytest.mark.slow
def test_unbiased_running_var():
    x = _batches(k=1)[0]
    params, state = jaxbn.bn_init(F)
    _, new = jaxbn.bn_apply(params, state, x, True, momentum=0.0, unbiased_running_var=True)
    _, var, n, _, e_var = ref.stats_with_bounds(x)
    bessel = n / (n - 1)  # a wrong factor (8/7 here) is off by 14%
    ref.assert_within(new["var"], np.var(x.astype(np.float64), 0, ddof=1),
                      e_var * bessel + 4 * ref.unit_roundoff(np.float32) * var * bessel,
                      "unbiased var")


def test_virtual_batches():
    x = _batches(k=1, n=12)[0]
    params, state = jaxbn.bn_init(F)
    y, new = jax.jit(lambda x: jaxbn.bn_apply(params, state, x, True, momentum=0.0,
                                              virtual_batch_size=4))(x)
    groups = x.reshape(3, 4, F)
    ref.assert_within(y, np.concatenate([ref.bn_forward(g, None, None) for g in groups]),
                      np.concatenate([ref.bn_forward_bound(g, None, None) for g in groups]), "y")
    _check_group_average(new, [ref.stats_with_bounds(g) for g in groups])
    with pytest.raises(ValueError, match="not divisible by virtual_batch_size=5"):
        jaxbn.bn_apply(params, state, x, True, virtual_batch_size=5)


def _check_group_average(new, group_stats, unbiased=False, old=(0.0, 0.0)):
    """The running statistics of one update at momentum 0 or from a fresh cumulative average
    (whose ``old`` state values enter one difference): the average of the ghost batches' means
    and (biased, or each group's unbiased) variances, within the average of their bounds plus
    the roundings of the average (a sum of G terms) and of the update."""
    u = ref.unit_roundoff(np.float32)
    g = len(group_stats)
    for i, k in enumerate(("mean", "var")):
        values = np.stack([st[i] for st in group_stats])
        bounds = np.stack([st[3 + i] for st in group_stats])
        if k == "var" and unbiased:
            n = np.stack([st[2] for st in group_stats])
            values, bounds = values * n / (n - 1), (bounds + 3 * u * values) * n / (n - 1)
        want = values.mean(0)
        bound = (bounds.mean(0) + ref.sum_error_bound(np.abs(values).sum(0), g, ulps=2) / g
                 + 2 * u * (np.abs(want) + np.abs(old[i])))
        ref.assert_within(new[k], want, bound, f"running {k}")


def _renorm_reference(x, scale, bias, rmean, rvar, r_max, d_max, eps=1e-5):
    x = x.astype(np.float64)
    mu, var = x.mean(0), x.var(0)
    sb, s = np.sqrt(var + eps), np.sqrt(rvar + eps)
    r = np.clip(sb / s, 1 / r_max, r_max)
    d = np.clip((mu - rmean) / s, -d_max, d_max)
    return ((x - mu) / sb * r + d) * scale + bias, r


@pytest.mark.slow
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

    running = (np.asarray(state["mean"]), np.asarray(state["var"]))
    for r_max, d_max in ((1.0, 0.0), (1.5, 0.5), (10.0, 10.0)):
        want, r = _renorm_reference(x, np.asarray(params["scale"]), np.asarray(params["bias"]),
                                    *running, r_max, d_max)
        bound, _ = ref.renorm_forward_bound(x, params["scale"], params["bias"], *running, r_max,
                                            d_max)
        ref.assert_within(f(x, r_max, d_max), want, bound, f"y at r_max={r_max}")
    # gradient: r and d are constants, so dx is the BN closed form scaled by r (r's relative
    # error scales dx once more)
    dy = rng.normal(size=x.shape).astype(np.float32)
    gx = jax.grad(lambda x: jnp.sum(f(x, 1.5, 0.5) * dy))(x)
    _, r = _renorm_reference(x, 1, 0, *running, 1.5, 0.5)
    dx, _, _ = ref.bn_grads(x, np.asarray(params["scale"]) * r, dy)
    _, e_r = ref.renorm_forward_bound(x, None, None, *running, 1.5, 0.5)
    bound = ref.bn_grads_bound(x, np.asarray(params["scale"]) * r, dy)[0] + np.abs(dx) * e_r
    ref.assert_within(gx, dx, bound, "dx")


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
    running = (np.full(F, 2.0), np.full(F, 3.0), 2.0, 1.0)
    ys = [_renorm_reference(g, 1.0, 0.0, *running)[0] for g in groups]
    bounds = [ref.renorm_forward_bound(g, None, None, *running)[0] for g in groups]
    ref.assert_within(y, np.stack(ys).reshape(4, 8, F), np.stack(bounds).reshape(4, 8, F), "y")
    # cumulative average of one update from bn_init's count 0: the batch statistics, the same
    # on every device (averaged over all devices' groups)
    stats = [ref.stats_with_bounds(g) for g in groups]
    for d in range(4):
        _check_group_average(jax.tree.map(lambda a, d=d: a[d], new), stats, unbiased=True,
                             old=(2.0, 3.0))


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
    ref.assert_within(out["mean"], means.astype(np.float64).mean(0),
                      ref.sum_error_bound(np.abs(means).sum(0), 4, ulps=2) / 4, "synced mean")


def _conv64(img, kernel):
    """NHWC x HWIO convolution, stride 1, SAME padding, in float64."""
    img, kernel = np.asarray(img, np.float64), np.asarray(kernel, np.float64)
    kh, kw = kernel.shape[:2]
    p = np.pad(img, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    h, w = img.shape[1:3]
    return sum(p[:, i:i + h, j:j + w, :] @ kernel[i, j] for i in range(kh) for j in range(kw))


def _folded_bound(magnitude, params, state, bias_dev, terms):
    """Bound on a folded layer's float32 output: every term of ``x @ (k * a) + (b - mean) * a +
    beta`` (``a = scale / sigma``) rounded a few times (``a`` itself to a few ulps of rsqrt),
    plus the sum of ``terms`` products and the bias. ``magnitude``: ``|x| @ |k|`` (float64)."""
    u = ref.unit_roundoff(np.float32)
    a = np.abs(np.asarray(params["scale"], np.float64)) / np.sqrt(
        np.asarray(state["var"], np.float64) + 1e-5)
    beta = np.abs(np.asarray(params["bias"], np.float64))
    e_a = (ref.RSQRT_ULPS + 2) * u
    return (magnitude * a + bias_dev * a) * (e_a + (terms + 3) * u) + (terms + 3) * u * beta


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
    mean = np.asarray(state["mean"], np.float64)
    bound = _folded_bound(np.abs(x) @ np.abs(kernel).astype(np.float64), params, state,
                          np.abs(b - mean), 3)
    ref.assert_within(x @ np.asarray(k2) + np.asarray(b2), want, bound, "folded dense")
    ck = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)
    img = rng.normal(size=(2, 6, 6, 2)).astype(np.float32)
    conv = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    kf, bf = jaxbn.fold_conv(ck, None, params, state)
    want = ref.bn_eval(_conv64(img, ck), params["scale"], params["bias"], state["mean"],
                       state["var"])
    bound = _folded_bound(_conv64(np.abs(img), np.abs(ck)), params, state, np.abs(mean), 18)
    ref.assert_within(conv(img, kf) + bf.reshape(1, 1, 1, -1), want, bound, "folded conv")


@pytest.mark.slow
def test_fold_linen_on_a_cnn():
    """Folded and original models, both float32, each within a first-order bound of the exact
    output: every layer's rounding (a few ulps of the magnitudes it sums), carried to the output
    through the layers after it, is at most c u |net|(|x|), where |net| is the same model with
    every weight, scale, bias and shift replaced by its magnitude (a mean by -|mean|, so
    x - mean adds magnitudes), on |x|: affine with nonnegative coefficients, it bounds each
    layer's absolute Jacobian, and ReLU is 1-Lipschitz. c sums each layer's roundings: the
    convolutions' 27 and 54 terms, the 64-term spatial mean, the 5-term dense layer, the
    normalizations and (folded model) the folded weights."""
    model, v, x = _trained_cnn_variables()
    folded = jaxbn.fold_linen(v, {"Conv_0": "BatchNorm_0", "Conv_1": "BatchNorm_1",
                                  "Dense_0": "BatchNorm_2"}, add_bias=True)
    want = model.apply(v, x)
    got = CNN(conv0_bias=True).apply(folded, x)
    with jax.enable_x64(True):
        exact = model.apply(jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), v),
                            jnp.asarray(x, jnp.float64))

        def magnitude(path, a):
            a = jnp.abs(jnp.asarray(a, jnp.float64))
            return -a if path[-1].key == "mean" else a

        size = model.apply(jax.tree_util.tree_map_with_path(magnitude, v),
                           jnp.abs(jnp.asarray(x, jnp.float64)))
    bn_ulps = 2 * ref.RSQRT_ULPS + 6
    c = (27 + 3) + (54 + 3) + (64 + 2) + (5 + 3) + 3 * bn_ulps  # original model
    c_folded = c + 3 * (ref.RSQRT_ULPS + 4)  # each folded kernel and bias
    u = ref.unit_roundoff(np.float32)
    ref.assert_within(want, exact, c * u * np.asarray(size), "original model")
    ref.assert_within(got, exact, c_folded * u * np.asarray(size), "folded model")


def _check_pooled(mean, var, data, batch_stats):
    """Precise statistics against the mean and biased variance of all ``data`` (float64),
    within the bound of Chan's pooled update applied batch after batch."""
    acc = (0.0, 0.0, 0.0, 0.0, 0.0)
    for st in batch_stats:
        acc = ref.accumulate_bound(acc, st)
    ref.assert_within(mean, data.mean(0), acc[3], "pooled mean")
    ref.assert_within(var, data.var(0), acc[4], "pooled var")


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
    _check_pooled(state["mean"], state["var"], valid,
                  [ref.stats_with_bounds(x, mask=m) for x, m in zip(xs, mask, strict=True)])


@pytest.mark.slow
def test_precise_bn_linen_and_nnx_helpers():
    xs = _batches(k=3, n=6, seed=7)
    concat = xs.reshape(-1, F).astype(np.float64)
    bn = jaxbn.linen.BatchNorm(use_running_average=False)
    v = bn.init(jax.random.key(0), xs[0])
    v = jaxbn.precise_linen_stats(jax.jit(bn.apply, static_argnames="mutable"), v, list(xs))
    stats = [ref.stats_with_bounds(x) for x in xs]
    _check_pooled(v["batch_stats"]["mean"], v["batch_stats"]["var"], concat, stats)
    m = jaxbn.nnx.BatchNorm(F, rngs=nnx.Rngs(0))
    jaxbn.nnx.precise_stats(m, list(xs))
    _check_pooled(m.mean[...], m.var[...], concat, stats)
    assert not hasattr(m, "seen")


@pytest.mark.slow
def test_wrappers_expose_the_features():
    xs = _batches(k=2, n=8, seed=8)
    lin = jaxbn.linen.BatchNorm(use_running_average=False, momentum=None,
                                unbiased_running_var=True)
    v = lin.init(jax.random.key(0), xs[0])
    assert "count" in v["batch_stats"]
    for x in xs:
        _, upd = lin.apply(v, x, mutable=["batch_stats"])
        v = {**v, **upd}
    u = ref.unit_roundoff(np.float32)
    unbiased = []  # each batch's unbiased variance, with its bound (Bessel's factor 8/7)
    for x in xs:
        _, var, n, _, e_var = ref.stats_with_bounds(x)
        unbiased.append((0, var * n / (n - 1), 0, (e_var + 3 * u * var) * n / (n - 1)))
    want, bound = _averaged(unbiased)["var"]
    ref.assert_within(v["batch_stats"]["var"], want, bound, "cumulative unbiased var")
    m = jaxbn.nnx.BatchNorm(F, virtual_batch_size=4, momentum=0.0, rngs=nnx.Rngs(0))
    y = m(xs[0])
    groups = xs[0].reshape(2, 4, F)
    ref.assert_within(y, np.concatenate([ref.bn_forward(g, None, None) for g in groups]),
                      np.concatenate([ref.bn_forward_bound(g, None, None) for g in groups]),
                      "ghost-batch y")


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
    _check_pooled(state["mean"], state["var"], concat,
                  [ref.stats_with_bounds(x.reshape(-1, F)) for x in xs])
    assert int(state["count"]) == 2
