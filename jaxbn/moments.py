"""Batch moments: local (count, mean, M2) with masks, and their exact cross-device combination.

The local moments use the corrected two-pass algorithm (Chan, Golub & LeVeque 1983): a first
pass for a provisional mean ``m0``, a second pass that sums ``d = x - m0`` and ``d**2``. The
result is accurate when the mean dwarfs the spread (where ``E[x^2] - E[x]^2`` fails), and the
correction term ``sum(d)**2 / n`` repairs any rounding in ``m0``.

Devices are combined with Chan et al.'s parallel rule, weighted by counts, from ONE all-gather
of the per-device ``(count, mean, M2)``: exact for uneven and empty devices, and stable because
no large sums are subtracted.

Example:
  >>> import jax.numpy as jnp
  >>> from jaxbn.layout import make_layout
  >>> from jaxbn.moments import local_moments, finalize
  >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
  >>> m = local_moments(x, None, make_layout(x.shape, -1))
  >>> mean, var, count = finalize(m)
  >>> mean.ravel().tolist(), var.ravel().tolist(), float(count)
  ([2.0, 20.0], [1.0, 100.0], 2.0)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxbn import collectives
from jaxbn.layout import Layout


class Moments(NamedTuple):
    """Per-feature moments in broadcast (keepdims) shape, in the statistics dtype.

    ``count`` is a Python int when no mask is given (every device holds the same static number
    of elements), else an array broadcastable to ``mean``.
    """

    count: jax.Array | int
    mean: jax.Array
    m2: jax.Array


def stats_dtype(dtype) -> jnp.dtype:
    """Statistics are accumulated in float32 or wider, whatever the input dtype."""
    return jnp.promote_types(dtype, jnp.float32)


def _safe_div(num: jax.Array, den: jax.Array | int) -> jax.Array:
    if isinstance(den, int):
        return num / max(den, 1)
    return num / jnp.maximum(den, 1)


def masked_count(mask: jax.Array, layout: Layout, dtype) -> jax.Array:
    """Number of ``True`` elements per feature, without broadcasting ``mask`` to ``x``'s size."""
    ndim = len(layout.shape)
    mshape = (1,) * (ndim - mask.ndim) + tuple(mask.shape)
    m = mask.reshape(mshape)
    counted = jnp.sum(m, axis=layout.reduce_axes, keepdims=True, dtype=dtype)
    repeat = 1
    for a in layout.reduce_axes:
        if mshape[a] == 1:
            repeat *= layout.shape[a]
    return counted * repeat


def local_moments(x: jax.Array, mask: jax.Array | None, layout: Layout) -> Moments:
    """This device's moments of ``x`` over the reduced axes, counting only ``mask``'s elements."""
    dt = stats_dtype(x.dtype)
    axes = layout.reduce_axes
    xs = x.astype(dt)
    if mask is None:
        n = layout.local_count
        m0 = jnp.sum(xs, axis=axes, keepdims=True) / max(n, 1)
        d = xs - m0
    else:
        n = masked_count(mask, layout, dt)
        m0 = _safe_div(jnp.sum(jnp.where(mask, xs, 0), axis=axes, keepdims=True), n)
        d = jnp.where(mask, xs - m0, 0)
    s1 = jnp.sum(d, axis=axes, keepdims=True)
    s2 = jnp.sum(d * d, axis=axes, keepdims=True)
    corr = _safe_div(s1, n)
    mean = m0 + corr
    m2 = jnp.maximum(s2 - s1 * corr, 0)
    return Moments(n, mean, m2)


def combine_across(local: Moments, axis_name, groups) -> Moments:
    """Combines per-device moments over the named devices with one all-gather (Chan's rule)."""
    dt = local.mean.dtype
    with_count = not isinstance(local.count, int)
    parts = [local.mean, local.m2]
    if with_count:
        parts.append(jnp.broadcast_to(local.count, local.mean.shape).astype(dt))
    gathered = collectives.gather_stacked(jnp.stack(parts), axis_name, groups)
    means, m2s = gathered[:, 0], gathered[:, 1]
    if with_count:
        counts = gathered[:, 2]
        total = jnp.sum(counts, axis=0)
        # Shift by the mean of a device that has data: keeps the weighted sum small.
        ref = jnp.take_along_axis(means, jnp.argmax(counts, axis=0)[None], axis=0)[0]
        mean = ref + _safe_div(jnp.sum(counts * (means - ref), axis=0), total)
        dev = means - mean
        m2 = jnp.sum(m2s, axis=0) + jnp.sum(counts * dev * dev, axis=0)
        return Moments(total, mean, m2)
    num = gathered.shape[0]
    ref = means[0]
    mean = ref + jnp.mean(means - ref, axis=0)
    dev = means - mean
    m2 = jnp.sum(m2s, axis=0) + local.count * jnp.sum(dev * dev, axis=0)
    return Moments(local.count * num, mean, m2)


def finalize(m: Moments) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns ``(mean, biased variance, count)``; an empty batch gives mean 0 and variance 0."""
    count = jnp.asarray(m.count, m.mean.dtype)
    return m.mean, _safe_div(m.m2, m.count), count


def batch_moments(x, mask, layout, axis_name=None, groups=None):
    """``(mean, var, count)`` of ``x`` over the reduced axes and the named devices."""
    m = local_moments(x, mask, layout)
    if axis_name is not None:
        m = combine_across(m, axis_name, groups)
    return finalize(m)
