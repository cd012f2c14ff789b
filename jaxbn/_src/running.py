"""Running-statistic update rules. Updates carry no gradient.

Every rule computes in :func:`update_dtype`: at least float32, and never narrower than the
state or the batch statistics. A bfloat16/float16 state therefore comes back float32 (as in
flax.linen): an EMA kept in bfloat16 stalls, because ``momentum * old + (1 - momentum) * batch``
rounds back to ``old`` once the step is below half a unit in the last place.

Example:
  >>> import jax.numpy as jnp
  >>> from jaxbn._src.running import ema, cumulative
  >>> round(float(ema(jnp.array(0.0), jnp.array(1.0), 0.9)), 6)
  0.1
  >>> float(cumulative(jnp.array(2.0), jnp.array(5.0), jnp.array(2)))  # average of 2, 2, 5
  3.0
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def update_dtype(state_dtype, batch_dtype) -> jnp.dtype:
    """The dtype of an updated running statistic: float32 or wider, never narrower than either.

    >>> update_dtype(jnp.bfloat16, jnp.float32).name
    'float32'
    """
    return jnp.promote_types(jnp.promote_types(state_dtype, batch_dtype), jnp.float32)


def _cast(old: jax.Array, batch: jax.Array) -> tuple[jax.Array, jax.Array]:
    dt = update_dtype(old.dtype, batch.dtype)
    return old.astype(dt), lax.stop_gradient(batch).astype(dt)


def ema(old: jax.Array, batch: jax.Array, momentum) -> jax.Array:
    """Flax's convention: ``momentum * old + (1 - momentum) * batch``, in :func:`update_dtype`.

    ``momentum`` 0 takes the batch statistic and 1 keeps the old value, whatever the other
    holds (a NaN running state is replaced at momentum 0; frozen statistics stay frozen at 1).
    """
    old, batch = _cast(old, batch)
    if isinstance(momentum, (int, float)):  # 1 - m in double precision, then rounded once
        if momentum == 0:
            return batch
        if momentum == 1:
            return old
        return jnp.asarray(momentum, old.dtype) * old + jnp.asarray(1 - momentum, old.dtype) * batch
    m = jnp.asarray(momentum, old.dtype)
    mixed = m * old + (1 - m) * batch
    return jnp.where(m == 0, batch, jnp.where(m == 1, old, mixed))


def cumulative(old: jax.Array, batch: jax.Array, num_updates: jax.Array) -> jax.Array:
    """Plain average of all batch statistics so far, given ``num_updates`` earlier updates."""
    old, batch = _cast(old, batch)
    k = num_updates.astype(old.dtype)
    return old + (batch - old) / (k + 1)


def unbiased(var: jax.Array, count: jax.Array) -> jax.Array:
    """Bessel's correction ``n / (n - 1)`` applied to a biased variance (``n`` = global count)."""
    return var * (count / jnp.maximum(count - 1, 1))


def biased(var: jax.Array, count: jax.Array) -> jax.Array:
    """Inverse of :func:`unbiased`: ``(n - 1) / n`` times an unbiased variance."""
    return var * (jnp.maximum(count - 1, 0) / jnp.maximum(count, 1))


def accumulate(old_mean, old_var, seen, batch_mean, batch_var, batch_count,
               unbiased_var: bool = False):
    """Exact (count-weighted) statistics of everything seen so far plus one batch (Chan's rule).

    ``seen`` is the number of elements already accumulated; ``batch_var`` is the batch's
    biased variance. With ``unbiased_var`` the stored variance ``old_var`` (and the result) is
    the unbiased one of the whole population: Bessel's factor is applied once, to the pooled
    count, never per batch. Returns ``(mean, var, seen)``.
    """
    old_mean, batch_mean = _cast(old_mean, batch_mean)
    dt = old_mean.dtype
    old_var, seen = old_var.astype(dt), seen.astype(dt)
    batch_var, batch_count = (lax.stop_gradient(v).astype(dt) for v in (batch_var, batch_count))
    if unbiased_var:
        old_var = biased(old_var, seen)
    total = seen + batch_count
    w = batch_count / jnp.maximum(total, 1)
    delta = batch_mean - old_mean
    mean = old_mean + w * delta
    var = (1 - w) * old_var + w * batch_var + w * (1 - w) * delta * delta
    if unbiased_var:
        var = unbiased(var, total)
    return mean, var, total


def keep_where(ok: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """``new`` where ``ok`` holds, else ``old`` (no data lost to an empty or bad batch).

    The result has ``new``'s dtype and sharding: on an Explicit mesh ``select`` needs its
    predicate and both cases sharded alike, so ``ok`` and ``old`` are first combined with a
    zero of ``new``'s type, which gives them ``new``'s sharding (a per-feature add, free).
    """
    zero = jnp.zeros_like(new)
    return jnp.where(ok | zero.astype(bool), new, old.astype(new.dtype) + zero)
