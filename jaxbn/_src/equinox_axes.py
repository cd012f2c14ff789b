"""How a per-example BatchNorm call (Equinox's: ``x`` is one example, under ``jax.vmap`` /
``jax.pmap`` / ``jax.shard_map`` with ``axis_name``) reaches the core: which names are vmapped
examples and which are devices, and one core call over all of them.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxbn._src.equinox_axes import split_names
  >>> jax.vmap(lambda x: jnp.zeros(()) + len(split_names("b")[0]), axis_name="b")(
  ...     jnp.ones(2)).tolist()  # "b" is bound by vmap: examples, not devices
  [1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax
from jax import lax

from jaxbn._src import core
from jaxbn._src.collectives import UnboundAxisNameError
from jaxbn._src.options import Options
from jaxbn._src.types import Params, State


def split_names(axis_name: Any) -> tuple[tuple[Hashable, ...], tuple[Hashable, ...]]:
    """The names in ``axis_name`` bound by ``vmap`` (examples of this device's batch) and those
    bound by ``pmap``/``shard_map`` (devices: the abstract mesh's manual axes)."""
    names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
    for name in names:
        try:
            lax.axis_size(name)
        except NameError:
            raise UnboundAxisNameError(
                f"axis_name {name!r} is not bound: call the BatchNorm in training mode inside "
                f"jax.vmap(..., axis_name={name!r}) (or jax.pmap) over the batch, as "
                f"equinox.nn.BatchNorm requires") from None
    manual = set(getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()))
    return (tuple(n for n in names if n not in manual), tuple(n for n in names if n in manual))


def varying_axes(x: Any) -> frozenset:
    """The shard_map axes ``x`` varies along (empty outside shard_map or without check_vma)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def train(params: Params, state: State, x: jax.Array, axis_name: Any,
          options: Options) -> tuple[jax.Array, State]:
    """The core in training mode over the examples along ``axis_name`` (with ``options``, whose
    ``axis`` and ``axis_name`` are set here); returns this example's ``y`` and the new state.

    Without a device axis among the names (plain ``vmap``, on one device or under ``jit``
    over a sharded batch) the example goes to the core as a batch of one with the
    vmapped names as ``axis_name``: the core's "collectives" over them are array
    operations. Under ``pmap``/``shard_map`` the examples along the vmapped names are
    first gathered into this device's batch (array operations under vmap, no
    communication) and the device names alone go to the core, so the collectives are
    the core's over devices (up to 8 devices: one all-gather forward, one all-reduce
    backward), with a payload that does not grow with the batch.
    """
    vmapped, devices = split_names(axis_name)
    if vmapped and varying_axes(x):
        raise NotImplementedError(
            f"BatchNorm(axis_name={axis_name!r}) is vmapped over {vmapped} inside "
            f"jax.shard_map with check_vma=True: JAX 0.10 cannot run a collective over a "
            f"vmap axis there (equinox.nn.BatchNorm fails alike). Use "
            f"shard_map(..., check_vma=False), jax.pmap, or jax.jit over a batch sharded "
            f"on a mesh with Auto axes (see the Equinox guide)")
    if not devices or not vmapped:
        names = vmapped or devices
        options = options._replace(axis=1, axis_name=names if len(names) > 1 else names[0])
        y, new = core.apply(params, state, x[None], True, options)
        return y[0], new
    batch = x
    for name in reversed(vmapped):  # leading axes in the order of vmapped
        batch = lax.all_gather(batch, name)
    options = options._replace(axis=len(vmapped),
                               axis_name=devices if len(devices) > 1 else devices[0])
    y, new = core.apply(params, state, batch, True, options)
    for name in vmapped:
        y = y[lax.axis_index(name)]
    return y, new
