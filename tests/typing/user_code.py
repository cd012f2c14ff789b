"""User code of jaxbn's public API that a type checker must accept, with the types it must see.

CI checks it as a user would, after the README's editable install, from outside the checkout
(so that jaxbn is found only as an installed package): ``mypy --strict`` on this file and on
``rejected_code.py``. ``assert_type`` fails the check wherever jaxbn's annotations give another
type (``Any`` included). It also runs (``python tests/typing/user_code.py``): every call here
is real.
"""

from __future__ import annotations

from typing import assert_type

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxbn
from jaxbn.linen import BatchNorm as LinenBatchNorm
from jaxbn.nnx import BatchNorm as NnxBatchNorm


def functional_core() -> jax.Array:
    params, state = jaxbn.bn_init(4)
    assert_type(params, jaxbn.Params)
    assert_type(state, jaxbn.State)
    x = np.linspace(-1.0, 1.0, 32, dtype=np.float32).reshape(8, 4)  # NumPy input is accepted
    mask = np.arange(8)[:, None] < 6  # a NumPy boolean mask too
    y, state = jaxbn.bn_apply(params, state, x, True, axis=-1, mask=mask, momentum=0.9)
    assert_type(y, jax.Array)
    assert_type(state, jaxbn.State)
    y_eval, same = jaxbn.bn_apply(params, state, jnp.asarray(x), train=False, axis=(1,))
    assert_type(same, jaxbn.State)
    scale: jax.Array | None = params.get("scale")
    mean: jax.Array = state["mean"]
    axis: jaxbn.Axis = (1, 2)
    _, image_state = jaxbn.bn_init((3, 5))
    _, image_state = jaxbn.bn_apply(params={}, state=image_state, x=np.ones((2, 3, 5)),
                                    train=True, axis=axis)
    del scale, mean, image_state

    precise = jaxbn.reset_stats(state)  # precise statistics over two batches
    assert_type(precise, jaxbn.State)
    for batch in (x, -x):
        _, precise = jaxbn.bn_apply(params, precise, batch, train=True)
    state = jaxbn.finish_stats(precise)
    assert_type(state, jaxbn.State)
    kernel, bias = jaxbn.fold_dense(jnp.ones((3, 4)), None, params, state)
    assert_type(kernel, jax.Array)

    synced = jax.vmap(lambda s: jaxbn.sync_state(s, "i"), axis_name="i")(
        jax.tree.map(lambda v: jnp.stack([v, v]), state))
    del synced, bias
    return y_eval


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        h = LinenBatchNorm(use_running_average=not train)(nn.Dense(4)(x))
        assert_type(h, jax.Array)
        return h


def linen() -> None:
    x = jnp.ones((8, 3))
    variables = LinenNet().init(jax.random.key(0), x, train=False)
    LinenNet().apply(variables, x, train=True, mutable=["batch_stats"])


def flax_nnx() -> None:
    bn = NnxBatchNorm(4, momentum=0.9, rngs=nnx.Rngs(0))
    y = bn(jnp.ones((8, 4)))
    assert_type(y, jax.Array)
    evaluated = nnx.view(bn, use_running_average=True)
    assert_type(evaluated, NnxBatchNorm)
    assert_type(evaluated(np.ones((8, 4), np.float32), mask=np.ones((8, 1), bool)), jax.Array)


if __name__ == "__main__":
    functional_core()
    linen()
    flax_nnx()
    print("user code ran")
