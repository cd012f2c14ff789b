"""The running state: which update a call makes, and the new state it returns.

The update mode is decided once, from the state's keys and the momentum (:func:`update_mode`);
:func:`updated` applies it (the rules are in ``running``) and returns the new state in the
dtypes and the container type it was given, so that a state is a stable ``lax.scan`` carry and
a checkpoint keeps its layout.

Example:
  >>> import jax.numpy as jnp
  >>> from jaxbn._src.state import Batch, update_mode, updated
  >>> state = {"mean": jnp.zeros(2, jnp.bfloat16), "var": jnp.ones(2, jnp.bfloat16)}
  >>> batch = Batch(jnp.array([1.0, 2.0]), jnp.array([4.0, 4.0]), jnp.array([8.0, 8.0]))
  >>> new = updated(state, batch, update_mode(state, 0.5), momentum=0.5)  # a dict
  >>> new["mean"].tolist(), new["mean"].dtype.name
  ([0.5, 1.0], 'bfloat16')
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from jaxbn._src import running

Mode = Literal["ema", "cumulative", "precise"]


class Batch(NamedTuple):
    """One batch's statistics per feature (features' shape, float32 or wider, no gradient):
    the mean, the variance to accumulate (biased, or unbiased with ``unbiased_running_var``
    outside precise mode) and the global count of valid values."""

    mean: jax.Array
    var: jax.Array
    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count on purpose)


def update_mode(state: Mapping, momentum: Any) -> Mode:
    """``"precise"`` while ``state`` holds ``seen`` (``jaxbn.reset_stats``), else
    ``"cumulative"`` for ``momentum=None``, else ``"ema"``."""
    if "seen" in state:
        return "precise"
    return "cumulative" if momentum is None else "ema"


def same_container(like: Mapping, items: dict) -> Any:
    """``items`` as a mapping of ``like``'s type (dict, FrozenDict, ...), else a dict."""
    if type(like) is dict:
        return items
    cls: Any = type(like)
    try:
        return cls(items)
    except TypeError:
        return items


def _in_dtype(value: jax.Array, like: jax.Array) -> jax.Array:
    """``value`` in ``like``'s dtype; a complex value keeps a complex dtype (a real running
    mean becomes complex on complex input, as a flax.linen variable does)."""
    dt = like.dtype
    if jnp.iscomplexobj(value) and not jnp.issubdtype(dt, jnp.complexfloating):
        dt = jnp.promote_types(dt, value.dtype)
    return value.astype(dt)


#: The relative distance from the batch statistics at which a low-precision EMA may stop
#: moving, above which :func:`warn_if_stalling` warns.
STALL_WARN_GAP = 0.01


def stall_gap(dtype: Any, momentum: float) -> float:
    """How far (relative) an EMA kept in ``dtype`` may stall from a steady batch statistic:
    its step ``(1 - momentum) * (batch - old)`` rounds away once it is below half a unit in
    the last place of ``old``, i.e. once ``|batch - old| < eps / (2 (1 - momentum)) |old|``.

    >>> round(stall_gap(jnp.bfloat16, 0.99), 2), round(stall_gap(jnp.float32, 0.99), 8)
    (0.39, 5.96e-06)
    """
    if momentum >= 1:
        return 0.0
    return float(jnp.finfo(dtype).eps) / (2 * (1 - momentum))


def warn_if_stalling(dtype: Any, momentum: Any) -> None:
    """Warns (when the step is traced) if an EMA kept in ``dtype`` with this ``momentum`` can
    stall more than :data:`STALL_WARN_GAP` away from the batch statistics."""
    dt = jnp.dtype(dtype)
    if not isinstance(momentum, (int, float)) or not jnp.issubdtype(dt, jnp.floating):
        return
    gap = stall_gap(dt, momentum)
    if gap > STALL_WARN_GAP:
        warnings.warn(
            f"running statistics kept in {dt.name} with momentum={momentum} can stall up to "
            f"{gap:.0%} away from the batch statistics: each update (1 - momentum) = "
            f"{1 - momentum:.3g} of the difference rounds away below {dt.name}'s resolution "
            f"({float(jnp.finfo(dt).eps):.3g}). Keep the statistics in float32 (Flax: "
            f"force_float32_reductions=True, or a float32 param_dtype) or lower the momentum.",
            UserWarning, stacklevel=4)


def updated(state: Mapping, batch: Batch, mode: Mode, *, momentum: Any,
            skip_nonfinite: bool = False, unbiased_running_var: bool = False) -> dict:
    """The new state (a dict): the running statistics updated by ``mode`` where the batch
    counts (a feature with no valid value, or a non-finite batch with ``skip_nonfinite``, keeps
    its statistics), ``count`` advanced, every entry in the dtype it came in."""
    ok = batch.count > 0
    if skip_nonfinite:
        ok = ok & jnp.all(jnp.isfinite(batch.mean)) & jnp.all(jnp.isfinite(batch.var))
    if mode == "precise":  # exact population statistics (see jaxbn.reset_stats)
        m, v, seen = running.accumulate(state["mean"], state["var"], state["seen"], batch.mean,
                                        batch.var, batch.count,
                                        unbiased_var=unbiased_running_var)
        new_values = {"mean": m, "var": v, "seen": seen}
    elif mode == "cumulative":
        new_values = {k: running.cumulative(state[k], b, state["count"])
                      for k, b in (("mean", batch.mean), ("var", batch.var))}
    else:
        for key in ("mean", "var"):
            warn_if_stalling(state[key].dtype, momentum)
        new_values = {k: running.ema(state[k], b, momentum)
                      for k, b in (("mean", batch.mean), ("var", batch.var))}
    new = dict(state)
    for key, value in new_values.items():
        new[key] = _in_dtype(running.keep_where(ok, value, state[key]), state[key])
    if "count" in state:
        new["count"] = state["count"] + jnp.any(ok).astype(state["count"].dtype)
    return new
