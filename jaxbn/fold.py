"""Folding BatchNorm into the preceding Dense or Conv layer for inference.

In eval mode BN is an affine map per feature, ``y = (z - mean) * a + bias`` with
``a = scale / sqrt(var + eps)``; when ``z = x @ kernel + b`` (or a convolution), the pair equals
one layer with ``kernel * a`` and ``(b - mean) * a + bias``. Kernels hold their output
features on the last axis (Flax's Dense ``(in, out)`` and Conv ``HWIO``).

Example:
  >>> import jax.numpy as jnp, jaxbn
  >>> params, state = jaxbn.bn_init(2)
  >>> state = dict(state, mean=jnp.array([1.0, 2.0]), var=jnp.array([4.0, 16.0]))
  >>> k, b = jaxbn.fold_dense(jnp.eye(2), None, params, state, epsilon=0.0)
  >>> k.tolist(), b.tolist()
  ([[0.5, 0.0], [0.0, 0.25]], [-0.5, -0.5])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn._src.types import Params, State


def _fold(kernel, bias, params, state, epsilon):
    feats = kernel.shape[-1]
    if tuple(state["mean"].shape) != (feats,):
        raise ValueError(f"the BatchNorm has features {tuple(state['mean'].shape)} but the "
                         f"kernel's last (output) axis has {feats}")
    dt = jnp.promote_types(kernel.dtype, jnp.float32)
    a = lax.rsqrt(state["var"].astype(dt) + epsilon)
    if "scale" in params:
        a = a * params["scale"].astype(dt)
    b = jnp.zeros((feats,), dt) if bias is None else bias.astype(dt)
    new_bias = (b - state["mean"].astype(dt)) * a
    if "bias" in params:
        new_bias = new_bias + params["bias"].astype(dt)
    out_bias_dtype = kernel.dtype if bias is None else bias.dtype
    a_kernel = a.reshape((1,) * (kernel.ndim - 1) + (feats,))  # explicit: no rank promotion
    return (kernel.astype(dt) * a_kernel).astype(kernel.dtype), new_bias.astype(out_bias_dtype)


def fold_dense(kernel: jax.Array, bias: jax.Array | None, params: Params, state: State,
               epsilon: float = 1e-5) -> tuple[jax.Array, jax.Array]:
    """Returns ``(kernel, bias)`` of one Dense layer equal to Dense followed by eval-mode BN.

    Raises:
      ValueError: the statistics' shape is not ``(kernel.shape[-1],)``.
    """
    return _fold(kernel, bias, params, state, epsilon)


def fold_conv(kernel: jax.Array, bias: jax.Array | None, params: Params, state: State,
              epsilon: float = 1e-5) -> tuple[jax.Array, jax.Array]:
    """Returns ``(kernel, bias)`` of one convolution (HWIO kernel) equal to Conv then eval BN.

    Raises:
      ValueError: ``kernel`` has fewer than 3 axes, or the statistics' shape is not
        ``(kernel.shape[-1],)``.
    """
    if kernel.ndim < 3:
        raise ValueError(f"a convolution kernel has at least 3 axes (..., in, out), got shape "
                         f"{kernel.shape}; use fold_dense for Dense layers")
    return _fold(kernel, bias, params, state, epsilon)


def _get(tree, path: str, what: str):
    """``tree[k1][k2]...`` for ``path = "k1/k2/..."``; a KeyError names the missing step."""
    node, done = tree, list[str]()
    for key in path.split("/"):
        if not isinstance(node, Mapping) or key not in node:
            where = "/".join(done) or "the top level"
            avail = sorted(map(str, node)) if isinstance(node, Mapping) else []
            raise KeyError(f"fold_linen: {what} path {path!r} not found: no {key!r} under "
                           f"{where} (available keys there: {avail})")
        node = node[key]
        done.append(key)
    return node


def _set(tree, path, value):
    keys = path.split("/")
    out = dict(tree)
    node = out
    for key in keys[:-1]:
        node[key] = dict(node[key])
        node = node[key]
    node[keys[-1]] = value
    return out


def fold_linen(variables: Mapping, pairs: Mapping[str, str], epsilon: float = 1e-5, *,
               add_bias: bool = False) -> dict:
    """Folds named (Dense or Conv, BatchNorm) pairs of a Flax linen variable tree.

    ``pairs`` maps the path of each Dense/Conv module to the path of the BatchNorm that
    follows it (``"/"``-separated, as under ``variables["params"]``), e.g.
    ``{"Conv_0": "BatchNorm_0", "block/Dense_1": "block/BatchNorm_1"}``. Returns new variables
    for the SAME model (the input is not modified), which computes what it computed before:

    - each layer gets the folded kernel; a layer with a bias gets the folded bias, and its
      BatchNorm becomes an exact identity in eval mode (mean 0, var 1, scale
      ``sqrt(1 + eps)`` or no scale, bias 0);
    - a layer without a bias (``use_bias=False``) cannot hold one, so the folded shift stays
      in its BatchNorm, which becomes an exact per-feature addition (mean ``-shift``, var 1,
      scale ``sqrt(1 + eps)`` or no scale, bias 0);
    - with ``add_bias=True`` such a layer gets a new ``bias`` holding the shift and its
      BatchNorm becomes an identity, for a model REBUILT with ``use_bias=True`` on those layers
      (Flax would silently ignore the extra bias in the original model, hence not the default).

    Raises:
      KeyError: ``variables`` has no ``params`` or ``batch_stats``, a path is not in the tree
        (the error names the missing key and the keys available there), or a layer has no
        ``kernel``.
      ValueError: a BatchNorm's features differ from its layer's outputs.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxbn
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return jaxbn.linen.BatchNorm(use_running_average=True)(nn.Dense(3)(x))
      >>> x = jnp.ones((2, 4))
      >>> v = Net().init(jax.random.key(0), x)
      >>> folded = jaxbn.fold_linen(v, {"Dense_0": "BatchNorm_0"})
      >>> bool(jnp.allclose(Net().apply(v, x), Net().apply(folded, x), atol=1e-5))
      True
    """
    for key in ("params", "batch_stats"):
        if not isinstance(variables, Mapping) or key not in variables:
            given = sorted(variables) if isinstance(variables, Mapping) else type(variables)
            raise KeyError(f"fold_linen needs the model's variables with 'params' and "
                           f"'batch_stats' collections, got {given}")
    params = variables["params"]
    stats = variables["batch_stats"]
    for layer, bn in pairs.items():
        lp = _get(params, layer, "layer")
        bp = _get(params, bn, "BatchNorm params")
        bs = _get(stats, bn, "BatchNorm batch_stats")
        if "kernel" not in lp:
            raise KeyError(f"fold_linen: {layer!r} has no 'kernel' (keys: {sorted(lp)}); it "
                           f"must be a Dense or Conv layer")
        kernel, bias = _fold(lp["kernel"], lp.get("bias"), bp, bs, epsilon)
        has_bias = "bias" in lp or add_bias
        params = _set(params, layer, dict(lp, kernel=kernel, **({"bias": bias} if has_bias
                                                                else {})))
        new_bp = {}
        if "scale" in bp:
            new_bp["scale"] = jnp.full_like(bp["scale"], jnp.sqrt(1.0 + epsilon))
        if "bias" in bp:
            new_bp["bias"] = jnp.zeros_like(bp["bias"])
        params = _set(params, bn, new_bp)
        var_value = 1.0 if "scale" in bp else 1.0 - epsilon
        mean = (jnp.zeros_like(bs["mean"]) if has_bias
                else (-bias.astype(jnp.promote_types(bias.dtype, bs["mean"].dtype))))
        stats = _set(stats, bn, dict(bs, mean=mean, var=jnp.full_like(bs["var"], var_value)))
    return {**variables, "params": params, "batch_stats": stats}


def fold_nnx(model: Any, pairs: Mapping[str | tuple, str | tuple]) -> Any:
    """Folds named (Linear or Conv, BatchNorm) pairs of a Flax NNX model, for inference.

    ``pairs`` maps the path of each ``nnx.Linear``/``nnx.Conv`` to the path of the BatchNorm
    (``flax.nnx.BatchNorm`` or ``jaxbn.nnx.BatchNorm``) that follows it: ``"/"``-separated
    attribute names and indices, as in ``nnx.state(model)`` (``{"stem_conv": "stem_bn",
    "blocks/0/conv1": "blocks/0/bn1"}``), or tuples of keys. Returns a new model in eval mode
    (``model`` itself is not modified) in which

    - each layer's kernel and bias are those of :func:`fold_dense` / :func:`fold_conv` (with
      the BatchNorm's own ``epsilon``); a layer without a bias gets a new ``nnx.Param`` bias
      (and ``use_bias=True``);
    - each folded BatchNorm is replaced by ``jaxbn.nnx.Folded``, the identity, which raises if
      the model is called in training mode.

    The model's code runs unchanged. Errors: a path that is not in the model (KeyError naming
    the missing step and what is there), a layer that is not an ``nnx.Linear``/``nnx.Conv`` or
    a BatchNorm that is not one (TypeError), a BatchNorm whose feature axis is not the last
    (ValueError; folding needs the layer's output features), feature counts that differ
    (ValueError), a layer or BatchNorm used in two pairs, or referenced from two places in the
    model (ValueError: folding it would change the other use).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxbn.fold import fold_nnx
      >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
      ...                        nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
      >>> model.eval()
      >>> folded = fold_nnx(model, {"layers/0": "layers/1"})
      >>> type(folded.layers[1]).__name__
      'Folded'
      >>> x = jnp.ones((4, 2))
      >>> bool(jnp.allclose(folded(x), model(x), atol=1e-6))
      True
    """
    from jaxbn import nnx as jaxbn_nnx  # here: it needs Flax, which `import jaxbn` does not load

    return jaxbn_nnx.fold(model, pairs)
