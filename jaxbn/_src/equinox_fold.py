"""``jaxbn.equinox.fold``: each ``jaxbn.equinox.BatchNorm`` that follows a Linear or Conv in an
``eqx.nn.Sequential`` folded into that layer, for inference (the arithmetic is
``jaxbn.fold_dense`` / ``jaxbn.fold_conv``'s).

It needs Equinox: only ``jaxbn.equinox`` imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import equinox as eqx
import jax
import jax.numpy as jnp

from jaxbn import State, fold_conv, fold_dense
from jaxbn._src.equinox_convert import is_eqx_batchnorm, jaxbn_layer, rebuilt

if TYPE_CHECKING:
    from jaxbn.equinox import BatchNorm

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
        return rebuilt(layer, type(layer), weight=kernel.T, bias=bias, use_bias=True)
    out = w.shape[0]
    b = None if layer.bias is None else layer.bias.reshape(out)
    kernel, bias = fold_conv(jnp.moveaxis(w, 0, -1), b, params, stats, epsilon=bn.eps)
    return rebuilt(layer, type(layer), weight=jnp.moveaxis(kernel, -1, 0),
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
            if not (isinstance(layer, _FOLDABLE) and is_eqx_batchnorm(bn)):
                continue
            if not isinstance(bn, jaxbn_layer()):
                raise TypeError(f"fold: layer {i + 1} of a Sequential is an "
                                f"equinox.nn.BatchNorm; fold folds jaxbn.equinox.BatchNorm: "
                                f"convert the model first (model = jaxbn.equinox.convert("
                                f"model))")
            layers[i] = _fold_layer(layer, bn, state)
            layers[i + 1] = eqx.nn.Identity()
        return eqx.tree_at(lambda s: s.layers, seq, tuple(layers))

    visit_fn: Callable[[Any], Any] = visit
    return jax.tree.map(visit_fn, model, is_leaf=is_seq)
