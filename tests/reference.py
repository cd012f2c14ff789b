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


def sum_error_bound(abs_sum, n_terms, dtype=np.float32, ulps=1.0):
    """A bound on the rounding error of a floating-point sum, for tolerances.

    Summed in any order (XLA:CPU's order differs between CPUs), ``n_terms`` values whose
    magnitudes add up to ``abs_sum`` give an error of at most ``(n_terms - 1) * u * abs_sum``
    (Higham, Accuracy and Stability, eq. 4.4; ``u`` is half an ulp of 1 in ``dtype``), plus
    ``ulps`` units of ``u * abs_sum`` for the roundings around the sum (a cast, a product).
    Returns an absolute tolerance (elementwise when ``abs_sum`` is an array).
    """
    u = float(np.finfo(np.dtype(dtype)).eps) / 2 if np.dtype(dtype).kind == "f" else 2.0**-8
    return (max(n_terms - 1, 0) + ulps) * u * np.asarray(abs_sum, np.float64)


def assert_within(actual, desired, bound, what=""):
    """``|actual - desired| <= bound`` elementwise (``bound`` broadcasts), with a clear report."""
    actual = np.asarray(actual, np.float64)
    desired = np.asarray(desired, np.float64)
    err = np.abs(actual - desired)
    bound = np.broadcast_to(np.asarray(bound, np.float64), err.shape)
    bad = ~(err <= bound)
    if np.any(bad):
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} elements beyond the bound; worst "
            f"error {err[bad].max():.3g} (bound there {bound[bad].max():.3g})"
            f"\nactual {actual[bad][:5]}\ndesired {desired[bad][:5]}")
