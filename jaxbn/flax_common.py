"""What the two Flax wrappers share: the call into the core and Flax's output-dtype rule.

The wrappers hold no mathematics: they gather their variables into ``params``/``state``
dicts, call :func:`jaxbn.bn_apply` through :func:`apply_core`, and write the new state back.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxbn.core import bn_apply


def run_in_dtype(x: jax.Array, out_dtype, fn):
    """Calls ``fn(x')`` where ``x'`` is ``x`` upcast (exactly) when ``out_dtype`` is wider, and
    returns its output cast to ``out_dtype``: Flax's output dtype without losing precision."""
    out_dtype = jnp.dtype(out_dtype)
    wider = jnp.promote_types(x.dtype, out_dtype) == out_dtype and out_dtype != x.dtype
    y, new = fn(x.astype(out_dtype) if wider else x)
    return y.astype(out_dtype), new


def apply_core(x, params: dict, state: dict, train: bool, *, axis, momentum, epsilon,
               axis_name, axis_index_groups, mask, extras: dict[str, Any], out_dtype):
    """One BatchNorm call as a Flax module makes it; returns ``(y, new_state)``."""
    def call(xx):
        return bn_apply(params, state, xx, train, axis=axis, momentum=momentum, epsilon=epsilon,
                        axis_name=axis_name, axis_index_groups=axis_index_groups, mask=mask,
                        **extras)
    return run_in_dtype(x, out_dtype, call)


def jaxbn_extras(unbiased_running_var: bool, virtual_batch_size: int | None, renorm,
                 skip_nonfinite: bool) -> dict[str, Any]:
    """The keyword arguments jaxbn adds beyond Flax, passed through to ``bn_apply``."""
    return {"unbiased_running_var": unbiased_running_var,
            "virtual_batch_size": virtual_batch_size, "renorm": renorm,
            "skip_nonfinite": skip_nonfinite}
