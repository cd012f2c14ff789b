"""jaxbn.linen / jaxbn.nnx side by side with Flax's own BatchNorm (stable mode)."""

import re
import warnings

import flax.core
import flax.errors
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

import jaxbn
import jaxbn.linen
import jaxbn.nnx
from tests import reference

# Training trajectories (3 SGD steps of a small network, jaxbn's BatchNorm against Flax's
# stable one): no error bound is derived for them; their differences come only from the two
# float32 BatchNorms (each within ~1e-6 relative of float64, see _pair below) carried through
# a few layers and steps, far below this.
TRAJECTORY_TOL = 1e-4


def _x(shape, dtype=jnp.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(2.0, 3.0, shape), dtype)


def _bf16(a):
    """float64 values of ``a`` rounded to bfloat16 (to nearest even, as XLA converts)."""
    return np.asarray(np.asarray(a, np.float32).astype(ml_dtypes.bfloat16), np.float64)


def _pair(x, scale, bias, axis, mask=None, momentum=0.9, old=(0.0, 1.0), out_dtype=None):
    """Bounds on |jaxbn - Flax| for one training step: ``(y, running mean, running var)``,
    the sum of both float32 bounds of the exact results (jaxbn: the stable algorithm; Flax,
    use_fast_variance=False: the plain two-pass one), ``y`` rounded once to ``out_dtype``."""
    x = np.asarray(x, np.float64)
    y = stats = 0.0
    feats = tuple(x.shape[a % x.ndim] for a in sorted(
        a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)))
    stats = {"mean": 0.0, "var": 0.0}
    for stable in (True, False):
        y = y + reference.bn_forward_bound(x, scale, bias, axis, mask, out_dtype=out_dtype,
                                           stable=stable)
        mo = reference.moments_bound(x, axis, mask, stable=stable)
        for k, o in zip(("mean", "var"), old, strict=True):
            stats[k] = stats[k] + reference.ema_bound(o, mo[k].reshape(feats), mo[
                f"e_{k}_stored"].reshape(feats), momentum)
    return y, stats


def _within_stats(a, b, bounds, what):
    for k in ("mean", "var"):
        assert a[k].dtype == b[k].dtype, (a[k].dtype, b[k].dtype)
        reference.assert_within(a[k], b[k], bounds[k], f"{what}: running {k}")


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
    y1, s1 = ours.apply(variables, x, use_running_average=False, mask=mask,
                        mutable=["batch_stats"])
    y2, s2 = theirs.apply(variables, x, use_running_average=False, mask=mask,
                          mutable=["batch_stats"])
    assert y1.dtype == y2.dtype
    # both compute in float32 (x as given, statistics float32) and round y once to its dtype
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    axis, scale, bias = case["kw"]["axis"], params.get("scale"), params.get("bias")
    y_bound, stats_bound = _pair(x64, scale, bias, axis, mask, out_dtype=y1.dtype)
    reference.assert_within(y1, y2, y_bound, "y vs Flax")
    _within_stats(s1["batch_stats"], s2["batch_stats"], stats_bound, "vs Flax")
    # eval mode with the updated statistics (Flax-made variables load as they are)
    ev = {"params": params, "batch_stats": s2["batch_stats"]}
    e1 = ours.apply(ev, x, use_running_average=True)
    e2 = theirs.apply(ev, x, use_running_average=True)
    assert e1.dtype == e2.dtype
    st = s2["batch_stats"]
    reference.assert_within(e1, e2, 2 * reference.bn_eval_bound(
        x64, scale, bias, st["mean"], st["var"], axis, out_dtype=e1.dtype), "eval vs Flax")


def test_linen_use_running_average_rules():
    x = _x((4, 3))
    with pytest.raises(ValueError):
        jaxbn.linen.BatchNorm().init(jax.random.key(0), x)  # given nowhere
    with pytest.raises(ValueError):
        jaxbn.linen.BatchNorm(use_running_average=True).init(jax.random.key(0), x, True)


@pytest.mark.slow
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

    (y1, u1), (y2, u2) = run(ours), run(theirs)
    y_bound, stats_bound = _pair(np.asarray(x).reshape(32, 3), None, None, -1)  # 8 devices
    reference.assert_within(np.asarray(y1).reshape(32, 3), np.asarray(y2).reshape(32, 3),
                            y_bound, "y vs Flax")
    for d in range(8):
        _within_stats(jax.tree.map(lambda a, d=d: a[d], u1["batch_stats"]),
                      jax.tree.map(lambda a, d=d: a[d], u2["batch_stats"]), stats_bound,
                      f"device {d} vs Flax")


@pytest.mark.slow
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
    y_flat, upd_flat = flat.apply(inner, x, mutable=["batch_stats"])
    # per example under nn.vmap (statistics over the axis name) and on the flat batch: each
    # within its float32 bound of the float64 reference
    x64 = np.asarray(x, np.float64)
    y_bound = reference.bn_forward_bound(x64, None, None)
    mo = reference.moments_bound(x64)
    stats_bound = {k: reference.ema_bound(o, mo[k].ravel(), mo[f"e_{k}_stored"].ravel(), 0.5)
                   for k, o in (("mean", 0.0), ("var", 1.0))}
    want = {"mean": reference.ema(0.0, mo["mean"].ravel(), 0.5),
            "var": reference.ema(1.0, mo["var"].ravel(), 0.5)}
    for what, yy, st in (("nn.vmap", y, next(iter(upd["batch_stats"].values()))),
                         ("flat", y_flat, upd_flat["batch_stats"])):
        reference.assert_within(yy, reference.bn_forward(x64, None, None), y_bound, f"{what} y")
        for k in ("mean", "var"):
            reference.assert_within(st[k], want[k], stats_bound[k], f"{what} running {k}")


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


@pytest.mark.slow
def test_linen_cnn_trains_like_flax():
    stable = lambda **kw: nn.BatchNorm(use_fast_variance=False, **kw)  # noqa: E731
    p1, s1, l1 = _train_cnn(jaxbn.linen.BatchNorm)
    p2, s2, l2 = _train_cnn(stable)
    np.testing.assert_allclose(l1, l2, rtol=TRAJECTORY_TOL)
    assert l1[-1] < l1[0]
    _assert_tree_close((p1, s1), (p2, s2), TRAJECTORY_TOL)


# ----------------------------------------------------------------------------- nnx


@pytest.mark.slow
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
    axis = kw.get("axis", -1)
    x64 = np.asarray(x, np.float64)
    y_bound, stats_bound = _pair(x64, None, None, axis, mask, out_dtype=y1.dtype)
    # With dtype=bfloat16 Flax rounds x to bfloat16 first (its statistics are those of the
    # rounded x); jaxbn keeps float32. Their exact results differ by the effect of that
    # rounding, computed here in float64, on top of both float32 bounds.
    xr = _bf16(x64) if "dtype" in kw else x64
    y_gap = np.abs(reference.bn_forward(x64, None, None, axis, mask)
                   - reference.bn_forward(xr, None, None, axis, mask))
    reference.assert_within(y1, y2, y_bound + y_gap, "y vs Flax")
    m_ours, m_theirs = (reference.moments_bound(a, axis, mask) for a in (x64, xr))
    gap = {k: 0.1 * np.abs(m_ours[k] - m_theirs[k]).reshape(5) for k in ("mean", "var")}
    _within_stats({"mean": ours.mean[...], "var": ours.var[...]},
                  {"mean": theirs.mean[...], "var": theirs.var[...]},
                  {k: stats_bound[k] + gap[k] for k in gap}, "vs Flax")
    ours.eval()
    theirs.eval()
    e1, e2 = ours(x), theirs(x)
    assert e1.dtype == e2.dtype
    mean, var = np.asarray(ours.mean[...], np.float64), np.asarray(ours.var[...], np.float64)
    e_bound = 2 * reference.bn_eval_bound(x64, None, None, mean, var, axis, out_dtype=e1.dtype)
    if "dtype" in kw:  # Flax's inference runs in bfloat16 on bfloat16-rounded x and statistics
        flax_mean, flax_var = (_bf16(theirs.mean[...]), _bf16(theirs.var[...]))
        e_bound = e_bound + reference.bn_eval_bound(xr, None, None, flax_mean, flax_var, axis,
                                                    dtype=jnp.bfloat16) + np.abs(
            reference.bn_eval(x64, None, None, mean, var, axis)
            - reference.bn_eval(xr, None, None, flax_mean, flax_var, axis))
    reference.assert_within(e1, e2, e_bound, "eval vs Flax")


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


@pytest.mark.slow
def test_nnx_optimizer_jit_trains_like_flax():
    l1, s1 = _train_nnx(jaxbn.nnx.BatchNorm)
    l2, s2 = _train_nnx(nnx.BatchNorm)
    np.testing.assert_allclose(l1, l2, rtol=TRAJECTORY_TOL)
    _assert_tree_close(s1, s2, TRAJECTORY_TOL)


@pytest.mark.slow
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
        reference.assert_within(y[i], want, reference.bn_forward_bound(xi, None, None),
                                f"member {i} y")
        mo = reference.moments_bound(xi)
        reference.assert_within(ens.mean[...][i], 0.5 * xi.mean(0), reference.ema_bound(
            0.0, mo["mean"].ravel(), mo["e_mean_stored"].ravel(), 0.5), f"member {i} mean")

    bn = jaxbn.nnx.BatchNorm(4, momentum=0.5, rngs=nnx.Rngs(0))

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def over_batches(m, xb):
        return m, m(xb)

    over_batches(bn, x)
    mean, bound = np.zeros(4), 0.0
    for i in range(3):
        mo = reference.moments_bound(np.asarray(x[i], np.float64))
        batch = mo["mean"].ravel()
        bound = reference.ema_bound(mean, batch, mo["e_mean_stored"].ravel(), 0.5, e_old=bound)
        mean = 0.5 * mean + 0.5 * batch
    reference.assert_within(bn.mean[...], mean, bound, "running mean after 3 batches")


# ----------------------------------------------------------------------------- issue 21 item 9


def _dtypes(tree):
    return jax.tree.map(lambda v: jnp.dtype(v.dtype).name, tree)


LINEN_DTYPE_CASES = [
    (jnp.float32, {}),
    (jnp.bfloat16, {}),
    (jnp.float32, dict(dtype=jnp.bfloat16)),
    (jnp.bfloat16, dict(dtype=jnp.bfloat16)),
    (jnp.bfloat16, dict(force_float32_reductions=False, param_dtype=jnp.bfloat16)),
    (jnp.float16, dict(force_float32_reductions=False, param_dtype=jnp.float16)),
    # Flax creates bfloat16 here and widens it to float32 at its first step; jaxbn keeps it
    (jnp.float32, dict(force_float32_reductions=False, param_dtype=jnp.bfloat16)),
]


@pytest.mark.parametrize("x_dtype,kw", LINEN_DTYPE_CASES,
                         ids=lambda v: jnp.dtype(v).name if not isinstance(v, dict) else str(v))
def test_linen_creates_flax_dtypes_and_keeps_them(x_dtype, kw):
    x = _x((6, 3), x_dtype)
    ours = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.5, **kw)
    theirs = nn.BatchNorm(use_running_average=False, momentum=0.5, **kw)
    v_ours, v_theirs = ours.init(jax.random.key(0), x), theirs.init(jax.random.key(0), x)
    assert _dtypes(v_ours) == _dtypes(v_theirs)
    for variables in (v_ours, v_theirs):  # jaxbn's own state, and a Flax-made one
        _, upd = ours.apply(variables, x, mutable=["batch_stats"])
        assert _dtypes(upd["batch_stats"]) == _dtypes(variables["batch_stats"])


NNX_DTYPE_CASES = [
    (jnp.float32, {}),
    (jnp.bfloat16, {}),
    (jnp.float32, dict(dtype=jnp.bfloat16)),
    (jnp.bfloat16, dict(param_dtype=jnp.bfloat16)),
    (jnp.float16, dict(param_dtype=jnp.float16, dtype=jnp.float16)),
]


@pytest.mark.parametrize("x_dtype,kw", NNX_DTYPE_CASES,
                         ids=lambda v: jnp.dtype(v).name if not isinstance(v, dict) else str(v))
def test_nnx_creates_flax_dtypes_and_keeps_them(x_dtype, kw):
    x = _x((6, 3), x_dtype)
    ours = jaxbn.nnx.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0), **kw)
    theirs = nnx.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0), **kw)
    before = _dtypes(nnx.state(ours))
    assert before == _dtypes(nnx.state(theirs))
    ours(x)
    theirs(x)
    assert _dtypes(nnx.state(ours)) == before == _dtypes(nnx.state(theirs))


@pytest.mark.slow  # first case > 0.7 s on 2 cores (conftest's rule)
def test_float64_statistic_dtypes():
    """jaxbn.linen creates float64 statistics for float64 input (Flax: float32 at init, float64
    after its first step, so a lax.scan carry changes dtype); a float32 state (a Flax init
    checkpoint) stays float32. jaxbn.nnx creates float32 as Flax does, and float64 with a
    float64 param_dtype (Flax: float32)."""
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float64)
        ours = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.5)
        theirs = nn.BatchNorm(use_running_average=False, momentum=0.5)
        v_ours, v_theirs = ours.init(jax.random.key(0), x), theirs.init(jax.random.key(0), x)
        _, u_theirs = theirs.apply(v_theirs, x, mutable=["batch_stats"])
        assert _dtypes(v_theirs["batch_stats"]) == {"mean": "float32", "var": "float32"}
        assert _dtypes(v_ours["batch_stats"]) == _dtypes(u_theirs["batch_stats"]) == {
            "mean": "float64", "var": "float64"}
        _, u_ours = ours.apply(v_theirs, x, mutable=["batch_stats"])
        assert _dtypes(u_ours["batch_stats"]) == {"mean": "float32", "var": "float32"}
        for kw, want in (({}, "float32"), (dict(param_dtype=jnp.float64), "float64")):
            bn = jaxbn.nnx.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0), **kw)
            assert nnx.state(nnx.BatchNorm(3, rngs=nnx.Rngs(0), **kw))["mean"][...].dtype == (
                jnp.float32)
            bn(x)
            assert (bn.mean[...].dtype.name, bn.var[...].dtype.name) == (want, want)


def _ema_step_bound(old, x, momentum, stored_dtype):
    """Reference (float64) and bound of one running update from the stored ``old`` state with
    the batch ``x`` (features last), computed in float32 and rounded to ``stored_dtype``."""
    mo = reference.moments_bound(np.asarray(x, np.float64), axis=-1, dtype=np.float32)
    u_store = reference.unit_roundoff(stored_dtype)
    out = {}
    for name, e_key in (("mean", "e_mean"), ("var", "e_var")):
        prev = np.asarray(old[name], np.float64)
        batch = mo[name].ravel()
        ref = reference.ema(prev, batch, momentum)
        bound = reference.ema_bound(prev, batch, mo[e_key].ravel(), momentum, np.float32)
        out[name] = (ref, bound + u_store * (np.abs(ref) + bound))
    return out


@pytest.mark.slow  # first case > 0.7 s on 2 cores (conftest's rule)
def test_flax_bfloat16_checkpoint_keeps_bfloat16_through_scan_and_warns():
    """Issue 21 item 9: Flax's bfloat16 statistics (force_float32_reductions=False), restored
    into the jaxbn model, stay bfloat16 step after step (a lax.scan carry), follow the
    float64 EMA within one bfloat16 rounding per step, and the stall is warned about when the
    step is traced (momentum 0.99: a bfloat16 average can stop 39% short)."""
    bf16 = jnp.bfloat16
    xs = jnp.asarray(np.random.default_rng(7).normal(2.0, 3.0, (4, 16, 3)), bf16)
    kw = dict(use_running_average=False, force_float32_reductions=False, param_dtype=bf16)
    checkpoint = flax.serialization.to_bytes(nn.BatchNorm(**kw).init(jax.random.key(0), xs[0]))
    ours = jaxbn.linen.BatchNorm(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # init updates nothing: no warning
        target = ours.init(jax.random.key(0), xs[0])
    variables = flax.serialization.from_bytes(target, checkpoint)
    assert _dtypes(variables) == _dtypes(target)
    assert set(jax.tree.leaves(_dtypes(variables))) == {"bfloat16"}

    def step(stats, x):
        y, upd = ours.apply({"params": variables["params"], "batch_stats": stats}, x,
                            mutable=["batch_stats"])
        return upd["batch_stats"], (y, upd["batch_stats"])

    run = jax.jit(lambda stats, xs: jax.lax.scan(step, stats, xs))
    with pytest.warns(UserWarning, match=r"bfloat16 with momentum=0\.99.*float32") as caught:
        final, (ys, states) = run(variables["batch_stats"], xs)
    assert len(caught) == 2  # mean and var, once, while tracing
    run(variables["batch_stats"], xs)  # no new trace, no warning (warnings are errors here)
    assert _dtypes(final) == {"mean": "bfloat16", "var": "bfloat16"}
    assert ys.dtype == bf16
    old = variables["batch_stats"]
    for k in range(xs.shape[0]):
        for name, (ref, bound) in _ema_step_bound(old, xs[k], 0.99, bf16).items():
            reference.assert_within(states[name][k], ref, bound, f"step {k} {name}")
        y_ref = reference.bn_forward(np.asarray(xs[k], np.float64), None, None)
        y_bound = reference.bn_forward_bound(np.asarray(xs[k], np.float64), None, None,
                                             out_dtype=bf16)
        reference.assert_within(ys[k], y_ref, y_bound, f"step {k} y")
        old = {name: states[name][k] for name in ("mean", "var")}


def test_nnx_bfloat16_statistics_stay_bfloat16_and_warn_when_traced():
    bn = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))  # momentum 0.99
    bn.mean.set_value(jnp.zeros(3, jnp.bfloat16))  # e.g. restored from a bfloat16 checkpoint
    bn.var.set_value(jnp.ones(3, jnp.bfloat16))
    x = _x((16, 3))
    old = {"mean": bn.mean[...], "var": bn.var[...]}
    with pytest.warns(UserWarning, match=r"bfloat16 with momentum=0\.99.*float32"):
        nnx.jit(lambda m, x: m(x))(bn, x)
    assert (bn.mean[...].dtype, bn.var[...].dtype) == (jnp.bfloat16, jnp.bfloat16)
    for name, (ref, bound) in _ema_step_bound(old, x, 0.99, jnp.bfloat16).items():
        reference.assert_within(getattr(bn, name)[...], ref, bound, name)


# ----------------------------------------------------------------------------- issue 21 item 7


def test_linen_training_call_without_mutable_says_what_to_do():
    x = _x((6, 3))
    bn = jaxbn.linen.BatchNorm()
    variables = bn.init(jax.random.key(0), x, use_running_average=False)
    with pytest.raises(jaxbn.linen.BatchStatsNotMutableError,
                       match=r"training mode.*mutable=\['batch_stats'\].*use_running_average"
                             r"=True") as info:
        bn.apply(variables, x, use_running_average=False)
    assert isinstance(info.value, flax.errors.ModifyScopeVariableError)  # Flax's type too
    bn.apply(variables, x, use_running_average=True)  # evaluation needs no mutable

    class Net(nn.Module):  # Flax's own BatchNorm, run by jaxbn under intercept()
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=False)(nn.Dense(3)(x))

    net_vars = Net().init(jax.random.key(0), x)
    with jaxbn.linen.intercept(), pytest.raises(jaxbn.linen.BatchStatsNotMutableError,
                                                match="'BatchNorm_0'"):
        Net().apply(net_vars, x)


def test_linen_stored_statistics_of_other_features_say_so():
    bn = jaxbn.linen.BatchNorm(use_running_average=False, use_scale=False, use_bias=False)
    variables = bn.init(jax.random.key(0), _x((6, 3)))
    with pytest.raises(ValueError, match=r"batch_stats/mean has shape \(3,\).*features \(5,\)"
                                         r".*axis=-1"):
        bn.apply(variables, _x((6, 5)), mutable=["batch_stats"])


def test_nnx_feature_mismatch_speaks_of_the_module():
    bn = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    for x, size in ((_x((6, 5)), "5"), (_x((6, 3, 2)), "2")):
        with pytest.raises(ValueError, match=rf"BatchNorm\(num_features=3, axis=-1\) got x of "
                                             rf"shape {re.escape(str(x.shape))}.*is {size}:.*"
                                             rf"num_features.*axis=") as info:
            bn(x)
        assert "bn_init" not in str(info.value) and "params[" not in str(info.value)
    channels_first = jaxbn.nnx.BatchNorm(3, axis=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"axis=1\) got x of shape \(6, 2, 3\)"):
        channels_first(_x((6, 2, 3)))


def test_frozen_dict_variables_keep_flax_container_types():
    """The wrappers hand containers back as Flax's own BatchNorm does."""
    x = _x((6, 3))
    outs = []
    for cls in (jaxbn.linen.BatchNorm, nn.BatchNorm):
        bn = cls(use_running_average=False, momentum=0.5)
        frozen = flax.core.freeze(bn.init(jax.random.key(0), x))
        _, upd = bn.apply(frozen, x, mutable=["batch_stats"])
        outs.append(upd)
    assert jax.tree.structure(outs[0]) == jax.tree.structure(outs[1])
    assert type(outs[0]) is type(outs[1]) and type(outs[0]["batch_stats"]) is type(
        outs[1]["batch_stats"])
    bn = jaxbn.linen.BatchNorm(use_running_average=False)
    frozen = flax.core.freeze(bn.init(jax.random.key(0), x))
    precise = jaxbn.precise_linen_stats(bn.apply, frozen, [x, x + 1])
    assert isinstance(precise, flax.core.FrozenDict)
    assert jax.tree.structure(precise) == jax.tree.structure(frozen)


# ----------------------------------------------------------------------------- issue 23


NON_DEFAULT = dict(axis=(-1,), momentum=0.8, epsilon=1e-3, unbiased_running_var=True,
                   virtual_batch_size=4, renorm=(3.0, 5.0), skip_nonfinite=True,
                   sync_method="reduce")


@pytest.mark.slow  # first case > 0.7 s on 2 cores (conftest's rule)
def test_wrappers_hand_their_fields_to_the_core_as_one_options(monkeypatch):
    """Each Options field a wrapper exposes reaches the core under its own name (no list of
    options in the wrappers); allow_single_value is Flax's behaviour, always on."""
    from jaxbn._src import core
    from jaxbn._src.options import Options

    seen = []
    real_apply = core.apply

    def spy(params, state, x, train, options, mask=None):
        seen.append(options)
        return real_apply(params, state, x, train, options, mask)

    monkeypatch.setattr(core, "apply", spy)
    x = _x((8, 3))
    linen_fields = set(jaxbn.linen.BatchNorm.__dataclass_fields__)
    exposed = [f for f in Options._fields if f in linen_fields]
    assert set(exposed) == set(NON_DEFAULT) | {"axis_name", "axis_index_groups"}
    bn = jaxbn.linen.BatchNorm(use_running_average=False, **NON_DEFAULT)
    bn.apply(bn.init(jax.random.key(0), x), x, mutable=["batch_stats"])
    m = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0), **NON_DEFAULT)
    m(x)
    for options in (seen[-2], seen[-1]):  # the linen apply, the nnx call
        assert options._replace(axis_name=None, axis_index_groups=None) == Options(
            **NON_DEFAULT, allow_single_value=True)
    converted = jaxbn.nnx.convert(nnx.BatchNorm(3, rngs=nnx.Rngs(0)), sync_method="gather")
    converted(x)
    assert seen[-1].sync_method == "gather"
    with jaxbn.linen.intercept(sync_method="gather"):
        flax_bn = nn.BatchNorm(use_running_average=False)
        flax_bn.apply(flax_bn.init(jax.random.key(0), x), x, mutable=["batch_stats"])
    assert seen[-1].sync_method == "gather"
    bad = jaxbn.linen.BatchNorm(use_running_average=False, sync_method="fast")
    with pytest.raises(ValueError, match=r"sync_method must be one of .*'fast'"):
        bad.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"sync_method must be one of .*'fast'"):
        jaxbn.nnx.BatchNorm(3, sync_method="fast", rngs=nnx.Rngs(0))(x)


@pytest.mark.slow  # first case > 0.7 s on 2 cores (conftest's rule)
@pytest.mark.parametrize("method", ["gather", "reduce"])
def test_sync_method_over_devices_matches_float64(method):
    """sync_method from the linen field and the nnx argument, under pmap over 4 devices:
    the pooled statistics are those of the whole batch (float64 reference, error bounds)."""
    x = _x((4, 6, 3), seed=11)
    flat = np.asarray(x, np.float64).reshape(24, 3)
    want_y = reference.bn_forward(flat, None, None)
    y_bound = reference.bn_forward_bound(flat, None, None)
    mo = reference.moments_bound(flat, axis=-1, dtype=np.float32)
    bn = jaxbn.linen.BatchNorm(use_running_average=False, axis_name="d", momentum=0.0,
                               sync_method=method)
    variables = bn.init(jax.random.key(0), x[0])
    y, upd = jax.pmap(lambda xx: bn.apply(variables, xx, mutable=["batch_stats"]),
                      axis_name="d")(x)
    reference.assert_within(np.asarray(y).reshape(24, 3), want_y, y_bound, f"linen {method}")
    reference.assert_within(upd["batch_stats"]["mean"][0], mo["mean"].ravel(),
                            mo["e_mean_stored"].ravel(), "mean")
    m = jaxbn.nnx.BatchNorm(3, axis_name="d", momentum=0.0, sync_method=method,
                            rngs=nnx.Rngs(0))
    y_n = nnx.pmap(lambda mod, xx: mod(xx), in_axes=(None, 0), axis_name="d")(m, x)
    reference.assert_within(np.asarray(y_n).reshape(24, 3), want_y, y_bound, f"nnx {method}")
