"""Cross-device combination of batch moments: count-weighted, exact, a function of the data alone.

Each device brings its local :class:`~jaxbn._src.moments.Moments` ``(count, m0, corr, m2)``
(the mean ``m0 + corr`` held as two floats, ``m2`` the sum of squared deviations about it).
:func:`combine_across` returns the moments of the union of the devices' data, the mean again as
two floats, identical on every device of a group, so that each device normalizes with
``((x - m0) - corr) * invstd`` without rounding the mean first.

Two exact methods; which one runs is the ``sync_method`` setting of :func:`jaxbn.bn_apply`:

* ``"gather"``: ONE all-gather of every device's ``(m0, corr, m2[, count])``, then Chan's
  parallel rule (:func:`~jaxbn._src.moments.pool`). One round; each device receives
  ``(3F + c) * D`` floats for ``F`` features and ``D`` devices.
* ``"reduce"``: TWO all-reduces of O(F) floats whatever ``D``. Round 1 sums ``n_i * mean_i``
  (and the counts, with a mask): a provisional global mean ``K``, the same bit for bit on every
  device because it is a collective's output. Round 2 sums ``x - K`` and ``(x - K)**2``, each
  device rebuilding them from its unrounded local moments; the mean is ``K + S1 / N`` and
  ``M2 = S2 - S1**2 / N``. ``K`` is within ``D`` units of roundoff of the mean, so the sums
  lose nothing: with ``r = (mean - K)**2 / var`` the variance keeps ``1 + r`` times one device's
  rounding, and ``r <= (D u mean / sigma)**2`` (below 1e-3 for ``D = 32`` at ``mean / sigma =
  1e4`` in float32).
* ``"auto"`` (the default): ``"gather"`` up to :data:`AUTO_GATHER_MAX_DEVICES` devices in a
  group, ``"reduce"`` above: one round while the gathered payload is small, O(F) bytes at scale.
  Devices are counted over the axes ``shard_map`` or ``pmap`` bound; the members of a ``vmap``
  axis are not devices (per-example code vmapped inside ``pmap`` gathers over the examples
  for free), so they are not counted, except through ``axis_index_groups``.

Nothing here reads the running statistics: the result depends on the batch alone, whatever
state each device holds (NaN, far off, or different on every device).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxbn._src.moments import Moments
  >>> from jaxbn._src.combine import combine_across
  >>> m0, corr, m2 = jnp.array([[1.0], [3.0]]), jnp.zeros((2, 1)), jnp.array([[2.0], [8.0]])
  >>> def f(m0, corr, m2):  # two devices with 2 rows each: means 1 and 3
  ...     return combine_across(Moments(2, m0, corr, m2), "d", None, method="reduce")
  >>> out = jax.vmap(f, axis_name="d")(m0, corr, m2)
  >>> out.count.tolist(), (out.m0 + out.corr)[0].tolist(), out.m2[0].tolist()
  ([4, 4], [2.0], [14.0])
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxbn._src import collectives, moments
from jaxbn._src.moments import Moments, pool, safe_div

#: Largest group of devices that ``sync_method="auto"`` combines by all-gather: the gathered
#: payload, ``(3F + c) * D`` floats, is then at most 4x the reduce method's two rounds, and one
#: round of latency is saved. Above it the two O(F) all-reduces run.
AUTO_GATHER_MAX_DEVICES = 8
METHODS = ("auto", "gather", "reduce")


def check_method(method: str) -> str:
    """``method`` if it names a method; else a ValueError listing them."""
    if method not in METHODS:
        raise ValueError(f"sync_method must be one of {METHODS}, got {method!r}")
    return method


def resolve_method(method: str, num_devices: int) -> str:
    """The method that runs for a group of ``num_devices`` devices (``"auto"`` resolved).

    >>> resolve_method("auto", 8), resolve_method("auto", 9), resolve_method("gather", 64)
    ('gather', 'reduce', 'gather')
    """
    if check_method(method) != "auto":
        return method
    return "gather" if num_devices <= AUTO_GATHER_MAX_DEVICES else "reduce"


def group_size(axis_name: collectives.AxisName, groups: collectives.Groups) -> int:
    """Static number of devices whose statistics are combined (a group's size when grouped)."""
    total = collectives.check_bound(axis_name)
    return total if groups is None else len(groups[0])


def combine_across(local: Moments, axis_name: collectives.AxisName, groups: collectives.Groups,
                   method: str = "auto") -> Moments:
    """Combines per-device moments over the named devices; returns the global moments.

    Args:
      local: this device's :class:`~jaxbn._src.moments.Moments` in broadcast shape; ``count``
        is a Python int when every device holds the same static number of elements.
      axis_name: the bound axis name(s) to combine over.
      groups: normalized ``axis_index_groups`` (``collectives.normalize_groups``) or None.
      method: ``"auto"``, ``"gather"`` or ``"reduce"`` (see the module docstring).

    Returns:
      Global :class:`~jaxbn._src.moments.Moments` (the count a Python int when static),
      identical on every device of a group. A feature with no valid element anywhere has
      count 0, mean 0 and ``m2`` 0.
    """
    devices = collectives.device_count(axis_name) if groups is None else len(groups[0])
    method = resolve_method(method, devices)
    if method == "gather":
        return gather(local, axis_name, groups)
    return reduce_two_rounds(local, axis_name, groups)


def gather(local: Moments, axis_name, groups) -> Moments:
    """ONE all-gather of each device's ``(m0, corr, m2[, count])``, pooled by Chan's rule."""
    parts = [local.m0, local.corr, local.m2]
    static = isinstance(local.count, int)  # the same on every device: nothing to send
    if not static:
        # an add, not broadcast_to, so the count takes m0's sharding on an Explicit mesh
        parts.append(jnp.zeros_like(local.m0) + local.count)
    gathered = collectives.gather_stacked(jnp.stack(parts), axis_name, groups)
    counts = jnp.full_like(gathered[:, 0], local.count) if static else gathered[:, 3]
    pooled = pool(counts, gathered[:, 0], gathered[:, 1], gathered[:, 2])
    if static:
        return pooled._replace(count=local.count * gathered.shape[0])
    return pooled


def _sums_about(local: Moments, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """This device's ``sum(x - k)`` and ``sum((x - k)**2)`` from its unrounded moments."""
    count, m0, corr, m2 = local
    delta = (m0 - k) + corr
    s1 = count * delta
    s2 = m2 + s1 * delta
    if not isinstance(count, int):  # an empty device's m0 = 0 may be far from k
        s1 = jnp.where(count > 0, s1, 0)
        s2 = jnp.where(count > 0, s2, 0)
    return s1, s2


def reduce_two_rounds(local: Moments, axis_name, groups) -> Moments:
    """Two O(F) all-reduces: a provisional mean, then the sums about it (module docstring)."""
    static = isinstance(local.count, int)
    weighted = local.count * (local.m0 + local.corr)  # n_i * mean_i (0 on an empty device)
    if static:
        total = local.count * group_size(axis_name, groups)
        summed = collectives.sum_over(weighted, axis_name, groups)
    else:
        summed, total = collectives.sum_over(
            jnp.stack([weighted, jnp.zeros_like(weighted) + local.count]), axis_name, groups)
    # The shift every device uses, rounded once so that no use sees another rounding of it.
    k = moments.opaque(safe_div(summed, total))
    s1, s2 = collectives.sum_over(jnp.stack(_sums_about(local, k)), axis_name, groups)
    corr = safe_div(s1, total)
    m2 = jnp.maximum(s2 - s1 * corr, 0)
    return Moments(total, k, corr, m2)
