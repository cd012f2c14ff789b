"""Moving Equinox models and states to ``jaxbn.equinox.BatchNorm``: ``jaxbn.equinox.convert``
(every ``equinox.nn.BatchNorm`` of a model swapped, its fields and ``StateIndex`` entries
kept) and ``jaxbn.equinox.from_equinox_state`` (a state Equinox's layer wrote, reread as
jaxbn keeps it).

It needs Equinox: only ``jaxbn.equinox`` imports it (and ``_src/equinox_fold.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import equinox as eqx
import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from jaxbn.equinox import BatchNorm


@functools.cache
def jaxbn_layer() -> type[BatchNorm]:
    """``jaxbn.equinox.BatchNorm`` (imported here: ``jaxbn.equinox`` imports this module)."""
    from jaxbn.equinox import BatchNorm

    return BatchNorm


def is_eqx_batchnorm(node: Any) -> bool:
    """Whether ``node`` is an ``equinox.nn.BatchNorm`` (jaxbn's included)."""
    return isinstance(node, eqx.nn.BatchNorm)


def rebuilt(module: Any, cls: type, **changes: Any) -> Any:
    """A copy of an Equinox module as ``cls`` (same fields, ``changes`` applied). Fields are
    set as Equinox's own unflattening sets them: ``StateIndex`` markers are kept, so the
    model's existing ``eqx.nn.State`` stays valid."""
    new: Any = object.__new__(cls)
    for f in dataclasses.fields(module):
        object.__setattr__(new, f.name, changes.pop(f.name, getattr(module, f.name)))
    if changes:
        raise AssertionError(f"unknown fields {sorted(changes)}")
    return new


def convert(model: Any) -> Any:
    """Replaces every ``equinox.nn.BatchNorm`` in ``model`` with :class:`BatchNorm`.

    Each layer keeps its fields, parameters and ``StateIndex`` entries, so the model's
    existing ``eqx.nn.State`` (and checkpoints) work with the converted model. Use it on
    models built by code you do not edit (libraries that call ``eqx.nn.BatchNorm``).

    Example:
      >>> import equinox as eqx, jax
      >>> import jaxbn.equinox
      >>> model, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
      >>> type(jaxbn.equinox.convert(model)).__module__
      'jaxbn.equinox'
    """
    cls = jaxbn_layer()

    def visit(node):
        if is_eqx_batchnorm(node) and not isinstance(node, cls):
            return rebuilt(node, cls)
        return node
    return jax.tree.map(visit, model, is_leaf=is_eqx_batchnorm)


def from_equinox_state(model: Any, state: eqx.nn.State) -> eqx.nn.State:
    """Rereads a state written by ``equinox.nn.BatchNorm`` as jaxbn keeps it.

    Equinox's ``mode="batch"`` starts its variance average from ones, so after ``k`` updates
    it holds ``momentum**k`` too much; this removes it from every ``"batch"``-mode
    :class:`BatchNorm` of ``model`` (convert the model first). ``"ema"`` states need nothing.
    Call it once, eagerly (not under ``jit``), on a state that Equinox's layer trained (a
    jaxbn-trained state has no such excess): a variance average below ``momentum**k`` cannot
    come from Equinox and raises.
    The result is as accurate as the checkpoint allows: the ones cost float32 digits while
    ``momentum**k`` is near 1.

    Example:
      >>> import equinox as eqx, jax, jax.numpy as jnp
      >>> import jaxbn.equinox
      >>> eqx_bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(1, "b", mode="batch")
      >>> x = jnp.array([[0.0], [2.0]])  # batch variance 1
      >>> step = jax.vmap(eqx_bn, axis_name="b", in_axes=(0, None), out_axes=(0, None))
      >>> _, state = step(x, state)
      >>> bn = jaxbn.equinox.convert(eqx_bn)
      >>> bn.inference_statistics(state)[1].round(2).tolist()  # Equinox's reading
      [100.0]
      >>> state = jaxbn.equinox.from_equinox_state(bn, state)
      >>> bn.inference_statistics(state)[1].round(4).tolist()
      [1.0]
    """
    layers = [n for n in jax.tree.leaves(model, is_leaf=is_eqx_batchnorm) if is_eqx_batchnorm(n)]
    for bn in layers:
        if not isinstance(bn, jaxbn_layer()):
            raise TypeError("from_equinox_state reads states for jaxbn.equinox.BatchNorm; "
                            "convert the model first: model = jaxbn.equinox.convert(model)")
        if bn.mode != "batch":
            continue
        assert bn.batch_counter is not None and bn.batch_state_index is not None
        counter = state.get(bn.batch_counter)
        mean, var = state.get(bn.batch_state_index)
        dt = jnp.promote_types(var.dtype, jnp.float32)
        k = jnp.maximum(counter, 0).astype(dt)
        excess = jnp.where(counter > 0, jnp.asarray(bn.momentum, dt) ** k, jnp.zeros((), dt))
        ulp = jnp.finfo(var.dtype).eps
        if bool(jnp.any(var.astype(dt) < excess * (1 - 4 * k * ulp))):
            raise ValueError(f"this state's variance average is below momentum**k = "
                             f"{float(excess):.6g} (k = {int(counter)}): it was not written "
                             f"by equinox.nn.BatchNorm in mode='batch' (or was already "
                             f"converted)")
        new_var = jnp.where(counter > 0, jnp.maximum(var.astype(dt) - excess, 0), var)
        state = state.set(bn.batch_state_index, (mean, new_var.astype(var.dtype)))
    return state
