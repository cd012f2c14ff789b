"""Local batch moments (count, m0, corr, M2) with masks, and Chan's rule for pooling them.

The local moments use the corrected two-pass algorithm (Chan, Golub & LeVeque 1983): a first
pass for a provisional mean ``m0``, a second pass that sums ``d = x - m0`` and ``d**2``. The
mean is carried as two floats, ``m0 + corr`` with ``corr = sum(d) / n``: accurate when the mean
dwarfs the spread (where ``E[x^2] - E[x]^2`` fails), and exact enough that ``(x - m0) - corr``
normalizes without the rounding error of ``m0 + corr``.

Example:
  >>> import jax.numpy as jnp
  >>> from jaxbn._src.layout import make_layout
  >>> from jaxbn._src.moments import local_moments, finalize
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
from jax import lax

from jaxbn._src.layout import Layout, as_count
from jaxbn._src.private_copies import fresh


class Moments(NamedTuple):
    """Per-feature moments in broadcast (keepdims) shape, in the statistics dtype.

    The mean is ``m0 + corr`` (two floats: ``m0`` a provisional mean, ``corr`` its small
    correction); ``m2`` is the sum of squared deviations about that mean. ``count`` is a Python
    int when no mask is given and the shape is static (every device holds the same static
    number of elements), else an array broadcastable to ``m0`` (with a mask, or a symbolic
    shape under ``jax.export``).
    """

    count: jax.Array | int  # type: ignore[assignment]  # (shadows tuple.count on purpose)
    m0: jax.Array
    corr: jax.Array
    m2: jax.Array

    @property
    def mean(self) -> jax.Array:
        return self.m0 + self.corr


def stats_dtype(dtype) -> jnp.dtype:
    """Statistics are accumulated in float32 or wider, whatever the input dtype."""
    return jnp.promote_types(dtype, jnp.float32)


def safe_div(num: jax.Array, den: jax.Array | int) -> jax.Array:
    """``num / den`` with an empty count (0) treated as 1, so empty batches give 0, not NaN."""
    if isinstance(den, int):
        return num / max(den, 1)
    return num / jnp.maximum(den, 1)


def as_rank(mask: jax.Array, ndim: int) -> jax.Array:
    """``mask`` with leading 1-axes added up to ``ndim`` (explicit, so rank promotion is off)."""
    return mask.reshape((1,) * (ndim - mask.ndim) + tuple(mask.shape))


def masked_count(mask: jax.Array, layout: Layout, dtype) -> jax.Array:
    """Number of ``True`` elements per feature, without broadcasting ``mask`` to ``x``'s size."""
    m = as_rank(mask, len(layout.shape))
    counted = jnp.sum(m, axis=layout.reduce_axes, keepdims=True, dtype=dtype)
    repeat = 1
    for a in layout.reduce_axes:
        if m.shape[a] == 1:
            repeat *= layout.shape[a]
    return counted * as_count(repeat, dtype)  # a symbolic size (jax.export): a jnp value


def opaque(m0: jax.Array) -> jax.Array:
    """``m0`` rounded to a float that XLA cannot re-derive from the sum that produced it.

    XLA:CPU rewrites ``sum / n`` as ``sum * (1/n)`` and fuses the product into ``x - m0``, where
    LLVM contracts it into a fused multiply-add: the deviations are then taken about the
    unrounded product and ``corr`` no longer corrects ``m0``. An integer round trip that clears
    the lowest mantissa bit (a change of at most one ulp, which ``corr`` absorbs) cannot be
    folded away, so every later use sees the same rounded ``m0``. ``m0`` carries no gradient:
    the mean ``m0 + corr`` and ``M2`` do not depend on the choice of ``m0``.
    """
    m0 = lax.stop_gradient(m0)
    itype = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[m0.dtype.itemsize]
    bits = lax.bitcast_convert_type(m0, itype)
    return lax.bitcast_convert_type(bits & jnp.asarray(-2, itype), m0.dtype)


def local_moments(x: jax.Array, mask: jax.Array | None, layout: Layout) -> Moments:
    """This device's moments of ``x`` over the reduced axes, counting only ``mask``'s elements.

    Masked-out elements never enter an arithmetic operation (they are selected away first), so
    padding may hold anything, NaN and infinities included.
    """
    dt = stats_dtype(x.dtype)
    axes = layout.reduce_axes
    n: jax.Array | int
    if mask is None:  # each pass reads x itself (see ``private_copies``)
        n = as_count(layout.local_count, dt)  # an int, or a jnp value for a symbolic size
        m0 = opaque(safe_div(jnp.sum(x.astype(dt), axis=axes, keepdims=True), n))
        x_a, m0_a = fresh(x, m0)
        s1 = jnp.sum(x_a.astype(dt) - m0_a, axis=axes, keepdims=True)
        x_b, m0_b = fresh(x_a, m0_a)  # from the first copy: XLA merges identical barriers
        s2 = jnp.sum(jnp.square(x_b.astype(dt) - m0_b), axis=axes, keepdims=True)
    else:
        xs = x.astype(dt)
        mask = as_rank(mask, x.ndim)
        n = masked_count(mask, layout, dt)
        m0 = opaque(safe_div(jnp.sum(jnp.where(mask, xs, 0), axis=axes, keepdims=True), n))
        d = jnp.where(mask, xs - m0, 0)
        s1 = jnp.sum(d, axis=axes, keepdims=True)
        s2 = jnp.sum(d * d, axis=axes, keepdims=True)
    corr = safe_div(s1, n)
    m2 = jnp.maximum(s2 - s1 * corr, 0)
    return Moments(n, m0, corr, m2)


def pool(counts: jax.Array, m0s: jax.Array, corrs: jax.Array, m2s: jax.Array) -> Moments:
    """Pools moments stacked on axis 0 into one, count-weighted (Chan's parallel rule).

    Works on differences of the provisional means about the one with the most data (the
    largest such ``m0`` on ties), so a common offset cancels before any rounding.
    """
    total = jnp.sum(counts, axis=0)
    # Reductions only (no indexing), so a stacked axis sharded on an Explicit mesh works.
    largest = counts == jnp.max(counts, axis=0, keepdims=True)
    ref = jnp.max(jnp.where(largest, m0s, -jnp.inf), axis=0, keepdims=True)
    offsets = (m0s - ref) + corrs  # each part's mean minus ref
    corr = safe_div(jnp.sum(counts * offsets, axis=0), total)
    dev = offsets - corr[None]
    m2 = jnp.sum(m2s, axis=0) + jnp.sum(counts * dev * dev, axis=0)
    return Moments(total, ref[0], corr, m2)


def finalize(m: Moments) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns ``(mean, biased variance, count)``; an empty batch gives mean 0 and variance 0."""
    count = jnp.asarray(m.count, m.m0.dtype)
    return m.mean, safe_div(m.m2, m.count), count
