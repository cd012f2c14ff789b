"""What the two Flax wrappers share: the call into the core, Flax's dtype rules, the names of
jaxbn's options beyond Flax's, and the check of ``convert``/``intercept`` overrides.

The wrappers hold no mathematics and no list of options: each builds the core's
:class:`~jaxbn._src.options.Options` from its own fields of the same names
(:func:`jaxbn._src.options.from_attributes`), gathers its variables into ``params``/``state``
dicts, calls :func:`call_core`, and writes the new state back.

Example:
  >>> import jax.numpy as jnp
  >>> from jaxbn._src.flax_common import state_dtypes
  >>> [d.name for d in state_dtypes(jnp.float32, jnp.bfloat16)]
  ['float32', 'float32']
  >>> [d.name for d in state_dtypes(jnp.bfloat16, jnp.bfloat16)]  # as Flax creates them
  ['bfloat16', 'bfloat16']
  >>> [d.name for d in state_dtypes(jnp.float32, jnp.complex64)]
  ['complex64', 'float32']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxbn._src import core
from jaxbn._src.options import Options

# The options jaxbn's Flax wrappers add to Flax's BatchNorm (fields of jaxbn.linen.BatchNorm,
# constructor arguments of jaxbn.nnx.BatchNorm), named as Options' fields.
JAXBN_OPTIONS = ("unbiased_running_var", "virtual_batch_size", "renorm", "skip_nonfinite",
                 "sync_method")


def as_hashable(value: Any) -> Any:
    """Lists (e.g. ``axis=[1, 2]`` or ``renorm=[3, 5]``) as tuples, so that a module's static
    attributes, and an NNX graphdef holding them, stay hashable."""
    if isinstance(value, list):
        return tuple(as_hashable(v) for v in value)
    return value


def state_dtypes(declared: Any, x_dtype: Any, dtype: Any = None) -> tuple[jnp.dtype, jnp.dtype]:
    """The dtypes in which a wrapper creates the running ``(mean, var)`` for input of
    ``x_dtype`` (computed in ``dtype``, default ``x_dtype``).

    ``declared`` is the dtype the Flax module creates (linen: float32, or ``param_dtype`` with
    ``force_float32_reductions=False``; nnx: float32), and it is what comes back, so a Flax
    checkpoint and a jaxbn one hold the same dtypes, except where the statistics are computed
    wider than float32 (float64 input under ``jax_enable_x64``, complex input): there they are
    created in that wider dtype (a complex mean, a real variance), which flax.linen reaches
    after its first training step. The core returns every state in the dtype it was given,
    so these dtypes stay from ``init`` on.
    """
    declared = jnp.dtype(jax.dtypes.canonicalize_dtype(declared))
    compute = jnp.promote_types(dtype if dtype is not None else x_dtype, jnp.float32)
    compute = jnp.dtype(jax.dtypes.canonicalize_dtype(compute))
    if compute == jnp.float32:
        return declared, declared
    mean_dt = jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.promote_types(declared, compute)))
    return mean_dt, jnp.finfo(mean_dt).dtype


def as_bool_mask(mask: Any) -> jax.Array | None:
    """Flax accepts any 0/1 mask: cast it to bool (None stays None)."""
    if mask is None:
        return None
    return jnp.asarray(mask).astype(bool)


def run_in_dtype(x: ArrayLike, out_dtype: Any,
                 fn: Callable[[jax.Array], tuple[jax.Array, Any]]) -> tuple[jax.Array, Any]:
    """Calls ``fn(x')`` where ``x'`` is ``x`` upcast (exactly) when ``out_dtype`` is wider, and
    returns its output cast to ``out_dtype``: Flax's output dtype without losing precision."""
    x = jnp.asarray(x)
    out_dtype = jnp.dtype(out_dtype)
    wider = jnp.promote_types(x.dtype, out_dtype) == out_dtype and out_dtype != x.dtype
    y, new = fn(x.astype(out_dtype) if wider else x)
    return y.astype(out_dtype), new


def call_core(x: ArrayLike, params: Mapping, state: Mapping, train: bool, options: Options,
              mask: Any, out_dtype: Any) -> tuple[jax.Array, Any]:
    """One BatchNorm call as a Flax module makes it: ``jaxbn._src.core.apply`` with
    ``options``; returns ``(y, new_state)``, ``y`` in ``out_dtype``.

    Like Flax, a batch with one value per feature is accepted in training (``y = bias``) and a
    non-boolean mask is cast to bool.
    """
    options = options._replace(allow_single_value=True)
    mask = as_bool_mask(mask)
    return run_in_dtype(x, out_dtype,
                        lambda xx: core.apply(params, state, xx, train, options, mask))


def check_overrides(overrides: Mapping[str, Any], fixed: Sequence[str],
                    overridable: Sequence[str], *, who: str, kind: str, owner: str,
                    kept: str) -> None:
    """Raises a TypeError naming what ``who`` can set when ``overrides`` names one of
    ``fixed`` (the settings that decide ``kept``) or a name not in ``overridable`` (the
    ``kind``-s of ``owner`` it can set); shared by ``jaxbn.linen.intercept`` and
    ``jaxbn.nnx.convert``."""
    allowed = sorted(overridable)
    bad = sorted(set(overrides) & set(fixed))
    if bad:
        raise TypeError(f"{who} cannot override {bad}: these {kind}s decide {kept}; the "
                        f"{kind}s it can set are {allowed}")
    unknown = sorted(set(overrides) - set(overridable))
    if unknown:
        raise TypeError(f"{who} got unknown {kind}(s) {unknown}; the {kind}s of {owner} it can "
                        f"set are {allowed}")
