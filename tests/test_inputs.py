"""Inputs users pass that used to fail obscurely or be accepted wrongly (issue 21 item 7), and
containers/dtypes of the state (item 9): each against an independent reference or a clear
jaxbn error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import FrozenDict

import jaxbn
from tests import reference as ref

X = np.random.default_rng(0).normal(2.0, 3.0, size=(8, 3)).astype(np.float32)
U = np.finfo(np.float32).eps / 2


def _check_against_float64(y, x, scale=None, bias=None):
    want = ref.bn_forward(x, scale, bias)
    # corrected two-pass over 8 values: (8 + 8) roundoffs of |y| + 1 (scaled)
    s = 1.0 if scale is None else np.max(np.abs(scale))
    ref.assert_within(y, want, 16 * U * s * (np.abs(want) + 1), "y")


@pytest.mark.parametrize("axis_name", [(), []])
def test_empty_axis_name_is_a_clear_error(axis_name):
    params, state = jaxbn.bn_init(3)
    with pytest.raises(ValueError, match="names no axis"):
        jax.vmap(lambda x: jaxbn.bn_apply(params, state, x, True, axis_name=axis_name),
                 axis_name="d")(X[None])


def test_a_name_repeated_in_axis_name_is_refused():
    """Under one vmap, ("d", "d") counted every row twice (unbiased running variance 0.994
    where it is 1.065) without an error."""
    params, state = jaxbn.bn_init(3)
    with pytest.raises(ValueError, match="more than once"):
        jax.vmap(lambda x: jaxbn.bn_apply(params, state, x, True, axis_name=("d", "d")),
                 axis_name="d")(X.reshape(2, 4, 3))


def test_python_int_count_is_accepted_and_the_cumulative_average_right():
    params, state = jaxbn.bn_init(3)
    state = {"mean": state["mean"], "var": state["var"], "count": 2}  # e.g. from JSON
    _, new = jaxbn.bn_apply(params, state, X, True, momentum=None)
    mean, _, _ = ref.batch_stats(X)
    want = 0.0 + (mean.ravel() - 0.0) / 3  # two earlier updates of 0, then this batch
    ref.assert_within(new["mean"], want, 8 * U * np.abs(mean.ravel()) + 1e-7, "mean")
    assert int(new["count"]) == 3


@pytest.mark.parametrize("count", [np.zeros(3, np.int32), 1.5, True])
def test_a_count_that_is_not_an_integer_scalar_is_refused(count):
    params, state = jaxbn.bn_init(3)
    with pytest.raises((TypeError, ValueError), match="count"):
        jaxbn.bn_apply(params, dict(state, count=count), X, True)


def test_array_likes_are_accepted():
    """scale as a list, x as a NumPy array or nested lists: as the float64 reference."""
    scale, bias = [1.0, 2.0, 0.5], np.array([0.0, 1.0, -1.0])
    _, state = jaxbn.bn_init(3)
    y, _ = jaxbn.bn_apply({"scale": scale, "bias": bias}, state, X.tolist(), True)
    _check_against_float64(y, X, np.asarray(scale), bias)
    y, _ = jaxbn.bn_apply({"scale": scale, "bias": bias}, state, X, False)
    want = ref.bn_eval(X, np.asarray(scale), bias, np.zeros(3), np.ones(3))
    ref.assert_within(y, want, 4 * U * (np.abs(want) + 1), "eval")


def test_integer_param_dtype_is_refused():
    with pytest.raises(TypeError, match="param_dtype must be a floating dtype"):
        jaxbn.bn_init(3, param_dtype=jnp.int32)


@pytest.mark.parametrize("name", ["skip_nonfinite", "unbiased_running_var"])
def test_flags_must_be_bools(name):
    params, state = jaxbn.bn_init(3)
    with pytest.raises(TypeError, match=f"{name} must be a bool"):
        jaxbn.bn_apply(params, state, X, True, **{name: "yes"})


def test_frozendict_state_comes_back_a_frozendict_and_scans():
    params, state = jaxbn.bn_init(3)
    frozen = FrozenDict(state)

    def step(s, x):
        return jaxbn.bn_apply(params, s, x, True, momentum=0.5)[1], None

    out, _ = jax.lax.scan(step, frozen, jnp.stack([X, X + 1]))
    assert isinstance(out, FrozenDict)
    mean1, _, _ = ref.batch_stats(X)
    want = 0.25 * mean1.ravel() + 0.5 * (mean1.ravel() + 1)  # two EMA steps from 0
    ref.assert_within(out["mean"], want, 16 * U * (np.abs(want) + 1), "mean")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_state_is_a_stable_scan_carry(dtype):
    """A state restored in bfloat16/float16 stays in its dtype, so lax.scan over training
    steps works (it raised 'carry input and carry output must have equal types')."""
    params, state = jaxbn.bn_init(3)
    state = dict(state, mean=state["mean"].astype(dtype), var=state["var"].astype(dtype))

    def step(s, x):
        return jaxbn.bn_apply(params, s, x, True, momentum=0.5)[1], None

    out, _ = jax.lax.scan(step, state, jnp.stack([X, X]))
    assert out["mean"].dtype == dtype and out["var"].dtype == dtype
    mean, _, _ = ref.batch_stats(X)
    eps = float(jnp.finfo(dtype).eps)
    ref.assert_within(out["mean"], 0.75 * mean.ravel(), 2 * eps * np.abs(mean.ravel()) + 1e-6,
                      "mean")
