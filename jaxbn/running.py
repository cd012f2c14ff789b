"""Running-statistic update rules. Updates carry no gradient.

Example:
  >>> import jax.numpy as jnp
  >>> from jaxbn.running import ema, cumulative
  >>> round(float(ema(jnp.array(0.0), jnp.array(1.0), 0.9)), 6)
  0.1
  >>> float(cumulative(jnp.array(2.0), jnp.array(5.0), jnp.array(2)))  # average of 2, 2, 5
  3.0
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def ema(old: jax.Array, batch: jax.Array, momentum) -> jax.Array:
    """Flax's convention: ``momentum * old + (1 - momentum) * batch``."""
    batch = lax.stop_gradient(batch).astype(old.dtype)
    return momentum * old + (1 - momentum) * batch


def cumulative(old: jax.Array, batch: jax.Array, num_updates: jax.Array) -> jax.Array:
    """Plain average of all batch statistics so far, given ``num_updates`` earlier updates."""
    batch = lax.stop_gradient(batch).astype(old.dtype)
    k = num_updates.astype(old.dtype)
    return old + (batch - old) / (k + 1)


def unbiased(var: jax.Array, count: jax.Array) -> jax.Array:
    """Bessel's correction ``n / (n - 1)`` applied to a biased variance (``n`` = global count)."""
    return var * (count / jnp.maximum(count - 1, 1))


def accumulate(old_mean, old_var, seen, batch_mean, batch_var, batch_count):
    """Exact (count-weighted) statistics of everything seen so far plus one batch (Chan's rule).

    ``seen`` is the number of elements already accumulated. Returns ``(mean, var, seen)``.
    """
    batch_mean, batch_var, batch_count = (lax.stop_gradient(v).astype(old_mean.dtype)
                                          for v in (batch_mean, batch_var, batch_count))
    total = seen + batch_count
    w = batch_count / jnp.maximum(total, 1)
    delta = batch_mean - old_mean
    mean = old_mean + w * delta
    var = (1 - w) * old_var + w * batch_var + w * (1 - w) * delta * delta
    return mean, var, total


def keep_where(ok: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """``new`` where ``ok`` holds, else ``old`` (no data lost to an empty or bad batch)."""
    return jnp.where(ok, new, old)
