"""Cross-device combination of batch moments: count-weighted, stable, O(F) bytes at scale.

Each device brings its local :class:`~jaxbn._src.moments.Moments` ``(count, m0, corr, m2)``: the
mean is ``m0 + corr`` held as two floats, ``m2`` the sum of squared deviations about it.
:func:`combine_across` returns the moments of the union of the devices' data, the mean again
as two floats, so that every device can normalize with ``((x - m0) - corr) * invstd`` without
rounding the mean first.

Two exact methods, chosen by the static number of devices ``D`` in a group:

* ``"gather"`` (``D <= GATHER_MAX_DEVICES``): ONE all-gather of every device's
  ``(m0, corr, m2[, count])``, then Chan's parallel rule about the provisional mean of the
  device with the most elements, differences of provisional means taken first. Exact in
  every case; moves ``(3F + c) * D`` floats to each device.
* ``"reduce"`` (above): ONE all-reduce of ``(S1, S2[, count])``, the sums of ``x - K`` and
  ``(x - K)**2`` about a per-feature ``shift`` ``K`` that all devices already agree on (the
  running mean), rebuilt from each device's unrounded ``(m0, corr, m2)``. Its size does not
  depend on ``D``. The variance ``S2/N - (S1/N)**2`` loses ``1 + r`` in relative precision,
  ``r = (mean - K)**2 / var``. When ``r > RATIO_LIMIT`` for some feature (a cold or lagging
  shift at a large offset), a second all-reduce about ``K + S1/N`` (now within rounding of
  the mean) runs inside a ``lax.cond``. The predicate is built only from the all-reduced
  sums, so it is bitwise the same on every device of a group and the branch is uniform.

``"two_rounds"`` is ``"reduce"`` with the second round always executed (no conditional:
for backends where a data-dependent branch costs a host synchronization).

The shift must be the same, bit for bit, on every device of a group (the running mean of a
layer whose every step was synchronized is; :func:`warm_shift` divides out its zero start).
Under ``shard_map`` a shift typed as varying is ignored; under ``pmap``/``vmap`` it cannot be
checked. For plain ``jit`` over a sharded batch (no axis name), :func:`shifted_moments` takes
the same sums about the shift over the whole array in one pass (one all-reduce, inserted by
XLA) and :func:`batch_may_be_sharded` says when to use it.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxbn._src.moments import Moments
  >>> from jaxbn._src.sync_stats import combine_across
  >>> m0, corr, m2 = jnp.array([[1.0], [3.0]]), jnp.zeros((2, 1)), jnp.array([[2.0], [8.0]])
  >>> def f(m0, corr, m2):  # two devices with 2 rows each: means 1 and 3
  ...     return combine_across(Moments(2, m0, corr, m2), "d", None, method="reduce")
  >>> out = jax.vmap(f, axis_name="d")(m0, corr, m2)
  >>> out.count.tolist(), (out.m0 + out.corr)[0].tolist(), out.m2[0].tolist()
  ([4, 4], [2.0], [14.0])
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn._src import collectives, moments
from jaxbn._src.layout import Layout, typed_sharding
from jaxbn._src.moments import Moments, safe_div

# Largest group size combined by all-gather; above it, the O(F) all-reduce. Module-level so
# that tests (and users) can force either method on a given device count.
GATHER_MAX_DEVICES = 8
# Largest (mean - shift)**2 / var accepted from the first all-reduce; the variance keeps
# about 1 + RATIO_LIMIT times single-device rounding in the worst case.
RATIO_LIMIT = 4.0
METHODS = ("gather", "reduce", "two_rounds")


def group_size(axis_name: collectives.AxisName, groups: collectives.Groups) -> int:
    """Static number of devices whose statistics are combined (a group's size when grouped)."""
    total = collectives.check_bound(axis_name)
    return total if groups is None else len(groups[0])


def choose_method(num_devices: int) -> str:
    """``"gather"`` up to :data:`GATHER_MAX_DEVICES` devices, ``"reduce"`` above."""
    return "gather" if num_devices <= GATHER_MAX_DEVICES else "reduce"


def combine_across(local: Moments, axis_name: collectives.AxisName, groups: collectives.Groups,
                   *, shift: jax.Array | None = None, method: str | None = None,
                   epsilon: float = 0.0) -> Moments:
    """Combines per-device moments over the named devices; returns the global moments.

    Args:
      local: this device's :class:`jaxbn._src.moments.Moments`, in broadcast shape. ``count`` is
        a Python int when every device holds the same static number of elements.
      axis_name: the bound axis name(s) to combine over.
      groups: normalized ``axis_index_groups`` (``collectives.normalize_groups``) or None.
      shift: optional per-feature value, broadcastable to ``m0``, that every device of a
        group holds bit for bit (the running mean of a synchronized layer). Used only by the
        all-reduce methods; a good one (near the batch mean) avoids the second round. Under
        ``shard_map`` a shift typed as varying over ``axis_name`` is ignored (zero is used).
      method: ``"gather"``, ``"reduce"``, ``"two_rounds"``, or None for
        :func:`choose_method` on the static group size.
      epsilon: the layer's epsilon. The first all-reduce is accepted when ``(mean - K)**2 <=
        RATIO_LIMIT * (var + epsilon)``: the variance error is then within ``1 + RATIO_LIMIT``
        times one device's rounding of ``var + epsilon``, the quantity normalization uses, and
        a constant feature whose running mean sits an ulp from its value does not take the
        second round on every step. 0 asks for that precision relative to ``var`` itself.

    Returns:
      Global :class:`~jaxbn._src.moments.Moments`: the count (a Python int when static), ``m0`` and
      ``corr`` with ``m0 + corr`` the global mean, and ``m2`` the global sum of squared
      deviations, identical on every device of a group.
    """
    size = group_size(axis_name, groups)
    method = choose_method(size) if method is None else method
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} or None, got {method!r}")
    if method == "gather":
        return moments.gather_and_pool(local, axis_name, groups)
    return _reduced(local, axis_name, groups, shift, size, epsilon,
                    always_two=method == "two_rounds")


def warm_shift(running_mean: jax.Array, updates: jax.Array | None = None,
               momentum: float | None = None) -> jax.Array:
    """A shift for :func:`combine_across` from the running mean that every device holds.

    An exponential average started at zero lags the batch mean by ``momentum**updates`` of
    its size; with the number of updates known (``state["count"]``) that bias is divided out,
    as in Adam, so the shift is near the batch mean from the second step on and the second
    round fires only when the statistics move fast. Without ``updates`` (Flax's
    ``batch_stats`` keep no count) the running mean is returned as it is.

    Example:
      >>> import jax.numpy as jnp
      >>> # one update of 0.99 * 0 + 0.01 * 1e4: the batch mean was 1e4
      >>> warm_shift(jnp.array([100.0]), jnp.array(1), 0.99).round().tolist()
      [10000.0]
    """
    if updates is None or momentum is None:
        return running_mean
    seen = 1.0 - jnp.asarray(momentum, running_mean.dtype) ** updates.astype(running_mean.dtype)
    return jnp.where(updates > 0, running_mean / jnp.where(updates > 0, seen, 1.0), 0.0)


def _agreed_shift(shift, like: jax.Array, names) -> jax.Array:
    zero = jnp.zeros(like.shape, like.dtype)  # a constant: the same (invariant) everywhere
    if shift is None:
        return zero
    shift = jnp.broadcast_to(jnp.asarray(shift, like.dtype), like.shape)
    if set(names) & collectives.varying_axes(shift):
        return zero  # not provably the same on every device: do not trust it
    return moments.opaque(shift)  # every use below must see the same rounded value


def second_round_needed(s1: jax.Array, s2: jax.Array, total: jax.Array | int,
                        epsilon: float = 0.0) -> jax.Array:
    """Whether sums about a shift ``K`` lose too much: ``r = (mean - K)**2 / (var + epsilon)``
    exceeds :data:`RATIO_LIMIT` for some feature, or a sum is not finite. A scalar bool.

    ``s1 = sum(x - K)``, ``s2 = sum((x - K)**2)``, ``total`` the count. Fed only all-reduced
    values, it is bitwise the same on every device.

    Example:
      >>> second_round_needed(jnp.array([4.0]), jnp.array([20.0]), 4).item()  # r = 1 / 4
      False
      >>> second_round_needed(jnp.array([40.0]), jnp.array([404.0]), 4).item()  # r = 100
      True
    """
    mean_sq = jnp.square(safe_div(s1, total))
    # r <= limit  <=>  mean_sq * (1 + limit) <= limit * (s2 / N + eps); NaN compares False,
    # and an overflowed s2 (offsets near sqrt(max float) about a cold shift) asks for a round.
    fine = mean_sq * (1 + RATIO_LIMIT) <= RATIO_LIMIT * (safe_div(s2, total) + epsilon)
    fine = fine & jnp.isfinite(s2)
    return jnp.logical_not(jnp.all(fine))


def _shifted_sums(local, k):
    """This device's ``sum(x - k)`` and ``sum((x - k)**2)`` from its unrounded moments."""
    count, m0, corr, m2 = local
    delta = (m0 - k) + corr
    s1 = count * delta
    s2 = m2 + s1 * delta
    if not isinstance(count, int):  # empty device: m0 = 0 may be far from k
        s1 = jnp.where(count > 0, s1, 0)
        s2 = jnp.where(count > 0, s2, 0)
    return s1, s2


def _reduced(local, axis_name, groups, shift, size, epsilon, *, always_two):
    count = local.count
    k = _agreed_shift(shift, local.m0, collectives.names_of(axis_name))
    s1, s2 = _shifted_sums(local, k)
    if isinstance(count, int):
        s1, s2 = collectives.sum_over((s1, s2), axis_name, groups)
        total: Any = count * size
    else:
        s1, s2, total = collectives.sum_over((s1, s2, count), axis_name, groups)

    def second_round(_):
        # Within rounding of the mean: no cancellation left. Opaque, so that XLA cannot fuse
        # the unrounded quotient into one use of k2 and the rounded one into another.
        k2 = moments.opaque(k + safe_div(s1, total))
        t1, t2 = collectives.sum_over(_shifted_sums(local, k2), axis_name, groups)
        return k2, t1, t2

    k = k + jnp.zeros_like(s1)  # the sums' sharding, so both branches agree (Explicit meshes)
    if always_two:
        k, s1, s2 = second_round(None)
    else:
        k, s1, s2 = lax.cond(second_round_needed(s1, s2, total, epsilon), second_round,
                             lambda _: (k, s1, s2), None)
    corr = safe_div(s1, total)
    m2 = jnp.maximum(s2 - s1 * corr, 0)
    if not isinstance(total, int):  # an empty feature's mean is 0, as on one device
        k = jnp.where(total > 0, k, 0)
    return Moments(total, k, corr, m2)


# ---- Plain jit over a sharded batch (no axis name): XLA inserts the collectives ------------

def batch_may_be_sharded(x: jax.Array, layout: Layout) -> bool:
    """Whether plain ``jit`` may have split ``x``'s reduced dimensions over devices.

    True when ``x``'s type names an Explicit mesh axis (of size > 1) on a reduced dimension,
    or when its mesh has Auto axes of size > 1 (their sharding is not in the type, so it is
    unknown at trace time). False outside any mesh, and for axes that are already manual
    (inside ``shard_map`` or ``pmap``, where ``x`` is one device's block).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxbn._src.layout import make_layout
      >>> batch_may_be_sharded(jnp.ones((4, 3)), make_layout((4, 3), -1))
      False
    """
    typed = typed_sharding(x)
    if typed is None:
        return False
    mesh, spec = typed
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    kinds = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    if any(kinds[a] == jax.sharding.AxisType.Auto and sizes[a] > 1 for a in mesh.axis_names):
        return True
    for dim in layout.reduce_axes:
        names = spec[dim] if isinstance(spec[dim], tuple) else (spec[dim],)
        if any(n is not None and kinds[n] == jax.sharding.AxisType.Explicit
               and sizes[n] > 1 for n in names):
            return True
    return False


def shifted_moments(x: jax.Array, mask: jax.Array | None, layout: Layout,
                    shift: jax.Array | None = None, epsilon: float = 0.0) -> Moments:
    """Moments of ``x`` (all of it, every device's part under plain ``jit``) from ONE pass of
    sums about ``shift``, and a second pass about ``shift + mean`` only when needed.

    The statistics of a batch that ``jit`` has sharded over devices: the two sums of the
    first pass are independent reductions, which XLA all-reduces as ONE collective (the
    corrected two-pass of :func:`jaxbn._src.moments.local_moments` needs two, one after the
    other). The second pass runs inside a ``lax.cond`` on :func:`second_round_needed`, as in
    :func:`combine_across` (``epsilon`` as there), so the result keeps single-device precision
    whatever the shift.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxbn._src.layout import make_layout
      >>> x = jnp.array([[1e4 + 1.0], [1e4 + 3.0]])
      >>> m = shifted_moments(x, None, make_layout(x.shape, -1))  # zero shift: 2 passes
      >>> (m.m0 + m.corr).item(), (m.m2 / m.count).item()
      (10002.0, 1.0)
    """
    dt = moments.stats_dtype(x.dtype)
    xs = x.astype(dt)
    axes = layout.reduce_axes
    count: Any
    if mask is None:
        count, valid = layout.local_count, None
    else:
        valid = moments.as_rank(mask, x.ndim)
        count = moments.masked_count(valid, layout, dt)
    k = jnp.zeros(layout.broadcast_shape, dt) if shift is None else moments.opaque(
        jnp.broadcast_to(jnp.asarray(shift, dt), layout.broadcast_shape))

    def sums(k):
        d = xs - k if valid is None else jnp.where(valid, xs - k, 0)
        return jnp.sum(d, axis=axes, keepdims=True), jnp.sum(d * d, axis=axes, keepdims=True)

    def second_pass(_):
        k2 = moments.opaque(k + safe_div(s1, count))
        return (k2, *sums(k2))

    s1, s2 = sums(k)
    k = k + jnp.zeros_like(s1)  # the sums' sharding, so both branches agree (Explicit meshes)
    k, s1, s2 = lax.cond(second_round_needed(s1, s2, count, epsilon), second_pass,
                         lambda _: (k, s1, s2), None)
    corr = safe_div(s1, count)
    m2 = jnp.maximum(s2 - s1 * corr, 0)
    if not isinstance(count, int):
        k = jnp.where(count > 0, k, 0)
    return Moments(count, k, corr, m2)
