"""Float64 plain-``jnp`` BatchNorm from the papers' equations, differentiable in every JAX mode.

Independent of jaxbn (it shares no code with it) and written from:

* Ioffe & Szegedy 2015 (arXiv:1502.03167), Alg. 1: ``y = scale * (x - mean) / sqrt(var + eps)
  + bias`` with the batch's mean and biased variance per feature (every axis but the last is
  reduced). A mask enters as weights: only weighted elements count toward the statistics,
  every element is normalized.
* Ioffe 2017 (Batch Renormalization, arXiv:1702.03275): ``y = scale * ((x - mean) / sigma_B * r
  + d) + bias`` with ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and ``d = clip((mean - mu) /
  sigma, -d_max, d_max)``, both ``stop_gradient``-ed; ``mu``, ``sigma`` are the running ones
  (``sigma = sqrt(running_var + eps)``).
* Ghost batches (Hoffer et al. 2017): consecutive groups of ``virtual_batch_size`` rows along
  axis 0 are normalized with their own statistics; the running update uses the average of the
  groups' means and of their variances.
* Running statistics: Flax's convention ``new = momentum * old + (1 - momentum) * batch``;
  ``momentum=None`` is the plain average of all batch statistics (``state["count"]`` earlier
  updates); a state holding ``seen`` (precise statistics) becomes the exact mean and variance of
  everything seen so far plus this batch (the pooled population formula). Updates carry no
  gradient. A batch with no weighted element leaves the statistics unchanged.

Everything is ``jax.numpy`` so JAX can differentiate it in forward and reverse mode to any
order. Call it inside ``with jax.enable_x64(True):`` (see :func:`in_float64`), so the whole
computation runs in float64 without flipping x64 globally.

Example:
  >>> import numpy as np
  >>> params = {"scale": np.ones(1), "bias": np.zeros(1)}
  >>> state = {"mean": np.zeros(1), "var": np.ones(1), "count": np.zeros((), np.int32)}
  >>> x = np.array([[0.0], [2.0], [4.0]])
  >>> y, new = in_float64(bn_train)(params, state, x, momentum=0.5)
  >>> np.round(y[:, 0], 3).tolist(), new["mean"].tolist(), y.dtype
  ([-1.225, 0.0, 1.225], [1.0], dtype('float64'))
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

f64 = jnp.float64


def _as64(tree: Any) -> Any:
    """Floating leaves to float64 JAX arrays, others (ints, bools) as JAX arrays."""
    def conv(a):
        a = np.asarray(a)
        return jnp.asarray(a, f64) if np.issubdtype(a.dtype, np.floating) else jnp.asarray(a)
    return jax.tree.map(conv, tree)


def in_float64(fn: Callable) -> Callable:
    """Runs ``fn`` under a local ``jax.enable_x64(True)`` with float leaves cast to float64.

    Positional and keyword array arguments are converted; results come back as NumPy arrays.
    The reference is plain NumPy-style code: it may broadcast by rank (CI runs jaxbn with
    ``JAX_NUMPY_RANK_PROMOTION=raise``, which is jaxbn's contract, not the reference's).
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with jax.enable_x64(True), jax.numpy_rank_promotion("allow"):
            args = tuple(None if a is None else _as64(a) for a in args)
            kwargs = {k: v if k not in ("mask", "renorm") or v is None else _as64(v)
                      for k, v in kwargs.items()}
            out = fn(*args, **kwargs)
            return jax.tree.map(np.asarray, out)
    return wrapper


def _moments(x, w, axes):
    """Weighted mean, biased variance and weight total over ``axes`` (kept as size 1)."""
    n = jnp.sum(w, axis=axes, keepdims=True)
    nn = jnp.maximum(n, 1.0)
    mean = jnp.sum(w * x, axis=axes, keepdims=True) / nn
    var = jnp.sum(w * jnp.square(x - mean), axis=axes, keepdims=True) / nn
    return mean, var, n


def batch_stats(x, mask=None, virtual_batch_size=None, pooled=False):
    """The statistics a training step feeds the running update: ``(mean, var, n)`` per feature.

    Ghost batches give the average of the groups' means and of their variances, unless
    ``pooled`` (precise statistics want the whole batch's). ``n`` is the weighted count.
    """
    x = jnp.asarray(x, f64)
    w = _weights(x, mask)
    feat = x.shape[-1:]
    if virtual_batch_size is None or pooled:
        mean, var, n = _moments(x, w, tuple(range(x.ndim - 1)))
        return mean.reshape(feat), var.reshape(feat), n.reshape(feat)
    xg, wg = _groups(x, w, virtual_batch_size)
    mean, var, n = _moments(xg, wg, tuple(range(1, xg.ndim - 1)))
    return (mean.reshape((-1,) + feat).mean(0), var.reshape((-1,) + feat).mean(0),
            n.reshape((-1,) + feat).sum(0))


def _weights(x, mask):
    if mask is None:
        return jnp.ones_like(x)
    return jnp.broadcast_to(jnp.asarray(mask), x.shape).astype(f64)


def _groups(x, w, size):
    shape = (x.shape[0] // size, size) + x.shape[1:]
    return x.reshape(shape), w.reshape(shape)


def normalize(params, state, x, *, epsilon=1e-5, mask=None, renorm=None,
              virtual_batch_size=None):
    """Training-mode output ``y`` (float64), from this batch's (or each ghost batch's) stats."""
    x = jnp.asarray(x, f64)
    w = _weights(x, mask)
    size = x.shape[0] if virtual_batch_size is None else virtual_batch_size
    xg, wg = _groups(x, w, size)
    mean, var, _ = _moments(xg, wg, tuple(range(1, xg.ndim - 1)))
    sigma_b = jnp.sqrt(var + epsilon)
    xhat = (xg - mean) / sigma_b
    if renorm is not None:
        r_max, d_max = renorm
        sigma = jnp.sqrt(jnp.asarray(state["var"], f64) + epsilon)
        r = jax.lax.stop_gradient(jnp.clip(sigma_b / sigma, 1.0 / r_max, r_max))
        d = jax.lax.stop_gradient(jnp.clip((mean - state["mean"]) / sigma, -d_max, d_max))
        xhat = xhat * r + d
    if "scale" in params:
        xhat = xhat * params["scale"]
    if "bias" in params:
        xhat = xhat + params["bias"]
    return xhat.reshape(x.shape)


def update(state, mean, var, n, momentum):
    """The running update given this batch's statistics (no gradient flows into it)."""
    mean, var, n = (jax.lax.stop_gradient(v) for v in (mean, var, n))
    old_m, old_v = state["mean"], state["var"]
    new = dict(state)
    if "seen" in state:  # precise: exact statistics of everything seen so far
        seen = state["seen"]
        total = seen + n
        tt = jnp.maximum(total, 1.0)
        m = (seen * old_m + n * mean) / tt
        v = (seen * (old_v + jnp.square(old_m - m)) + n * (var + jnp.square(mean - m))) / tt
        new["seen"] = total
    elif momentum is None:  # plain average of all batch statistics
        k = state["count"].astype(f64)
        m = (k * old_m + mean) / (k + 1)
        v = (k * old_v + var) / (k + 1)
    else:
        m = momentum * old_m + (1 - momentum) * mean
        v = momentum * old_v + (1 - momentum) * var
    ok = n > 0
    new["mean"], new["var"] = jnp.where(ok, m, old_m), jnp.where(ok, v, old_v)
    if "count" in state:
        new["count"] = state["count"] + jnp.any(ok).astype(state["count"].dtype)
    return new


def bn_train(params, state, x, *, momentum=0.99, epsilon=1e-5, mask=None, renorm=None,
             virtual_batch_size=None):
    """One training step: ``(y, new_state)``, all float64; same options as ``jaxbn.bn_apply``."""
    y = normalize(params, state, x, epsilon=epsilon, mask=mask, renorm=renorm,
                  virtual_batch_size=virtual_batch_size)
    mean, var, n = batch_stats(x, mask, virtual_batch_size, pooled="seen" in state)
    return y, update(state, mean, var, n, momentum)
