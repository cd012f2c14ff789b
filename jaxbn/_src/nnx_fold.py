"""Folding a Flax NNX model's BatchNorm layers into the layers before them, for inference:
``jaxbn.nnx.fold`` (also ``jaxbn.fold.fold_nnx``), and ``jaxbn.nnx.Folded``, what a folded
BatchNorm leaves.

The arithmetic is ``jaxbn.fold_dense`` / ``jaxbn.fold_conv``'s; this module finds the named
pairs in the model's graph and puts the results in place. It needs Flax: only ``jaxbn.nnx``
imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import nnx
from flax.nnx import graphlib

from jaxbn import fold as folding
from jaxbn._src.types import Params, State


class Folded(nnx.Module):
    """What :func:`jaxbn.fold.fold_nnx` leaves where a BatchNorm was folded into the layer
    before it: the identity, for inference only.

    It accepts a BatchNorm's call (``use_running_average``, ``mask``) and raises if asked to
    train (``model.train()`` or ``use_running_average=False``): the running statistics it
    stood for are now in the layer's kernel and bias, and the batch statistics a training step
    needs are gone. Train the unfolded model instead.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxbn.nnx import Folded
      >>> Folded(2)(jnp.array([[1.0, 2.0]])).tolist()
      [[1.0, 2.0]]
    """

    def __init__(self, num_features: int):
        self.num_features = num_features
        self.use_running_average: bool | None = True

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view`` and ``model.train()``/``model.eval()``, as BatchNorm's.

        Args:
          use_running_average: the mode; False (training) makes the next call raise.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Returns ``x``; raises in training mode."""
        if use_running_average is None:
            use_running_average = self.use_running_average
        if not use_running_average:
            raise ValueError("this BatchNorm was folded into the layer before it "
                             "(jaxbn.fold.fold_nnx): the folded model computes inference only, "
                             "but it was called in training mode (model.train() or "
                             "use_running_average=False); train the unfolded model, and call "
                             "the folded one after model.eval()")
        return x


def _nnx_path(path: str | tuple, what: str) -> tuple:
    if isinstance(path, str):
        return tuple(path.split("/"))
    if isinstance(path, tuple) and path:
        return path
    raise TypeError(f"fold_nnx: a {what} path is a '/'-separated string or a non-empty tuple "
                    f"of keys, got {path!r}")


def _nnx_child(node: Any, key: Any) -> tuple[Any, Any]:
    """``(key as stored, child)`` of an NNX graph node; a digit string also finds an int key
    (``"blocks/0/conv"`` reaches ``blocks[0]`` of an ``nnx.List``)."""
    impl = graphlib.get_node_impl(node)
    children = impl.node_dict(node) if impl is not None else {}
    for k in (key, int(key) if isinstance(key, str) and key.isdigit() else None):
        if k is not None and k in children:
            return k, children[k]
    raise KeyError(key, sorted(str(k) for k in children if not str(k).startswith("_")))


def _nnx_get(root: Any, path: tuple, what: str) -> tuple[Any, Any, Any]:
    """``(parent, key, node)`` at ``path``; a KeyError names the missing step."""
    parent, key, node = None, None, root
    for i, step in enumerate(path):
        try:
            key, child = _nnx_child(node, step)
        except KeyError as e:
            where = "/".join(map(str, path[:i])) or "the top level"
            raise KeyError(f"fold_nnx: {what} path {'/'.join(map(str, path))!r} not found: no "
                           f"{step!r} under {where} (available there: {e.args[1]})") from None
        parent, node = node, child
    return parent, key, node


def _nnx_references(root: Any) -> dict[int, list[tuple]]:
    """Every path at which each graph node of ``root`` is referenced."""
    paths: dict[int, list[tuple]] = {}
    stack: list[tuple[tuple, Any]] = [((), root)]
    while stack:
        path, node = stack.pop()
        impl = graphlib.get_node_impl(node)
        if impl is None:
            continue
        seen = id(node) in paths
        paths.setdefault(id(node), []).append(path)
        if not seen:
            stack.extend(((*path, k), c) for k, c in impl.node_dict(node).items())
    return paths


def fold(model: Any, pairs: Mapping[Any, Any]) -> Any:
    """Folds named (``nnx.Linear``/``nnx.Conv``, BatchNorm) pairs for inference: the NNX name
    of :func:`jaxbn.fold.fold_nnx` (next to :func:`convert`, as ``jaxbn.equinox.fold``),
    which documents ``pairs``, the result and the errors.

    Returns a folded copy of ``model`` in eval mode; ``model`` is left as it was.

    Example:
      >>> import jax.numpy as jnp, jaxbn
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Conv(1, 2, (3, 3), rngs=nnx.Rngs(0)),
      ...                        nnx.BatchNorm(2, rngs=nnx.Rngs(0)))
      >>> model.eval()
      >>> folded = jaxbn.nnx.fold(model, {"layers/0": "layers/1"})
      >>> x = jnp.ones((1, 4, 4, 1))
      >>> bool(jnp.allclose(folded(x), model(x), atol=1e-6))
      True
    """
    if not isinstance(pairs, Mapping) or not pairs:
        raise TypeError(f"fold_nnx needs pairs, a non-empty mapping from each Linear/Conv path "
                        f"to the path of the BatchNorm after it, got {pairs!r}")
    folded = nnx.clone(model)
    refs = _nnx_references(folded)
    todo, used = [], dict[int, str]()
    for layer_path, bn_path in pairs.items():
        lp, bp = _nnx_path(layer_path, "layer"), _nnx_path(bn_path, "BatchNorm")
        layer = _nnx_get(folded, lp, "layer")[2]
        parent, key, bn = _nnx_get(folded, bp, "BatchNorm")
        names = "/".join(map(str, lp)), "/".join(map(str, bp))
        if not isinstance(layer, nnx.Linear | nnx.Conv):
            raise TypeError(f"fold_nnx folds into nnx.Linear and nnx.Conv layers; {names[0]!r} "
                            f"is a {type(layer).__module__}.{type(layer).__qualname__}")
        if isinstance(bn, Folded):
            raise TypeError(f"fold_nnx: {names[1]!r} is already folded")
        if not isinstance(bn, nnx.BatchNorm):
            raise TypeError(f"fold_nnx: {names[1]!r} should be a BatchNorm (flax.nnx or "
                            f"jaxbn.nnx), got a {type(bn).__module__}.{type(bn).__qualname__}")
        if bn.axis not in (-1, (-1,)):
            raise ValueError(f"fold_nnx: the BatchNorm at {names[1]!r} normalizes axis "
                             f"{bn.axis!r}; folding needs the last axis (-1), where "
                             f"{type(layer).__name__} puts its output features")
        for obj, name in ((layer, names[0]), (bn, names[1])):
            if id(obj) in used:
                raise ValueError(f"fold_nnx: {name!r} is in two pairs (also as "
                                 f"{used[id(obj)]!r}); each layer and BatchNorm folds once")
            used[id(obj)] = name
            where = refs[id(obj)]
            if len(where) > 1:
                raise ValueError(f"fold_nnx: {name!r} is referenced from "
                                 f"{len(where)} places in the model "
                                 f"({sorted('/'.join(map(str, p)) for p in where)}); folding "
                                 f"it would change its other uses")
        impl = graphlib.get_node_impl(parent)
        if impl is None or impl.set_key is None:
            raise TypeError(f"fold_nnx: the BatchNorm at {names[1]!r} is held in a "
                            f"{type(parent).__name__}, which cannot be changed in place (hold "
                            f"it in a module attribute, an nnx.List/nnx.Dict, a list or a dict)")
        todo.append((layer, bn, impl.set_key, parent, key))
    for layer, bn, set_key, parent, key in todo:
        params: Params = {}
        if bn.scale is not None:
            params["scale"] = bn.scale[...]
        if bn.bias is not None:
            params["bias"] = bn.bias[...]
        state: State = {"mean": bn.mean[...], "var": bn.var[...]}
        bias = layer.bias[...] if layer.bias is not None else None
        fold = folding.fold_conv if isinstance(layer, nnx.Conv) else folding.fold_dense
        kernel, new_bias = fold(layer.kernel[...], bias, params, state, epsilon=bn.epsilon)
        layer.kernel[...] = kernel
        if layer.bias is not None:
            layer.bias[...] = new_bias
        else:
            layer.bias = nnx.Param(new_bias)
            layer.use_bias = True
        set_key(parent, key, Folded(bn.num_features))
    folded.eval()
    return folded
