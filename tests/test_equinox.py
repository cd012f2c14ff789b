"""jaxbn.equinox: a drop-in for equinox.nn.BatchNorm.

Side by side with Equinox's own layer where Equinox is right (training outputs, gradients,
state layout, make_with_state, inference_mode, Sequential, serialisation), against float64
NumPy where Equinox 0.13.8 is wrong. Each test of a measured Equinox error also runs Equinox's
layer, marked as a strict expected failure: the test fails with Equinox's layer and passes with
jaxbn's (with another Equinox release that case is skipped).
"""

import dataclasses
import math
import warnings

import numpy as np
import pytest

eqx = pytest.importorskip("equinox")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxbn  # noqa: E402
import jaxbn.equinox  # noqa: E402
from jaxbn.counting import count_collectives  # noqa: E402
from tests import reference  # noqa: E402
from tests.reference import assert_within, sum_error_bound  # noqa: E402

EPS = 1e-5
U32 = 2.0**-24  # unit roundoff of float32
UBF16 = 2.0**-8  # of bfloat16 (8 significant bits)
M32 = float(np.float32(0.99))  # the float32 momentum the layers apply
EQX_0138 = eqx.__version__ == "0.13.8"

LAYERS = {"jaxbn": jaxbn.equinox.BatchNorm, "equinox": eqx.nn.BatchNorm}
# The measured errors of Equinox 0.13.8: its layer must fail these tests (strictly).
BOTH = pytest.mark.parametrize("layer", [
    "jaxbn",
    pytest.param("equinox", marks=[
        pytest.mark.skipif(not EQX_0138, reason="the errors were measured on Equinox 0.13.8"),
        pytest.mark.xfail(EQX_0138, strict=True, raises=(AssertionError, TypeError, UserWarning),
                          reason="Equinox 0.13.8 is wrong here (issue 22)")]),
])


def make(layer, *args, **kwargs):
    return eqx.nn.make_with_state(LAYERS[layer])(*args, **kwargs)


def train_fn(model, name="batch"):
    """One jitted training step over a batch of examples (the Equinox calling convention)."""
    return jax.jit(lambda x, s: jax.vmap(model, axis_name=name, in_axes=(0, None),
                                         out_axes=(0, None))(x, s))


def infer(model, x, state):
    return jax.vmap(eqx.nn.inference_mode(model), in_axes=(0, None), out_axes=(0, None))(
        x, state)[0]


def batch_data(key, shape, loc=3.0, spread=2.0, dtype=jnp.float32):
    return (jax.random.normal(jax.random.key(key), shape) * spread + loc).astype(dtype)


def f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32) if a.dtype == jnp.bfloat16 else a, np.float64)


def red_axes(x):
    return (0,) + tuple(range(2, x.ndim))  # all but the channel axis (1) of a batch


def y_bound(x, about_zero=False, u=U32):
    """Bound on a float32 training output for input ``x`` (batch, channels, ...), scale 1.

    The mean is a sum of n terms divided by n: each term is a deviation from a shift inside
    the data's range (jaxbn's one- or two-round combination), or x itself (``about_zero``:
    a plain mean, as Equinox's), so its error is at most (n + 1) u times the largest term. The
    variance is a sum of n squared deviations: relative error (n + 2) u; 1/sqrt adds 2 u, and
    the output's products and sums 4 u of |y|.
    """
    x = f64(x)
    red = red_axes(x)
    n = x.size // x.shape[1]
    mean, var, _ = reference.batch_stats(x, axis=1)
    terms = np.abs(x).max(red, keepdims=True) if about_zero else (
        x.max(red, keepdims=True) - x.min(red, keepdims=True))
    sigma = np.sqrt(var + EPS)
    y = (x - mean) / sigma
    return (n + 1) * u * terms / sigma + ((n + 2) / 2 + 6) * u * np.abs(y) + 4 * u


# ------------------------------------------------------------------ where Equinox is right


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_state_layout_and_fields_match_equinox(mode):
    """Same fields, StateIndex markers, state leaves (shape, dtype, weak type) and model leaves."""
    ours, s_ours = make("jaxbn", 3, "batch", mode=mode)
    theirs, s_theirs = make("equinox", 3, "batch", mode=mode)
    assert isinstance(ours, eqx.nn.BatchNorm)
    assert [f.name for f in dataclasses.fields(ours)] == [
        f.name for f in dataclasses.fields(theirs)]

    def describe(tree):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
        return [(jax.tree_util.keystr(p), np.shape(v), np.asarray(v).dtype,
                 getattr(v, "weak_type", None), type(v).__name__) for p, v in leaves]
    assert describe(s_ours) == describe(s_theirs)
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_theirs)  # same markers
    assert describe(ours) == describe(theirs)
    # eqx.nn.State(model) before make_with_state: same initial entries (except Equinox's
    # uninitialized ema buffers, which jaxbn fills with (0, 1))
    if mode == "batch":
        for a, b in zip(jax.tree.leaves(s_ours), jax.tree.leaves(s_theirs), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # first case > 0.7 s on 2 cores (conftest's rule)
def test_training_steps_match_equinox_batch_mode():
    """Three batches: outputs and stored state side by side with Equinox (where it is right)
    and with float64 NumPy; Equinox's variance average holds momentum**k more (its ones)."""
    ours, s_ours = make("jaxbn", 3, "batch", mode="batch")
    theirs, s_theirs = make("equinox", 3, "batch", mode="batch")
    step_ours, step_theirs = train_fn(ours), train_fn(theirs)
    hidden_mean = np.zeros((3,))
    hidden_var = np.zeros((3,))
    for k in range(1, 4):
        x = batch_data(k, (8, 3, 4), loc=k)
        y_ours, s_ours = step_ours(x, s_ours)
        y_theirs, s_theirs = step_theirs(x, s_theirs)
        ref = reference.bn_forward(f64(x), None, None, axis=1, eps=EPS)
        assert_within(y_ours, ref, y_bound(x), f"step {k}: jaxbn vs float64")
        assert_within(y_theirs, ref, y_bound(x, about_zero=True), f"step {k}: Equinox")
        assert_within(y_ours, y_theirs, y_bound(x) + y_bound(x, about_zero=True),
                      f"step {k}: side by side")
        mean, var, _ = reference.batch_stats(f64(x), axis=1)
        hidden_mean = reference.ema(hidden_mean, mean.ravel(), M32)
        hidden_var = reference.ema(hidden_var, var.ravel(), M32)
        assert int(s_ours.get(ours.batch_counter)) == int(s_theirs.get(theirs.batch_counter)) == k
        hm, hv = s_ours.get(ours.batch_state_index)
        ehm, ehv = s_theirs.get(theirs.batch_state_index)
        # per update: the batch statistic's error (relative (n + 2) u, n = 32) and 4 roundings
        tol = k * (40 * U32 * (np.abs(hidden_mean) + np.abs(mean.ravel()) + 1))
        assert_within(hm, hidden_mean, tol, f"step {k}: stored mean average")
        assert_within(hv, hidden_var, k * 40 * U32 * np.abs(var).max(), "stored var average")
        # Equinox weighs by float32(1 - m), jaxbn by 1 - float32(m): they differ by < 2^-25
        gap = k * 2.0**-25 * (np.abs(mean).max() + np.abs(var).max())
        assert_within(ehm, hm, 2 * tol + gap, "Equinox's mean average")
        assert_within(ehv, np.asarray(hv, np.float64) + M32**k, 2 * tol + gap + 4 * U32,
                      "Equinox's var average = jaxbn's + momentum**k (its ones)")


@pytest.mark.slow  # first case > 0.7 s on 2 cores (conftest's rule)
def test_first_step_and_gradients_match_equinox_in_both_modes():
    """The first step (where both modes normalize with the batch's statistics, in Equinox as
    in jaxbn): outputs, the gradients of x, weight and bias, and the stored statistics."""
    x = batch_data(7, (6, 2, 3))
    dy = batch_data(8, (6, 2, 3), loc=0.5, spread=1.0)
    x64, dy64 = f64(x), f64(dy)
    ref_dx, ref_dscale, ref_dbias = reference.bn_grads(x64, None, dy64, axis=1, eps=EPS)
    mean, var, _ = reference.batch_stats(x64, axis=1)
    for mode in ("ema", "batch"):
        grads = {}
        for layer in ("jaxbn", "equinox"):
            bn, state = make(layer, 2, "batch", mode=mode)

            params, static = eqx.partition(bn, eqx.is_inexact_array)

            def loss(params, x, static=static, state=state):
                y, _ = jax.vmap(eqx.combine(params, static), axis_name="batch",
                                in_axes=(0, None), out_axes=(0, None))(x, state)
                return jnp.sum(y * dy)
            g_bn, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
            grads[layer] = (g_x, g_bn.weight, g_bn.bias)
            _, new = train_fn(bn)(x, state)
            if mode == "ema":
                m, v = new.get(bn.ema_state_index)  # the first batch's statistics
                assert_within(m, mean.ravel(), 40 * U32 * np.abs(x64).max(), f"{layer} mean")
                assert_within(v, var.ravel(), 40 * U32 * var.ravel(), f"{layer} var")
        n = x.size // 2
        sigma = np.sqrt(var + EPS)
        xhat = (x64 - mean) / sigma
        red = red_axes(x64)
        # the closed form's three terms, each a sum of n products, plus the statistics' error
        dx_bound = (2 * n + 20) * U32 / sigma * (
            np.abs(dy64) + np.abs(dy64).mean(red, keepdims=True)
            + np.abs(xhat) * np.abs(dy64 * xhat).mean(red, keepdims=True))
        dscale_bound = sum_error_bound(np.abs(dy64 * xhat).sum(red), n, ulps=n + 8)
        dbias_bound = sum_error_bound(np.abs(dy64).sum(red), n)
        for layer, (g_x, g_w, g_b) in grads.items():
            assert_within(g_x, ref_dx, dx_bound, f"{mode} {layer} dx")
            assert_within(g_w, ref_dscale, dscale_bound, f"{mode} {layer} dweight")
            assert_within(g_b, ref_dbias, dbias_bound, f"{mode} {layer} dbias")


@pytest.mark.slow  # first case > 0.7 s on 2 cores (conftest's rule)
def test_sequential_make_with_state_and_inference_mode_like_equinox():
    """A Sequential of Linear, BatchNorm, relu, Linear built with each layer from the same keys:
    one training step ("ema": the running statistics are then the batch's, in Equinox too),
    then eqx.nn.inference_mode: the same outputs, side by side and against float64."""
    def build(layer):
        def model():
            k1, k2 = jax.random.split(jax.random.key(0))
            return eqx.nn.Sequential([eqx.nn.Linear(4, 3, key=k1),
                                      LAYERS[layer](3, "batch", mode="ema"),
                                      eqx.nn.Lambda(jax.nn.relu), eqx.nn.Linear(3, 2, key=k2)])
        return eqx.nn.make_with_state(model)()
    x = batch_data(3, (10, 4))
    outs = {}
    for layer in ("jaxbn", "equinox"):
        model, state = build(layer)
        assert model.is_stateful()
        y_train, state = train_fn(model)(x, state)
        y_eval = infer(model, x, state)
        outs[layer] = (y_train, y_eval, model)
    ours, theirs = outs["jaxbn"], outs["equinox"]
    # float64: the first Linear's output z, normalized with its batch statistics either way
    lin1, lin2 = ours[2].layers[0], ours[2].layers[3]
    z = f64(x) @ f64(lin1.weight).T + f64(lin1.bias)
    zhat = (z - z.mean(0)) / np.sqrt(z.var(0) + EPS)
    ref = np.maximum(zhat, 0) @ f64(lin2.weight).T + f64(lin2.bias)
    # z carries the first Linear's float32 rounding (4 products and a bias: 6 u of their
    # magnitudes), which moves zhat by at most twice that over sigma (the mean moves too);
    # then the normalization's own bound; relu is 1-Lipschitz; the second Linear (3 terms)
    dz = 6 * U32 * (np.abs(f64(x)) @ np.abs(f64(lin1.weight)).T + np.abs(f64(lin1.bias)))
    dzhat = 2 * dz.max(0) / np.sqrt(z.var(0) + EPS) + y_bound(z[:, :, None])[:, :, 0]
    bound = dzhat @ np.abs(f64(lin2.weight)).T + 5 * U32 * (
        np.abs(np.maximum(zhat, 0)) @ np.abs(f64(lin2.weight)).T + np.abs(f64(lin2.bias)))
    for name, (y_train, y_eval, _) in outs.items():
        assert_within(y_train, ref, bound, f"{name} training output")
        assert_within(y_eval, ref, bound, f"{name} inference output")
    assert_within(ours[1], theirs[1], 2 * bound, "inference side by side")


@pytest.mark.slow  # first case > 0.7 s on 2 cores (conftest's rule)
@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_serialise_round_trip_and_equinox_checkpoints_load(mode, tmp_path):
    """tree_serialise_leaves / tree_deserialise_leaves: a checkpoint of Equinox's layer loads
    into jaxbn's (every value bit for bit) and reads right; jaxbn's round-trips and loads into
    Equinox's layer."""
    theirs, s_theirs = make("equinox", 3, "batch", mode=mode)
    x = batch_data(4, (8, 3, 2))
    step = train_fn(theirs)
    for _ in range(2):
        _, s_theirs = step(x, s_theirs)
    path = tmp_path / "equinox.eqx"
    eqx.tree_serialise_leaves(path, (theirs, s_theirs))
    like = make("jaxbn", 3, "batch", mode=mode)
    ours, s_ours = eqx.tree_deserialise_leaves(path, like)
    assert isinstance(ours, jaxbn.equinox.BatchNorm)
    for a, b in zip(jax.tree.leaves((ours, s_ours)), jax.tree.leaves((theirs, s_theirs)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mean, var, _ = reference.batch_stats(f64(x), axis=1)
    if mode == "batch":  # Equinox's ones removed, the variance is the batch's
        s_ours = jaxbn.equinox.from_equinox_state(ours, s_ours)
    m, v = ours.inference_statistics(s_ours)
    mean, var = mean.ravel(), var.ravel()
    # Equinox weighs by float32(1 - m), jaxbn debiases by 1 - float32(m)**k: relative gap
    # below 2^-25 / (1 - m); the batch statistics' float32 error ((n + 6) u, n = 16); in
    # "batch" mode removing the ones (momentum**2 ~ 1, stored with 2 updates' roundings and
    # computed with 3 u) costs 8 u / (1 - momentum**2) of the variance
    rel = 2.0**-25 / (1 - M32) if mode == "batch" else 0.0
    bound_m = rel * np.abs(mean) + 40 * U32 * np.abs(f64(x)).max()
    bound_v = (rel + 40 * U32) * var + (8 * U32 / (1 - M32**2) if mode == "batch" else 0.0)
    assert_within(m, mean, bound_m, "mean of the loaded checkpoint")
    assert_within(v, var, bound_v, "var of the loaded checkpoint")
    y_ref = reference.bn_eval(f64(x), None, None, mean, var, axis=1, eps=EPS)
    sigma = np.sqrt(var + EPS).reshape(1, 3, 1)
    y_b = (bound_m.reshape(1, 3, 1) / sigma + np.abs(y_ref) * bound_v.reshape(1, 3, 1) / (
        2 * sigma**2) + 8 * U32 * np.abs(y_ref))
    assert_within(infer(ours, x, s_ours), y_ref, y_b, "inference from the checkpoint")

    # jaxbn's own checkpoint: round trip, and Equinox's layer loads it
    _, s_ours = train_fn(ours)(x, s_ours)
    path2 = tmp_path / "jaxbn.eqx"
    eqx.tree_serialise_leaves(path2, (ours, s_ours))
    back = eqx.tree_deserialise_leaves(path2, make("jaxbn", 3, "batch", mode=mode))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves((ours, s_ours)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    theirs2, s_theirs2 = eqx.tree_deserialise_leaves(path2, make("equinox", 3, "batch",
                                                                   mode=mode))
    # Equinox reads jaxbn's states right: its debiasing suits an average started from zero
    # (three updates on x now, one after the ones' removal: the same error budget)
    assert_within(infer(theirs2, x, s_theirs2), y_ref, y_b, "Equinox reading jaxbn's state")


@pytest.mark.slow  # first case > 0.7 s on 2 cores (conftest's rule)
def test_bfloat16_equinox_checkpoint_loads_through_a_narrow_like(tmp_path):
    """The guide's recipe: Equinox keeps a bfloat16 model's running statistics in bfloat16,
    jaxbn in float32: load through a like state cast to bfloat16, then widen it."""
    theirs, s_theirs = make("equinox", 3, "batch", mode="batch", dtype=jnp.bfloat16)
    x = batch_data(22, (8, 3), dtype=jnp.bfloat16)
    _, s_theirs = train_fn(theirs)(x, s_theirs)
    eqx.tree_serialise_leaves(tmp_path / "bf16.eqx", (theirs, s_theirs))
    ours, s_ours = make("jaxbn", 3, "batch", mode="batch", dtype=jnp.bfloat16)
    assert s_ours.get(ours.batch_state_index)[0].dtype == jnp.float32

    def cast(tree, old, new):
        return jax.tree.map(lambda a: a.astype(new) if a.dtype == old else a, tree)
    ours, s_ours = eqx.tree_deserialise_leaves(
        tmp_path / "bf16.eqx", (ours, cast(s_ours, jnp.float32, jnp.bfloat16)))
    s_ours = cast(s_ours, jnp.bfloat16, jnp.float32)
    for a, b in zip(jax.tree.leaves(s_ours), jax.tree.leaves(s_theirs), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float64), f64(b))  # widened exactly
    y, s_ours = train_fn(ours)(x, s_ours)
    assert y.dtype == jnp.bfloat16
    assert s_ours.get(ours.batch_state_index)[1].dtype == jnp.float32


@pytest.mark.slow  # first case > 0.7 s on 2 cores (conftest's rule)
def test_nested_vmaps_and_several_axis_names_equal_the_flat_batch():
    """Two named vmap axes pool all the examples; an unnamed outer vmap keeps groups apart."""
    x = batch_data(5, (2, 3, 4, 5))  # (group, example, channel, spatial)
    bn, state = make("jaxbn", 4, ("a", "b"), mode="batch")
    f = jax.vmap(jax.vmap(bn, axis_name="b", in_axes=(0, None), out_axes=(0, None)),
                 axis_name="a", in_axes=(0, None), out_axes=(0, None))
    y, _ = jax.jit(f)(x, state)
    flat = x.reshape(6, 4, 5)
    assert_within(y.reshape(6, 4, 5), reference.bn_forward(f64(flat), None, None, axis=1),
                  y_bound(flat), "two axis names")
    bn1, state1 = make("jaxbn", 4, "b", mode="batch")
    g = jax.vmap(jax.vmap(bn1, axis_name="b", in_axes=(0, None), out_axes=(0, None)),
                 in_axes=(0, None))
    y1, s1 = jax.jit(g)(x, state1)
    assert s1.get(bn1.batch_state_index)[0].shape == (2, 4)
    for i in range(2):
        assert_within(y1[i], reference.bn_forward(f64(x[i]), None, None, axis=1),
                      y_bound(x[i]), f"group {i}")


# ----------------------------------------------------------- where Equinox 0.13.8 is wrong


@pytest.mark.slow  # first case > 0.7 s on 2 cores (conftest's rule)
@BOTH
def test_batch_mode_inference_uses_the_batch_variance(layer):
    """Three steps on one batch (momentum 0.99): inference must normalize with that batch's
    statistics. Equinox debiases its ones-initialized variance average: 36.5 for 3.8."""
    bn, state = make(layer, 3, "batch", mode="batch")
    x = batch_data(11, (16, 3), loc=1.0, spread=2.0)
    step = train_fn(bn)
    for _ in range(3):
        _, state = step(x, state)
    mean, var, _ = reference.batch_stats(f64(x), axis=1)
    y_ref = reference.bn_eval(f64(x), None, None, mean.ravel(), var.ravel(), axis=1, eps=EPS)
    # 3 updates of the averages (each within the batch statistics' (n + 6) u), debiasing (3 u)
    stats_err = 3 * (16 + 10) * U32
    bound = stats_err * (np.abs(mean) / np.sqrt(var) + np.abs(y_ref)) + 8 * U32 * np.abs(y_ref)
    assert_within(infer(bn, x, state), y_ref, bound, f"{layer}: inference after 3 steps")


@pytest.mark.slow  # first case > 0.7 s on 2 cores (conftest's rule)
@BOTH
def test_ema_inference_before_training_is_the_identity(layer):
    """Before any training step, "ema" inference uses mean 0 and variance 1 (as "batch" mode
    and every other framework do). Equinox reads its empty buffers: outputs x / sqrt(eps)."""
    bn, state = make(layer, 3, "batch", mode="ema", inference=True)
    x = batch_data(12, (4, 3, 2))
    y, _ = jax.vmap(bn, in_axes=(0, None), out_axes=(0, None))(x, state)
    assert_within(y, f64(x) / math.sqrt(1 + EPS), 4 * U32 * np.abs(f64(x)), f"{layer}")


@pytest.mark.slow  # first case > 0.7 s on 2 cores (conftest's rule)
@BOTH
def test_float32_at_a_large_offset(layer):
    """x = 1e4 + N(0, 1) in float32, 8 channels: the output within its error bound (jaxbn
    measured 4e-7; Equinox rounds the mean to float32 first: up to 5e-4 per channel)."""
    bn, state = make(layer, 8, "batch", mode="batch")
    x = batch_data(13, (64, 8), loc=1e4, spread=1.0)
    y, _ = train_fn(bn)(x, state)
    ref = reference.bn_forward(f64(x), None, None, axis=1, eps=EPS)
    assert_within(y, ref, y_bound(x), f"{layer} at offset 1e4")


@pytest.mark.slow  # first case > 0.7 s on 2 cores (conftest's rule)
@BOTH
@pytest.mark.parametrize("mode", ["ema", "batch"])
def test_bfloat16_input(layer, mode):
    """bfloat16 input: y in bfloat16, statistics in float32 (running statistics within float32
    bounds of the float64 ones). Equinox: "ema" crashes (lax.select dtypes), "batch" returns
    float32 and computes the statistics in bfloat16."""
    bn, state = make(layer, 3, "batch", mode=mode)
    x = batch_data(14, (16, 3, 4), dtype=jnp.bfloat16)
    y, state = train_fn(bn)(x, state)
    assert y.dtype == jnp.bfloat16, f"{layer}: y is {y.dtype}"
    x64 = f64(x)
    ref = reference.bn_forward(x64, None, None, axis=1, eps=EPS)
    assert_within(y, ref, y_bound(x64) + UBF16 * np.abs(ref), f"{layer} {mode} output")
    mean, var, _ = reference.batch_stats(x64, axis=1)
    if mode == "ema":
        m, v = state.get(bn.ema_state_index)
    else:
        hm, hv = state.get(bn.batch_state_index)
        m, v = np.asarray(hm, np.float64) / (1 - M32), np.asarray(hv, np.float64) / (1 - M32)
    # float32 statistics of n = 64 values ((n + 6) u), stored with at most 3 roundings
    assert_within(m, mean.ravel(), 80 * U32 * np.abs(x64).max(), f"{layer} {mode} running mean")
    assert_within(v, var.ravel(), 80 * U32 * var.ravel(), f"{layer} {mode} running variance")


@pytest.mark.slow  # first case > 0.7 s on 2 cores (conftest's rule)
@BOTH
def test_bfloat16_model_running_average_does_not_stall(layer):
    """A bfloat16 model (dtype=bfloat16), momentum 0.999, 3000 steps on one bfloat16 batch:
    the inference statistics are that batch's. Equinox keeps the averages in bfloat16, where
    0.999 * old + 0.001 * new rounds back to old: its mean stalls near 1 for 3."""
    bn, state = make(layer, 3, "batch", mode="batch", momentum=0.999, dtype=jnp.bfloat16)
    x = batch_data(15, (16, 3, 4), dtype=jnp.bfloat16)

    def body(s, _):
        return jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, s)[1], None
    state, _ = jax.jit(lambda s: jax.lax.scan(body, s, None, length=3000))(state)
    x64 = f64(x)
    mean, var, _ = reference.batch_stats(x64, axis=1)
    y_ref = reference.bn_eval(x64, None, None, mean.ravel(), var.ravel(), axis=1, eps=EPS)
    # a float32 average of identical values: each step's rounding (4 u) decays with 0.999,
    # so at most 4 u / (1 - 0.999) of the value; then the bfloat16 output rounding
    rel = 4 * U32 / (1 - 0.999) + 80 * U32
    bound = rel * (np.abs(mean) / np.sqrt(var) + np.abs(y_ref)) + 2 * UBF16 * np.abs(y_ref)
    assert_within(infer(bn, x, state), y_ref, bound, f"{layer}: after 3000 steps")


@pytest.mark.slow  # first case > 0.7 s on 2 cores (conftest's rule)
@BOTH
def test_one_collective_forward_two_with_backward_under_pmap(layer):
    """pmap over 4 devices around vmap over 2 examples each, axis_name=("d", "batch"):
    jaxbn issues 1 collective forward and 2 with the backward pass (Equinox: 2 and 4), and
    equals the float64 statistics of all 8 examples."""
    bn, state = make(layer, 3, ("d", "batch"), mode="batch")
    params, static = eqx.partition(bn, eqx.is_inexact_array)
    x = batch_data(16, (4, 2, 3, 5))

    def out(p, xs):
        model = eqx.combine(p, static)
        fresh = jax.tree.map(lambda a: a + jnp.zeros((), a.dtype), state)  # a State per call
        return jax.vmap(lambda xi: model(xi, fresh), axis_name="batch", out_axes=(0, None))(
            xs)[0]
    rep = jax.tree.map(lambda a: jnp.stack([a] * 4), params)
    fwd = jax.pmap(out, axis_name="d")
    fwd_bwd = jax.pmap(lambda p, xs, dy: jax.vjp(out, p, xs)[1](dy), axis_name="d")
    flat = x.reshape(8, 3, 5)
    y = fwd(rep, x).reshape(8, 3, 5)
    assert_within(y, reference.bn_forward(f64(flat), None, None, axis=1), y_bound(flat),
                  f"{layer} under pmap")
    f_count = count_collectives(fwd, rep, x)
    fb_count = count_collectives(fwd_bwd, rep, x, x)
    assert (f_count.traced, fb_count.traced) == (1, 2), (layer, f_count, fb_count)
    assert f_count.compiled <= 1 and fb_count.compiled <= 2, (layer, f_count, fb_count)


@pytest.mark.slow  # first case > 0.7 s on 2 cores (conftest's rule)
@BOTH
def test_no_warning_when_mode_is_left_out(layer):
    """Equinox warns (a UserWarning, an error under -W error) when mode is left out."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn, state = make(layer, 3, "batch")
        y, state = train_fn(bn)(batch_data(17, (4, 3)), state)
    assert bn.mode == "ema"


# ---------------------------------------------------------------- devices, API, folding


def _multi_device(style, x, mode):
    """(y, inference mean) of one training step over 4 devices x 3 examples, run in ``style``."""
    if style == "pmap_per_example":  # one example per device
        bn, state = make("jaxbn", 3, "batch", mode=mode)
        y, state = jax.pmap(lambda xi, s: bn(xi, s), axis_name="batch", in_axes=(0, None),
                            out_axes=(0, None))(x, state)
        return y, bn.inference_statistics(state)[0]
    if style in ("pmap_vmap", "shard_map"):
        bn, state = make("jaxbn", 3, ("d", "batch"), mode=mode)

        def per_device(xs, s):
            return jax.vmap(lambda xi: bn(xi, s), axis_name="batch", out_axes=(0, None))(xs)
        if style == "pmap_vmap":
            y, state = jax.pmap(per_device, axis_name="d", in_axes=(0, None),
                                out_axes=(0, None))(x.reshape(4, 3, *x.shape[1:]), state)
        else:
            mesh = jax.make_mesh((4,), ("d",), devices=jax.devices()[:4])
            xs = jax.device_put(x, NamedSharding(mesh, P("d")))
            y, state = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("d"), P()),
                                             out_specs=(P("d"), P()), check_vma=False))(xs, state)
        return y.reshape(x.shape), bn.inference_statistics(state)[0]
    # plain jit over a batch sharded on a mesh with Auto axes: XLA inserts the reductions
    bn, state = make("jaxbn", 3, "batch", mode=mode)
    mesh = jax.make_mesh((4,), ("d",), axis_types=(AxisType.Auto,), devices=jax.devices()[:4])
    xs = jax.device_put(x, NamedSharding(mesh, P("d")))
    y, state = train_fn(bn)(xs, state)
    return y, bn.inference_statistics(state)[0]


@pytest.mark.parametrize("style", ["pmap_vmap", "shard_map", "jit_auto_mesh",
                                   "pmap_per_example"])
@pytest.mark.slow  # first case > 0.7 s on 2 cores (conftest's rule)
def test_supported_ways_over_devices(style):
    """The per-example style over devices, the ways the Equinox guide documents."""
    x = batch_data(18, (12, 3, 2)) if style != "pmap_per_example" else batch_data(18, (4, 3, 2))
    for mode in ("batch", "ema"):
        y, mean = _multi_device(style, x, mode)
        ref_mean, _, _ = reference.batch_stats(f64(x), axis=1)
        assert_within(y, reference.bn_forward(f64(x), None, None, axis=1), y_bound(x),
                      f"{style} {mode}")
        assert_within(mean, ref_mean.ravel(), 40 * U32 * np.abs(f64(x)).max() * 10,
                      f"{style} {mode} running mean")


def test_shard_map_with_check_vma_raises_clearly():
    bn, state = make("jaxbn", 3, ("d", "batch"), mode="batch")
    mesh = jax.make_mesh((4,), ("d",), devices=jax.devices()[:4])
    xs = jax.device_put(batch_data(19, (8, 3)), NamedSharding(mesh, P("d")))
    f = jax.shard_map(lambda xs, s: jax.vmap(lambda xi: bn(xi, s), axis_name="batch",
                                             out_axes=(0, None))(xs),
                      mesh=mesh, in_specs=(P("d"), P()), out_specs=(P("d"), P()))
    with pytest.raises(NotImplementedError, match="check_vma=False"):
        jax.jit(f)(xs, state)


@pytest.mark.slow  # first case > 0.7 s on 2 cores (conftest's rule)
def test_bad_arguments_raise_clearly():
    BN = jaxbn.equinox.BatchNorm
    with pytest.raises(ValueError, match="mode must be"):
        BN(3, "b", mode="batchnorm")
    with pytest.raises(ValueError, match="momentum must be in"):
        BN(3, "b", momentum=1.5)
    with pytest.raises(ValueError, match="below 1 with mode='batch'"):
        BN(3, "b", momentum=1.0, mode="batch")
    with pytest.raises(ValueError, match="input_size"):
        BN(0, "b")
    with pytest.raises(TypeError, match="real floating dtype"):
        BN(3, "b", dtype=jnp.int32)
    with pytest.raises(ValueError, match="eps"):
        BN(3, "b", eps=0.0)
    bn, state = make("jaxbn", 3, "b", mode="batch")
    with pytest.raises(ValueError, match=r"shape \(input_size, \*spatial\)"):
        jax.vmap(bn, axis_name="b", in_axes=(0, None), out_axes=(0, None))(jnp.ones((4, 2)),
                                                                           state)
    with pytest.raises(jaxbn.UnboundAxisNameError, match="not bound"):
        bn(jnp.ones((3,)), state)
    with pytest.raises(NameError):  # what Equinox raises, and its tests check
        jax.vmap(bn, in_axes=(0, None), out_axes=(0, None))(jnp.ones((4, 3)), state)


@pytest.mark.slow  # first case > 0.7 s on 2 cores (conftest's rule)
def test_convert_keeps_the_state_and_from_equinox_state_repairs_its_variance():
    """convert swaps Equinox's layers for jaxbn's and keeps the model's State valid;
    from_equinox_state removes Equinox's ones (and refuses a state without them)."""
    def model():
        k1, k2 = jax.random.split(jax.random.key(1))
        return eqx.nn.Sequential([eqx.nn.Linear(2, 3, key=k1),
                                  eqx.nn.BatchNorm(3, "batch", mode="batch"),
                                  eqx.nn.Linear(3, 2, key=k2),
                                  eqx.nn.BatchNorm(2, "batch", mode="ema")])
    theirs, state = eqx.nn.make_with_state(model)()
    x = batch_data(20, (8, 2))
    step = train_fn(theirs)
    for _ in range(2):
        _, state = step(x, state)
    ours = jaxbn.equinox.convert(theirs)
    assert [type(m).__module__ for m in ours.layers[1::2]] == ["jaxbn.equinox"] * 2
    assert ours.layers[1].batch_state_index.marker == theirs.layers[1].batch_state_index.marker
    fixed = jaxbn.equinox.from_equinox_state(ours, state)
    lin = ours.layers[0]
    z = f64(x) @ f64(lin.weight).T + f64(lin.bias)
    _, v = ours.layers[1].inference_statistics(fixed)
    # as in the checkpoint test, plus the float32 Linear's rounding of z (3 terms: 5 u of
    # their magnitudes), which moves the variance by at most 2 |z - mean| dz + dz**2
    dz = (5 * U32 * (np.abs(f64(x)) @ np.abs(f64(lin.weight)).T + np.abs(f64(lin.bias)))).max(0)
    dvar = 2 * np.abs(z - z.mean(0)).max(0) * dz + dz**2
    bound = (2.0**-25 / (1 - M32) + 40 * U32) * z.var(0) + 8 * U32 / (1 - M32**2) + 2 * dvar
    assert_within(v, z.var(0), bound, "repaired var")
    with pytest.raises(ValueError, match="not written by equinox"):
        jaxbn.equinox.from_equinox_state(ours, fixed)  # already repaired
    with pytest.raises(TypeError, match="convert the model first"):
        jaxbn.equinox.from_equinox_state(theirs, state)
    _, state = train_fn(ours)(x, fixed)  # the converted model trains on the same State


def _conv1d_ref(x, w, b):
    """float64 'SAME' (padding 1) 1-D convolution of x (C, L) with w (O, C, 3)."""
    xp = np.pad(x, ((0, 0), (1, 1)))
    out = np.stack([np.einsum("ck,ock->o", xp[:, i:i + 3], w) for i in range(x.shape[1])], 1)
    return out if b is None else out + b.reshape(-1, 1)


@pytest.mark.slow  # first case > 0.7 s on 2 cores (conftest's rule)
def test_fold_sequential_conv_and_linear(monkeypatch):
    """fold replaces each (Linear/Conv, BatchNorm) pair of a Sequential (nested ones too) by the
    folded layer (from jaxbn.fold_dense / fold_conv) and an Identity; a BatchNorm that does not
    follow such a layer is kept. The folded model's inference output equals the float64
    evaluation of the original's."""
    from jaxbn._src import equinox_tools  # where jaxbn.equinox.fold looks them up

    calls = []
    for name in ("fold_dense", "fold_conv"):
        orig = getattr(equinox_tools, name)
        monkeypatch.setattr(equinox_tools, name,
                            lambda *a, orig=orig, name=name, **k: calls.append(name) or orig(
                                *a, **k))

    def model():
        k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
        inner = eqx.nn.Sequential([eqx.nn.Linear(3 * 5, 4, key=k2),
                                   jaxbn.equinox.BatchNorm(4, "batch", mode="ema")])
        return eqx.nn.Sequential([
            eqx.nn.Conv1d(2, 3, 3, padding=1, use_bias=False, key=k1),
            jaxbn.equinox.BatchNorm(3, "batch", mode="batch"),
            eqx.nn.Lambda(jnp.ravel), inner, eqx.nn.Lambda(jax.nn.relu),
            jaxbn.equinox.BatchNorm(4, "batch", mode="batch"),  # follows no Linear/Conv: kept
            eqx.nn.Linear(4, 2, key=k3)])
    net, state = eqx.nn.make_with_state(model)()
    x = batch_data(21, (6, 2, 5))
    step = train_fn(net)
    for k in range(3):
        _, state = step(x + k, state)
    net = eqx.nn.inference_mode(net)
    folded = jaxbn.equinox.fold(net, state)
    assert sorted(calls) == ["fold_conv", "fold_dense"]
    assert isinstance(folded.layers[1], eqx.nn.Identity)
    assert isinstance(folded.layers[3].layers[1], eqx.nn.Identity)
    assert isinstance(folded.layers[5], jaxbn.equinox.BatchNorm)
    assert folded.layers[0].use_bias and net.layers[0].bias is None  # original unchanged

    # float64 evaluation of the ORIGINAL model in inference mode
    L = net.layers
    stats = {id(bn): [f64(a) for a in bn.inference_statistics(state)]
             for bn in (L[1], L[3].layers[1], L[5])}

    def bn_eval(bn, z, axis):
        m, v = stats[id(bn)]
        shape = [1] * z.ndim
        shape[axis] = -1
        return ((z - m.reshape(shape)) / np.sqrt(v.reshape(shape) + EPS) * f64(
            bn.weight).reshape(shape) + f64(bn.bias).reshape(shape))
    refs = []
    for xi in f64(x):
        h = bn_eval(L[1], _conv1d_ref(xi, f64(L[0].weight), None), 0).ravel()
        h = bn_eval(L[3].layers[1], f64(L[3].layers[0].weight) @ h + f64(L[3].layers[0].bias), 0)
        h = bn_eval(L[5], np.maximum(h, 0), 0)
        refs.append(f64(L[6].weight) @ h + f64(L[6].bias))
    ref = np.stack(refs)
    y, _ = jax.jit(jax.vmap(folded, in_axes=(0, None), out_axes=(0, None)))(x, state)
    y_orig, _ = jax.jit(jax.vmap(net, in_axes=(0, None), out_axes=(0, None)))(x, state)
    # float32 error bound, propagated layer by layer on magnitudes: a sum of t terms rounds
    # within (t + 2) u of the sum of their magnitudes; an eval BatchNorm multiplies an error
    # by |weight / sigma| and adds 6 u of its output; relu and ravel add nothing. The folded
    # model rounds the same sums with weights scaled by weight / sigma (plus 2 u per weight):
    # twice the unfolded model's bound covers both.
    def gain(bn):
        return np.abs(f64(bn.weight)) / np.sqrt(stats[id(bn)][1] + EPS)
    bounds = []
    for xi in f64(x):
        a = np.abs(xi)
        mag = _conv1d_ref(a, np.abs(f64(L[0].weight)), None)
        err = 8 * U32 * mag
        h = bn_eval(L[1], _conv1d_ref(xi, f64(L[0].weight), None), 0)
        err = (gain(L[1])[:, None] * err + 6 * U32 * np.abs(h)).ravel()
        h = h.ravel()
        W, b = f64(L[3].layers[0].weight), f64(L[3].layers[0].bias)
        err = np.abs(W) @ err + 17 * U32 * (np.abs(W) @ np.abs(h) + np.abs(b))
        h = bn_eval(L[3].layers[1], W @ h + b, 0)
        err = gain(L[3].layers[1]) * err + 6 * U32 * np.abs(h)
        h = bn_eval(L[5], np.maximum(h, 0), 0)
        err = gain(L[5]) * err + 6 * U32 * np.abs(h)
        W, b = f64(L[6].weight), f64(L[6].bias)
        bounds.append(np.abs(W) @ err + 6 * U32 * (np.abs(W) @ np.abs(h) + np.abs(b)))
    bound = 2 * np.stack(bounds)
    assert_within(y_orig, ref, bound, "original model")
    assert_within(y, ref, bound, "folded model")

    theirs = eqx.nn.Sequential([eqx.nn.Linear(2, 3, key=jax.random.key(0)),
                                eqx.nn.BatchNorm(3, "batch", mode="batch")])
    with pytest.raises(TypeError, match="convert the model first"):
        jaxbn.equinox.fold(theirs, eqx.nn.State(theirs))
