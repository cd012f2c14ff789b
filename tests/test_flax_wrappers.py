"""jaxbn.linen / jaxbn.nnx side by side with Flax's own BatchNorm (stable mode)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxbn.linen
import jaxbn.nnx

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _x(shape, dtype=jnp.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(2.0, 3.0, shape), dtype)


def _assert_tree_close(a, b, tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert u.shape == v.shape and u.dtype == v.dtype, (u.shape, v.shape, u.dtype, v.dtype)
        np.testing.assert_allclose(np.asarray(u, np.float32), np.asarray(v, np.float32),
                                   rtol=tol, atol=tol)


LINEN_CASES = [
    dict(shape=(8, 5), kw=dict(axis=-1)),
    dict(shape=(4, 3, 3, 6), kw=dict(axis=-1, use_bias=False)),
    dict(shape=(4, 6, 3, 3), kw=dict(axis=1, use_scale=False)),
    dict(shape=(4, 2, 3, 5), kw=dict(axis=(1, 3))),
    dict(shape=(4, 3, 3, 6), kw=dict(axis=-1), dtype=jnp.bfloat16),
    dict(shape=(4, 3, 3, 6), kw=dict(axis=-1, dtype=jnp.bfloat16)),
    dict(shape=(8, 5), kw=dict(axis=-1, use_bias=False, use_scale=False), dtype=jnp.bfloat16),
]


@pytest.mark.parametrize("case", LINEN_CASES, ids=lambda c: str(c["kw"]) + str(c.get("dtype")))
@pytest.mark.parametrize("masked", [False, True])
def test_linen_matches_flax(case, masked):
    dtype = case.get("dtype", jnp.float32)
    x = _x(case["shape"], dtype)
    mask = None
    if masked:
        mask = jnp.asarray(np.random.default_rng(1).random(case["shape"][:1] + (1,) * (
            len(case["shape"]) - 1)) < 0.7).at[0].set(True)
    ours = jaxbn.linen.BatchNorm(momentum=0.9, **case["kw"])
    theirs = nn.BatchNorm(momentum=0.9, use_fast_variance=False, **case["kw"])
    v_ours = ours.init(jax.random.key(0), x, use_running_average=False)
    v_theirs = theirs.init(jax.random.key(0), x, use_running_average=False)
    _assert_tree_close(v_ours, v_theirs, 0)
    params = jax.tree.map(lambda p: p * 1.5 + 0.25, v_theirs.get("params", {}))
    variables = {"params": params, "batch_stats": v_theirs["batch_stats"]}
    tol = TOL[jnp.bfloat16 if jnp.bfloat16 in (dtype, case["kw"].get("dtype")) else jnp.float32]
    y1, s1 = ours.apply(variables, x, use_running_average=False, mask=mask,
                        mutable=["batch_stats"])
    y2, s2 = theirs.apply(variables, x, use_running_average=False, mask=mask,
                          mutable=["batch_stats"])
    assert y1.dtype == y2.dtype
    _assert_tree_close(y1, y2, tol)
    _assert_tree_close(s1, s2, 1e-5)
    # eval mode with the updated statistics (Flax-made variables load as they are)
    ev = {"params": params, "batch_stats": s2["batch_stats"]}
    e1 = ours.apply(ev, x, use_running_average=True)
    e2 = theirs.apply(ev, x, use_running_average=True)
    assert e1.dtype == e2.dtype
    _assert_tree_close(e1, e2, tol)


def test_linen_use_running_average_rules():
    x = _x((4, 3))
    with pytest.raises(ValueError):
        jaxbn.linen.BatchNorm().init(jax.random.key(0), x)  # given nowhere
    with pytest.raises(ValueError):
        jaxbn.linen.BatchNorm(use_running_average=True).init(jax.random.key(0), x, True)


def test_linen_init_outside_pmap_then_pmap_matches_flax():
    x = _x((8, 4, 3))
    ours = jaxbn.linen.BatchNorm(use_running_average=False, axis_name="batch", momentum=0.9)
    theirs = nn.BatchNorm(use_running_average=False, axis_name="batch", momentum=0.9,
                          use_fast_variance=False)
    variables = ours.init(jax.random.key(0), x[0])  # no bound axis: must not communicate
    assert int(jnp.sum(variables["batch_stats"]["mean"] != 0)) == 0
    rep = jax.tree.map(lambda a: jnp.stack([a] * 8), variables)

    def run(mod):
        return jax.pmap(lambda v, x: mod.apply(v, x, mutable=["batch_stats"]),
                        axis_name="batch")(rep, x)

    _assert_tree_close(run(ours), run(theirs), 1e-5)


def test_linen_under_nn_vmap_equals_flat_batch():
    x = _x((6, 3))

    class PerExample(nn.Module):
        @nn.compact
        def __call__(self, x):
            bn = nn.vmap(jaxbn.linen.BatchNorm, in_axes=0, out_axes=0, axis_name="batch",
                         variable_axes={"params": None, "batch_stats": None},
                         split_rngs={"params": False})
            return bn(use_running_average=False, axis_name="batch", momentum=0.5)(x)

    model = PerExample()
    variables = model.init(jax.random.key(0), x)
    y, upd = model.apply(variables, x, mutable=["batch_stats"])
    inner = {col: next(iter(tree.values())) for col, tree in variables.items()}
    flat = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.5)
    y_ref, upd_ref = flat.apply(inner, x, mutable=["batch_stats"])
    _assert_tree_close(y, y_ref, 1e-5)
    _assert_tree_close(next(iter(upd["batch_stats"].values())), upd_ref["batch_stats"], 1e-5)


class CNN(nn.Module):
    norm: type = nn.BatchNorm

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3))(x)
        x = self.norm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.Conv(8, (3, 3), strides=2)(x)
        x = self.norm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x).mean(axis=(1, 2))
        return nn.Dense(4)(x)


def _train_cnn(norm, steps=3):
    x = _x((8, 8, 8, 2), seed=3)
    labels = jnp.arange(8) % 4
    model = CNN(norm)
    variables = model.init(jax.random.key(0), x, train=False)
    tx = optax.sgd(0.1)
    opt_state = tx.init(variables["params"])

    @jax.jit
    def step(params, stats, opt_state):
        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                      mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, upd["batch_stats"]
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    params, stats, losses = variables["params"], variables["batch_stats"], []
    for _ in range(steps):
        params, stats, opt_state, loss = step(params, stats, opt_state)
        losses.append(float(loss))
    return params, stats, losses


def test_linen_cnn_trains_like_flax():
    stable = lambda **kw: nn.BatchNorm(use_fast_variance=False, **kw)  # noqa: E731
    p1, s1, l1 = _train_cnn(jaxbn.linen.BatchNorm)
    p2, s2, l2 = _train_cnn(stable)
    np.testing.assert_allclose(l1, l2, rtol=1e-4)
    assert l1[-1] < l1[0]
    _assert_tree_close((p1, s1), (p2, s2), 1e-4)


# ----------------------------------------------------------------------------- nnx


@pytest.mark.parametrize("kw", [dict(), dict(use_bias=False), dict(use_scale=False),
                                dict(axis=1), dict(dtype=jnp.bfloat16)], ids=str)
@pytest.mark.parametrize("masked", [False, True])
def test_nnx_matches_flax(kw, masked):
    shape = (4, 3, 3, 5) if kw.get("axis") != 1 else (4, 5, 3, 3)
    x = _x(shape)
    mask = None
    if masked:
        mask = jnp.asarray(np.random.default_rng(2).random((4, 1, 1, 1)) < 0.6).at[0].set(True)
    ours = jaxbn.nnx.BatchNorm(5, momentum=0.9, rngs=nnx.Rngs(0), **kw)
    theirs = nnx.BatchNorm(5, momentum=0.9, use_fast_variance=False, rngs=nnx.Rngs(0), **kw)
    _assert_tree_close(nnx.state(ours), nnx.state(theirs), 0)
    y1, y2 = ours(x, mask=mask), theirs(x, mask=mask)
    assert y1.dtype == y2.dtype
    _assert_tree_close(y1, y2, 2e-2 if "dtype" in kw else 1e-5)
    # With dtype=bfloat16 Flax computes its statistics in bfloat16; jaxbn keeps float32.
    _assert_tree_close(nnx.state(ours, nnx.BatchStat), nnx.state(theirs, nnx.BatchStat),
                       2e-3 if "dtype" in kw else 1e-5)
    ours.eval()
    theirs.eval()
    _assert_tree_close(ours(x), theirs(x), 2e-2 if "dtype" in kw else 1e-5)


def test_nnx_modes_view_and_errors():
    bn = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    x = _x((6, 3))
    viewed = nnx.view(bn, use_running_average=True)
    before = bn.mean[...]
    viewed(x)
    np.testing.assert_array_equal(bn.mean[...], before)  # eval view leaves statistics alone
    bn(x)
    assert not np.array_equal(bn.mean[...], before)
    bn.eval()
    assert bn.use_running_average
    bn.train()
    assert not bn.use_running_average
    with pytest.raises(ValueError, match="use_running_average"):
        jaxbn.nnx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))(x)


class NNXNet(nnx.Module):
    def __init__(self, norm, rngs):
        self.lin = nnx.Linear(4, 6, rngs=rngs)
        self.bn = norm(6, momentum=0.9, rngs=rngs)
        self.out = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.bn(self.lin(x))))


def _train_nnx(norm):
    stable = norm if norm is jaxbn.nnx.BatchNorm else (
        lambda *a, **k: nnx.BatchNorm(*a, use_fast_variance=False, **k))
    model = NNXNet(stable, nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    x = _x((10, 4), seed=5)
    labels = jnp.arange(10) % 3

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(3)]
    return losses, nnx.state(model)


def test_nnx_optimizer_jit_trains_like_flax():
    l1, s1 = _train_nnx(jaxbn.nnx.BatchNorm)
    l2, s2 = _train_nnx(nnx.BatchNorm)
    np.testing.assert_allclose(l1, l2, rtol=1e-4)
    _assert_tree_close(s1, s2, 1e-4)


def test_nnx_vmap_and_scan():
    x = _x((3, 8, 4))

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return jaxbn.nnx.BatchNorm(4, momentum=0.5, rngs=rngs)

    ens = make(nnx.Rngs(0))

    @nnx.vmap(in_axes=(0, 0), out_axes=0)
    def run(m, x):
        return m(x)

    y = run(ens, x)
    for i in range(3):
        xi = np.asarray(x[i], np.float64)
        want = (xi - xi.mean(0)) / np.sqrt(xi.var(0) + 1e-5)
        np.testing.assert_allclose(y[i], want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ens.mean[...][i], 0.5 * xi.mean(0), rtol=1e-5, atol=1e-6)

    bn = jaxbn.nnx.BatchNorm(4, momentum=0.5, rngs=nnx.Rngs(0))

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def over_batches(m, xb):
        return m, m(xb)

    over_batches(bn, x)
    mean = np.zeros(4)
    for i in range(3):
        mean = 0.5 * mean + 0.5 * np.asarray(x[i], np.float64).mean(0)
    np.testing.assert_allclose(bn.mean[...], mean, rtol=1e-5)
