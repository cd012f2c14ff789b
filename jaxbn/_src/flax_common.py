"""What the two Flax wrappers share: the call into the core, Flax's dtype rules, and jaxbn's
extra options.

The wrappers hold no mathematics: they gather their variables into ``params``/``state``
dicts, call :func:`jaxbn.bn_apply` through :func:`apply_core`, and write the new state back.

Example:
  >>> import jax.numpy as jnp
  >>> from jaxbn._src.flax_common import state_dtypes
  >>> [d.name for d in state_dtypes(jnp.float32, jnp.bfloat16)]
  ['float32', 'float32']
  >>> [d.name for d in state_dtypes(jnp.float32, jnp.complex64)]
  ['complex64', 'float32']
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxbn._src.core import bn_apply


class Extras(NamedTuple):
    """jaxbn's options beyond Flax's (see :func:`jaxbn.bn_apply`); hashable when its values
    are (``renorm`` is kept as a tuple)."""

    unbiased_running_var: bool = False
    virtual_batch_size: int | None = None
    renorm: tuple[Any, Any] | None = None
    skip_nonfinite: bool = False


def as_hashable(value: Any) -> Any:
    """Lists (e.g. ``axis=[1, 2]`` or ``renorm=[3, 5]``) as tuples, so that a module's static
    attributes, and an NNX graphdef holding them, stay hashable."""
    if isinstance(value, list):
        return tuple(as_hashable(v) for v in value)
    return value


def state_dtypes(declared: Any, x_dtype: Any, dtype: Any = None) -> tuple[jnp.dtype, jnp.dtype]:
    """The dtypes of the running ``(mean, var)`` for input of ``x_dtype``: those the core's
    update returns, so the variables keep one dtype from ``init`` on.

    ``declared`` is the dtype the Flax module would create (float32, or ``param_dtype`` with
    ``force_float32_reductions=False``); the statistics are computed in ``dtype`` (default
    ``x_dtype``) promoted to float32 or wider: float64 input under ``jax_enable_x64`` gives
    float64 statistics, complex input a complex mean and a real variance.
    """
    compute = jnp.promote_types(dtype if dtype is not None else x_dtype, jnp.float32)
    mean_dt = jnp.promote_types(jnp.promote_types(declared, compute), jnp.float32)
    mean_dt = jnp.dtype(jax.dtypes.canonicalize_dtype(mean_dt))
    return mean_dt, jnp.finfo(mean_dt).dtype


def as_bool_mask(mask):
    """Flax accepts any 0/1 mask: cast it to bool (None stays None)."""
    if mask is None:
        return None
    return jnp.asarray(mask).astype(bool)


def run_in_dtype(x: jax.Array, out_dtype, fn):
    """Calls ``fn(x')`` where ``x'`` is ``x`` upcast (exactly) when ``out_dtype`` is wider, and
    returns its output cast to ``out_dtype``: Flax's output dtype without losing precision."""
    out_dtype = jnp.dtype(out_dtype)
    wider = jnp.promote_types(x.dtype, out_dtype) == out_dtype and out_dtype != x.dtype
    y, new = fn(x.astype(out_dtype) if wider else x)
    return y.astype(out_dtype), new


def apply_core(x, params: dict, state: dict, train: bool, *, axis, momentum, epsilon,
               axis_name, axis_index_groups, mask, extras: Extras, out_dtype):
    """One BatchNorm call as a Flax module makes it; returns ``(y, new_state)``.

    Like Flax, a batch with one value per feature is accepted in training (``y = bias``), a
    non-boolean mask is cast to bool, and complex input is normalized (``jaxbn._src.complex_bn``).
    """
    def call(xx):
        return bn_apply(params, state, xx, train, axis=axis, momentum=momentum,
                        epsilon=epsilon, axis_name=axis_name,
                        axis_index_groups=axis_index_groups, mask=as_bool_mask(mask),
                        allow_single_value=True, **extras._asdict())
    return run_in_dtype(x, out_dtype, call)
