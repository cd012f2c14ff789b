"""Ghost batches (virtual batch size): consecutive groups of examples normalized on their own.

A ghost batch is ``k`` consecutive examples along axis 0 of ONE device's batch (Hoffer et al.
2017, and tf-keras's ``virtual_batch_size``): under an ``axis_name`` the groups are not pooled
across devices, so the regularization does not change with the device count. The running
statistics are the average of all groups' statistics (on every device: one all-reduce), or,
for precise statistics, the exact pooled statistics of all examples.

Splitting reshapes axis 0 into ``(groups, k)``: the group index becomes one more feature axis.
On an Explicit mesh the reshape keeps the batch sharding when the groups divide evenly over
the devices and otherwise gathers the batch axis first (correct, at the cost of moving it).

Example:
  >>> import jax.numpy as jnp
  >>> from jaxbn._src.ghost import split
  >>> from jaxbn._src.layout import make_layout
  >>> xv, _, lay = split(jnp.zeros((8, 3)), None, make_layout((8, 3), -1), 4)
  >>> xv.shape, lay.feature_axes
  ((2, 4, 3), (0, 2))
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxbn._src import collectives, combine, moments
from jaxbn._src.layout import Layout, make_layout, typed_sharding


def explicit_spec(x: jax.Array) -> tuple | None:
    """``x``'s partition spec (one entry per axis) when it is sharded on an Explicit mesh."""
    typed = typed_sharding(x)
    if typed is None or not getattr(typed[0], "_any_axis_explicit", False):
        return None
    return typed[1]


def _axis_devices(entry, mesh) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names)


def split(x: jax.Array, mask: jax.Array | None, layout: Layout, size: int):
    """Returns ``(xv, maskv, vlayout)``: axis 0 split into groups of ``size`` examples."""
    groups = x.shape[0] // size
    shape = (groups, size) + x.shape[1:]
    spec = explicit_spec(x)
    if spec is None:
        xv = x.reshape(shape)
    else:
        mesh = jax.typeof(x).sharding.mesh
        lead = spec[0] if groups % _axis_devices(spec[0], mesh) == 0 else None
        xv = jnp.reshape(x, shape, out_sharding=PartitionSpec(lead, None, *spec[1:]))
    vlayout = make_layout(xv.shape, (0,) + tuple(a + 1 for a in layout.feature_axes))
    if mask is not None:
        mask = moments.as_rank(mask, x.ndim)
        if mask.shape[0] == 1:
            mask = mask.reshape((1, 1) + mask.shape[1:])
        else:
            mask = mask.reshape((groups, size) + mask.shape[1:])
    return xv, mask, vlayout


def merge(y: jax.Array, x: jax.Array) -> jax.Array:
    """Undoes :func:`split` on the output: ``y`` back in ``x``'s shape (and sharding)."""
    spec = explicit_spec(x)
    if spec is None:
        return y.reshape(x.shape)
    return jnp.reshape(y, x.shape, out_sharding=PartitionSpec(*spec))


def pool(mean: jax.Array, var: jax.Array, count: jax.Array, *, exact: bool, axis_name,
         groups) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Running-update statistics from per-group ones (group index on axis 0).

    ``exact=False``: the average of the groups' means and variances (over every device of
    ``axis_name``: one all-reduce). ``exact=True`` (precise statistics): the count-weighted
    statistics of all examples, between-group spread included (one all-gather with a name).
    """
    if not exact:
        mean, var, count = mean.mean(0), var.mean(0), count.sum(0)
        if axis_name is None:
            return mean, var, count
        avg = collectives.mean_over(jnp.stack([mean, var]), axis_name, groups)
        return avg[0], avg[1], collectives.sum_over(count, axis_name, groups)
    m = moments.pool(count, mean, jnp.zeros_like(mean), var * count)
    if axis_name is not None:
        m = combine.gather(m, axis_name, groups)
    return moments.finalize(m)
