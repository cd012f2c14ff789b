"""Cross-device communication: checking axis names, gathering statistics, summing gradients.

This is the only module that issues collectives. It hides the differences between the ways
JAX binds an axis name (``pmap``, ``shard_map``, ``vmap``) so the mathematics elsewhere can
treat a named axis as "more batch".

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxbn._src.collectives import gather_stacked
  >>> jax.vmap(lambda v: gather_stacked(v, "b", None), axis_name="b")(jnp.arange(3.0)).shape
  (3, 3)
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

AxisName = Hashable | tuple[Hashable, ...]
Groups = tuple[tuple[int, ...], ...] | None


class UnboundAxisNameError(NameError, ValueError):
    """Raised when ``axis_name`` is not bound by an enclosing pmap, shard_map or vmap."""


def names_of(axis_name: AxisName) -> tuple[Hashable, ...]:
    """Returns ``axis_name`` as a tuple of names."""
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def check_bound(axis_name: AxisName) -> int:
    """Returns the total size of the named axes, or raises an error that names the unbound one."""
    size = 1
    for name in names_of(axis_name):
        try:
            size *= lax.axis_size(name)
        except NameError:
            raise UnboundAxisNameError(
                f"axis_name {name!r} is not bound: call bn_apply inside jax.pmap, "
                f"jax.shard_map or jax.vmap with that axis name (or pass axis_name=None "
                f"for per-device statistics)") from None
        except jax.errors.InconclusiveDimensionOperation:
            # A vmap axis of symbolic size (jax.export): its size is not known when tracing.
            raise NotImplementedError(
                f"axis_name {name!r} is a vmap axis of symbolic size: synchronized statistics "
                f"need the size of the named axes when tracing. Export with a static size for "
                f"that axis, or normalize the batch as one array (axis_name=None)") from None
    return size


def normalize_groups(axis_index_groups: Sequence[Sequence[int]] | None) -> Groups:
    """Turns ``axis_index_groups`` into a hashable tuple of tuples (or None)."""
    if axis_index_groups is None:
        return None
    groups = tuple(tuple(int(i) for i in g) for g in axis_index_groups)
    sizes = {len(g) for g in groups}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"axis_index_groups must be non-empty groups of equal size, got {groups}")
    return groups


def varying_axes(x: jax.Array) -> frozenset:
    """The shard_map axes along which ``x`` varies (empty outside shard_map, or without
    check_vma)."""
    return varying_axes_of_aval(jax.typeof(x))


def varying_axes_of_aval(aval) -> frozenset:
    """``varying_axes`` of an abstract value."""
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def device_count(axis_name: AxisName) -> int:
    """How many devices the named axes span: the product of the sizes of the names that
    ``shard_map`` or ``pmap`` bound. A ``vmap`` axis is an array axis (its collectives are
    array operations), so it counts for 1.

    >>> counts = []
    >>> _ = jax.vmap(lambda v: counts.append(device_count("b")) or v, axis_name="b")(jnp.ones(3))
    >>> counts  # a vmap axis spans no devices
    [1]
    """
    manual = getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ())
    size = 1
    for name in names_of(axis_name):
        if name in manual:
            size *= lax.axis_size(name)
    return size


def _is_manual(x: jax.Array, names: tuple[Hashable, ...]) -> bool:
    return set(names) <= varying_axes(x)


def _grouped_error(err: Exception) -> Exception:
    return NotImplementedError(
        "axis_index_groups is not supported here (JAX refuses grouped collectives under "
        "jax.vmap, and under jax.shard_map unless check_vma=False). Use jax.pmap, or a 2-D "
        f"mesh reduced over one of its axes. JAX said: {err}")


def gather_stacked(local: jax.Array, axis_name: AxisName, groups: Groups) -> jax.Array:
    """All-gathers ``local`` over the named devices: ONE collective, result replicated.

    Returns an array of shape ``(num_devices_in_group, *local.shape)``. Under shard_map with
    check_vma the result is typed invariant, so values computed from it may leave the
    shard_map with a replicated ``P()`` out_spec.
    """
    names = names_of(axis_name)
    try:
        if _is_manual(local, names):
            # Gathered as a tiled concatenation of a new leading axis: JAX 0.10's sharding
            # rule for the untiled form mis-places the spec under a partial-manual shard_map.
            out = lax.all_gather(local[None], names if len(names) > 1 else names[0],
                                 axis_index_groups=groups, tiled=True, to="invarying")
        elif len(names) == 1:
            out = lax.all_gather(local, names[0], axis_index_groups=groups)
        else:
            # vmap cannot all_gather over several names at once; gathering name by name is free
            # there (vmap collectives are array ops), and gives the same flattened order.
            out = local
            for name in reversed(names):
                out = lax.all_gather(out, name, axis_index_groups=groups)
            out = out.reshape((-1,) + local.shape)
    except NotImplementedError as err:
        if groups is not None:
            raise _grouped_error(err) from None
        raise
    return out


def _vmapped_on_explicit_mesh(names: tuple[Hashable, ...]) -> bool:
    """True when some name is a vmap axis inside ``jax.set_mesh`` with Explicit axes.

    JAX 0.10's psum batching rule mis-types its result there (it keeps the batch sharding);
    an all-gather followed by a sum is exact and, under vmap, only array operations.
    """
    mesh = jax.sharding.get_abstract_mesh()
    explicit = getattr(mesh, "_any_axis_explicit", False)
    manual = getattr(mesh, "manual_axes", ())  # names bound by shard_map or pmap
    return bool(explicit) and any(n not in manual for n in names)


def _grouped(fn, value, names, groups):
    try:
        return fn(value, names if len(names) > 1 else names[0], axis_index_groups=groups)
    except NotImplementedError as err:
        if groups is not None:
            raise _grouped_error(err) from None
        raise


def _all_reduce(value: jax.Array, axis_name: AxisName, groups: Groups, collective,
                local) -> jax.Array:
    names = names_of(axis_name)
    if _vmapped_on_explicit_mesh(names):
        return local(gather_stacked(value, axis_name, groups), axis=0)
    return _grouped(collective, value, names, groups)


def sum_over(value: jax.Array, axis_name: AxisName, groups: Groups) -> jax.Array:
    """Sums ``value`` over the named devices (one all-reduce)."""
    return _all_reduce(value, axis_name, groups, lax.psum, jnp.sum)


def mean_over(value: jax.Array, axis_name: AxisName, groups: Groups) -> jax.Array:
    """Averages ``value`` over the named devices (one all-reduce)."""
    return _all_reduce(value, axis_name, groups, lax.pmean, jnp.mean)
