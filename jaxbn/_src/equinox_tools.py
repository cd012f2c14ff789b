"""Whole-model operations on an Equinox model's BatchNorm layers: ``jaxbn.equinox.convert``
(every ``equinox.nn.BatchNorm`` swapped for jaxbn's, its fields and ``StateIndex`` entries
kept), ``jaxbn.equinox.from_equinox_state`` (a state Equinox's layer wrote, reread as jaxbn
keeps it) and ``jaxbn.equinox.fold`` (each BatchNorm after a Linear or Conv of an
``eqx.nn.Sequential`` folded into it, with ``jaxbn.fold_dense`` / ``jaxbn.fold_conv``).

It needs Equinox: only ``jaxbn.equinox`` imports it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import equinox as eqx
import jax
import jax.numpy as jnp

from jaxbn import State, fold_conv, fold_dense

if TYPE_CHECKING:
    from jaxbn.equinox import BatchNorm


@functools.cache
def _jaxbn_layer() -> type[BatchNorm]:
    """``jaxbn.equinox.BatchNorm`` (imported here: ``jaxbn.equinox`` imports this module)."""
    from jaxbn.equinox import BatchNorm

    return BatchNorm


def _is_eqx_bn(node: Any) -> bool:
    """Whether ``node`` is an ``equinox.nn.BatchNorm`` (jaxbn's included)."""
    return isinstance(node, eqx.nn.BatchNorm)


def _rebuilt(module: Any, cls: type, **changes: Any) -> Any:
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
    cls = _jaxbn_layer()

    def visit(node):
        if _is_eqx_bn(node) and not isinstance(node, cls):
            return _rebuilt(node, cls)
        return node
    return jax.tree.map(visit, model, is_leaf=_is_eqx_bn)


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
    layers = [n for n in jax.tree.leaves(model, is_leaf=_is_eqx_bn) if _is_eqx_bn(n)]
    for bn in layers:
        if not isinstance(bn, _jaxbn_layer()):
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


_FOLDABLE = (eqx.nn.Linear, eqx.nn.Conv, eqx.nn.ConvTranspose)


def _fold_layer(layer: Any, bn: BatchNorm, state: eqx.nn.State) -> Any:
    mean, var = bn.inference_statistics(state)
    stats: State = {"mean": mean, "var": var}
    params = bn._params()
    w = layer.weight
    if isinstance(layer, eqx.nn.Linear):
        if layer.out_features == "scalar":
            raise ValueError("fold: a Linear with out_features='scalar' cannot be followed by "
                             "a BatchNorm (it gives no channel axis)")
        kernel, bias = fold_dense(w.T, layer.bias, params, stats, epsilon=bn.eps)
        return _rebuilt(layer, type(layer), weight=kernel.T, bias=bias, use_bias=True)
    out = w.shape[0]
    b = None if layer.bias is None else layer.bias.reshape(out)
    kernel, bias = fold_conv(jnp.moveaxis(w, 0, -1), b, params, stats, epsilon=bn.eps)
    return _rebuilt(layer, type(layer), weight=jnp.moveaxis(kernel, -1, 0),
                    bias=bias.reshape((out,) + (1,) * (w.ndim - 2)), use_bias=True)


def fold(model: Any, state: eqx.nn.State) -> Any:
    """Folds each BatchNorm that follows a Linear or Conv in an ``eqx.nn.Sequential``.

    For inference: every ``eqx.nn.Sequential`` in ``model`` (nested ones too) in which a
    :class:`BatchNorm` directly follows an ``eqx.nn.Linear``, ``eqx.nn.Conv*`` or
    ``eqx.nn.ConvTranspose*`` gets that layer with the folded weight and bias (from
    ``jaxbn.fold_dense`` / ``jaxbn.fold_conv``, with the statistics inference uses; a layer
    built with ``use_bias=False`` gains a bias) and ``eqx.nn.Identity()`` in place of the
    BatchNorm. The result, called in inference mode, computes what ``model`` computes there,
    with ``state`` still passed where the model takes one. Other BatchNorms are kept.
    ``model`` is not modified.

    Raises:
      TypeError: when such a pair holds an ``equinox.nn.BatchNorm`` (convert the model first
        with :func:`convert`).

    Example:
      >>> import jax, jax.numpy as jnp, equinox as eqx
      >>> import jaxbn.equinox
      >>> def make():
      ...     return eqx.nn.Sequential([eqx.nn.Linear(3, 2, key=jax.random.key(0)),
      ...                               jaxbn.equinox.BatchNorm(2, "batch", mode="batch")])
      >>> model, state = eqx.nn.make_with_state(make)()
      >>> x = jax.random.normal(jax.random.key(1), (8, 3))
      >>> _, state = jax.vmap(model, axis_name="batch", in_axes=(0, None),
      ...                     out_axes=(0, None))(x, state)
      >>> model = eqx.nn.inference_mode(model)
      >>> folded = jaxbn.equinox.fold(model, state)
      >>> type(folded.layers[1]).__name__
      'Identity'
      >>> y, _ = jax.vmap(model, in_axes=(0, None), out_axes=(0, None))(x, state)
      >>> y2, _ = jax.vmap(folded, in_axes=(0, None), out_axes=(0, None))(x, state)
      >>> bool(jnp.allclose(y, y2, atol=1e-5))
      True
    """
    def is_seq(node: Any) -> bool:
        return isinstance(node, eqx.nn.Sequential)

    def visit(node: Any) -> Any:
        return fold_sequential(node) if is_seq(node) else node

    def fold_sequential(seq: eqx.nn.Sequential) -> eqx.nn.Sequential:
        layers = [jax.tree.map(visit, layer, is_leaf=is_seq) for layer in seq.layers]
        for i in range(len(layers) - 1):
            layer, bn = layers[i], layers[i + 1]
            if not (isinstance(layer, _FOLDABLE) and _is_eqx_bn(bn)):
                continue
            if not isinstance(bn, _jaxbn_layer()):
                raise TypeError(f"fold: layer {i + 1} of a Sequential is an "
                                f"equinox.nn.BatchNorm; fold folds jaxbn.equinox.BatchNorm: "
                                f"convert the model first (model = jaxbn.equinox.convert("
                                f"model))")
            layers[i] = _fold_layer(layer, bn, state)
            layers[i + 1] = eqx.nn.Identity()
        return eqx.tree_at(lambda s: s.layers, seq, tuple(layers))

    visit_fn: Callable[[Any], Any] = visit
    return jax.tree.map(visit_fn, model, is_leaf=is_seq)
