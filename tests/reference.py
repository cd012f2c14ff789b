"""Independent float64 NumPy reference for Batch Normalization (forward and closed-form grads).

Written from the paper's equations (Ioffe & Szegedy 2015, Alg. 1) with masks as weights; it
shares no code with jaxbn.
"""

import numpy as np


def _axes(ndim, axis):
    feats = (axis,) if isinstance(axis, int) else tuple(axis)
    feats = tuple(sorted(a % ndim for a in feats))
    return feats, tuple(a for a in range(ndim) if a not in feats)


def _bshape(shape, feats):
    return tuple(shape[a] if a in feats else 1 for a in range(len(shape)))


def batch_stats(x, axis=-1, mask=None):
    """Mean, biased variance and count per feature, in float64, over the masked elements."""
    x = np.asarray(x, np.float64)
    feats, red = _axes(x.ndim, axis)
    w = np.ones_like(x) if mask is None else np.broadcast_to(np.asarray(mask), x.shape).astype(
        np.float64)
    n = w.sum(axis=red, keepdims=True)
    mean = (w * x).sum(axis=red, keepdims=True) / np.maximum(n, 1)
    var = (w * (x - mean) ** 2).sum(axis=red, keepdims=True) / np.maximum(n, 1)
    return mean, var, n


def bn_forward(x, scale, bias, axis=-1, mask=None, eps=1e-5):
    """Training-mode output in float64."""
    x = np.asarray(x, np.float64)
    feats, _ = _axes(x.ndim, axis)
    b = _bshape(x.shape, feats)
    mean, var, _ = batch_stats(x, axis, mask)
    y = (x - mean) / np.sqrt(var + eps)
    if scale is not None:
        y = y * np.asarray(scale, np.float64).reshape(b)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape(b)
    return y


def bn_eval(x, scale, bias, mean, var, axis=-1, eps=1e-5):
    x = np.asarray(x, np.float64)
    feats, _ = _axes(x.ndim, axis)
    b = _bshape(x.shape, feats)
    y = (x - np.asarray(mean, np.float64).reshape(b)) / np.sqrt(
        np.asarray(var, np.float64).reshape(b) + eps)
    if scale is not None:
        y = y * np.asarray(scale, np.float64).reshape(b)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape(b)
    return y


def bn_grads(x, scale, dy, axis=-1, mask=None, eps=1e-5):
    """Closed-form gradients (dx, dscale, dbias) of sum(dy * y) in float64.

    With weights w (the mask) and N = sum(w): every output depends on the batch mean and
    variance, but only weighted elements enter them, so
      dx = s / sigma * (dy - w * mean(dy) - w * xhat * mean(dy * xhat)),  means over all dy / N.
    """
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    feats, red = _axes(x.ndim, axis)
    b = _bshape(x.shape, feats)
    w = np.ones_like(x) if mask is None else np.broadcast_to(np.asarray(mask), x.shape).astype(
        np.float64)
    mean, var, n = batch_stats(x, axis, mask)
    sigma = np.sqrt(var + eps)
    xhat = (x - mean) / sigma
    s = np.ones(b) if scale is None else np.asarray(scale, np.float64).reshape(b)
    sum_dy = dy.sum(axis=red, keepdims=True)
    sum_dy_xhat = (dy * xhat).sum(axis=red, keepdims=True)
    dx = s / sigma * (dy - w * sum_dy / n - w * xhat * sum_dy_xhat / n)
    fshape = tuple(x.shape[a] for a in feats)
    return dx, sum_dy_xhat.reshape(fshape), sum_dy.reshape(fshape)


def ema(old, batch, momentum):
    return momentum * np.asarray(old, np.float64) + (1 - momentum) * np.asarray(batch, np.float64)
