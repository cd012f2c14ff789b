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


# ---------------------------------------------------------------------------------------------
# Error bounds of BatchNorm computed in float32 (or another dtype), for tolerances.
#
# Each bound is first order in u (terms in u**2 are dropped where they multiply the result,
# kept where a cancellation makes them the leading term) and holds for ANY summation order
# (Higham's (n - 1) u sum|terms| per reduction), with or without fused multiply-adds: what
# XLA:CPU does differs between CPUs. The magnitudes are computed here, in float64, from the data.
# "stable=True" is the corrected two-pass algorithm that DESIGN.md requires (the mean carried as
# a provisional mean m0 plus a correction, deviations taken about m0: the error scales with the
# spread of x, not with its mean); "stable=False" is the plain two-pass one (Flax's
# use_fast_variance=False: a float32 mean, deviations about that rounded mean); "fast" is the
# one-pass E[x**2] - E[x]**2 (Flax's default, use_fast_variance=True), whose variance error scales
# with the mean squared.

RSQRT_ULPS = 4  # sqrt, rsqrt and division: XLA:CPU may use approximations good to a few ulps


def unit_roundoff(dtype) -> float:
    """Half an ulp of 1 in ``dtype`` (2**-24 for float32 and complex64, 2**-8 for bfloat16)."""
    dt = np.dtype(dtype)
    if dt.kind in "fc":
        return float(np.finfo(dt).eps) / 2
    import ml_dtypes  # bfloat16 and the other ml_dtypes floats (JAX depends on ml_dtypes)

    return float(ml_dtypes.finfo(dt).eps) / 2


def _weights(x, mask):
    return np.ones(np.shape(x)) if mask is None else np.broadcast_to(
        np.asarray(mask), np.shape(x)).astype(np.float64)


def _float(x):
    """``x`` in float64 (complex128 if complex)."""
    x = np.asarray(x)
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def _unit(x, dtype):
    """Unit roundoff for arithmetic on ``x``: complex products and sums round both parts, so
    their error in modulus is at most 3 u times the magnitudes (Higham, Lemma 3.5)."""
    return unit_roundoff(dtype) * (3 if np.iscomplexobj(x) else 1)


def moments_bound(x, axis=-1, mask=None, dtype=np.float32, stable=True):
    """Batch moments with bounds on their rounding errors, per feature (keepdims shape).

    Returns a dict: ``mean``, ``var`` (biased), ``n`` (float64 reference values) and
    ``e_mean``, ``e_var``: bounds on the error of the mean as used to normalize and of the
    variance, when computed in ``dtype`` by the stable (or plain) two-pass algorithm, and
    ``e_mean_stored`` / ``e_var_stored``: the same once rounded to ``dtype`` (what a state
    holds). ``delta`` bounds the error of a plain float32 mean (the first pass).

    With ``N`` valid values, ``D1 = sum|x - mean|``, ``D2 = sum (x - mean)**2``, ``A1 =
    sum|x|``: the first pass is off by ``delta = (N + 3) u A1 / N`` (sum, division, rounding);
    the stable mean, from ``d = x - m0`` (each rounded) summed, by ``(N + 2) u (D1 / N +
    delta)`` (the plain one by ``delta``); the variance by ``(N + 4) u (D2 / N + delta**2)``
    (deviations, squares, sum, division) plus ``2 (D1 / N + delta) e_mean``: the first-order
    effect of the mean's error on the deviations (which does not cancel once the sums are
    pooled across devices or batches), plus, for the plain algorithm, ``delta**2``: deviations
    about a rounded mean add its squared error (the stable one subtracts it: ``M2 = sum d**2 -
    sum(d) * corr``). ``stable="fast"``: ``E[x**2] - E[x]**2``, off by ``(N + 4) u (D2 / N +
    mean**2) + 2 |mean| delta + delta**2``.
    """
    x = _float(x)
    feats, red = _axes(x.ndim, axis)
    w = _weights(x, mask)
    x = np.where(w > 0, x, 0)  # padding may hold anything (NaN): it takes no part
    n = w.sum(axis=red, keepdims=True)
    nn = np.maximum(n, 1)
    mean = (w * x).sum(axis=red, keepdims=True) / nn
    var = (w * np.abs(x - mean) ** 2).sum(axis=red, keepdims=True) / nn
    u = _unit(x, dtype)
    a1 = (w * np.abs(x)).sum(axis=red, keepdims=True) / nn
    d1 = (w * np.abs(x - mean)).sum(axis=red, keepdims=True) / nn
    d2 = var
    delta = (nn + 3) * u * a1
    if stable == "fast":
        e_mean = delta
        e_var = (nn + 4) * u * (d2 + np.abs(mean) ** 2) + 2 * np.abs(mean) * delta + delta ** 2
    elif stable:
        e_mean = (nn + 2) * u * (d1 + delta)
        e_var = (nn + 4) * u * (d2 + delta ** 2) + 2 * (d1 + delta) * e_mean
    else:
        e_mean = delta
        e_var = (nn + 4) * u * (d2 + delta ** 2) + 2 * (d1 + delta) * e_mean + delta ** 2
    return {"mean": mean, "var": var, "n": n, "delta": delta, "e_mean": e_mean, "e_var": e_var,
            "e_mean_stored": e_mean + u * np.abs(mean), "e_var_stored": e_var + u * var}


def _affine_magnitudes(x, scale, bias, feats):
    b = _bshape(x.shape, feats)
    s = np.ones(b) if scale is None else np.abs(np.asarray(scale, np.float64)).reshape(b)
    c = np.zeros(b) if bias is None else np.abs(np.asarray(bias, np.float64)).reshape(b)
    return s, c


def _rounded_to(out_dtype, bound, value, dtype):
    """``bound`` on a ``dtype`` value, plus the final rounding of ``value`` to ``out_dtype``."""
    if out_dtype is None:
        return bound
    u_out = unit_roundoff(out_dtype)
    if u_out <= unit_roundoff(dtype):
        return bound
    return bound * (1 + u_out) + u_out * np.abs(value)


def bn_forward_bound(x, scale, bias, axis=-1, mask=None, eps=1e-5, dtype=np.float32,
                     out_dtype=None, stable=True):
    """Elementwise bound on the error of a training-mode output computed in ``dtype``.

    ``y = scale * (x - mean) * rsqrt(var + eps) + bias``: the mean's error divided by sigma,
    plus ``|xhat|`` times the relative error of ``rsqrt`` (half the variance's relative error
    plus a few ulps), plus the roundings of the deviation, the products and the bias, all
    times ``|scale|``. ``out_dtype`` (e.g. bfloat16) adds the final rounding of ``y``.
    Complex input: the same with moduli (and complex roundings, see ``_unit``).
    """
    x = _float(x)
    feats, _ = _axes(x.ndim, axis)
    mo = moments_bound(x, axis, mask, dtype, stable)
    u = _unit(x, dtype)
    sig2 = mo["var"] + eps
    sigma = np.sqrt(sig2)
    e_inv = mo["e_var"] / (2 * sig2) + (RSQRT_ULPS + 1) * u
    s, c = _affine_magnitudes(x, scale, bias, feats)
    dev = np.abs(x - mo["mean"])
    xhat = dev / sigma
    bound = s * ((mo["e_mean"] + 2 * u * (dev + mo["delta"])) / sigma
                 + xhat * (e_inv + 2 * u)) + 2 * u * (s * xhat + c)
    return _rounded_to(out_dtype, bound, s * xhat + c, dtype)


def bn_eval_bound(x, scale, bias, mean, var, axis=-1, eps=1e-5, dtype=np.float32,
                  out_dtype=None):
    """Elementwise bound on an inference-mode output ``scale * (x - mean) / sigma + bias``.

    The running statistics are given (exact): the deviation's rounding (or, folded as
    ``x * a + c``, the roundings of ``x * a`` and ``mean * a``), a few ulps of ``rsqrt`` and
    the products and bias, times ``|scale|``.
    """
    x = _float(x)
    feats, _ = _axes(x.ndim, axis)
    b = _bshape(x.shape, feats)
    mean = _float(mean).reshape(b)
    sigma = np.sqrt(np.asarray(var, np.float64).reshape(b) + eps)
    u = _unit(x, dtype)
    s, c = _affine_magnitudes(x, scale, bias, feats)
    xhat = np.abs(x - mean) / sigma
    bound = (s * (2 * u * (np.abs(x) + np.abs(mean)) / sigma + xhat * (RSQRT_ULPS + 4) * u)
             + 2 * u * (s * xhat + c))
    return _rounded_to(out_dtype, bound, s * xhat + c, dtype)


def bn_grads_bound(x, scale, dy, axis=-1, mask=None, eps=1e-5, dtype=np.float32,
                   out_dtype=None, stable=True):
    """Bounds on the errors of ``(dx, dscale, dbias)`` of ``sum(dy * y)`` (see bn_grads).

    ``G1 = sum(dy)`` and ``G2 = sum(dy * xhat)`` over every element of a feature carry their
    summation bounds, ``G2`` also ``sum|dy|`` times the error of ``xhat``; ``dx = scale / sigma *
    (dy - w G1 / N - w xhat G2 / N)`` carries those divided by ``N``, a few ulps of each term,
    and the relative error of ``1 / sigma``. ``dscale``, ``dbias`` come back in feature shape.
    Complex input (a real loss of complex outputs, ``dy`` the cotangent): the same form, with
    moduli and complex roundings.
    """
    x = _float(x)
    dy = _float(dy)
    feats, red = _axes(x.ndim, axis)
    fshape = tuple(x.shape[a] for a in feats)
    w = _weights(x, mask)
    mo = moments_bound(x, axis, mask, dtype, stable)
    u = _unit(x + dy, dtype)
    sig2 = mo["var"] + eps
    sigma = np.sqrt(sig2)
    e_inv = mo["e_var"] / (2 * sig2) + (RSQRT_ULPS + 1) * u
    s, _ = _affine_magnitudes(x, scale, None, feats)
    n = np.maximum(mo["n"], 1)
    terms = int(np.prod([x.shape[a] for a in red]))
    xhat = (x - mo["mean"]) / sigma
    e_xhat = ((mo["e_mean"] + 2 * u * (np.abs(x - mo["mean"]) + mo["delta"])) / sigma
              + np.abs(xhat) * (e_inv + u))
    g1 = dy.sum(axis=red, keepdims=True)
    g2 = (dy * xhat).sum(axis=red, keepdims=True)
    e_g1 = (terms + 1) * u * np.abs(dy).sum(axis=red, keepdims=True)
    e_g2 = ((terms + 2) * u * np.abs(dy * xhat).sum(axis=red, keepdims=True)
            + (np.abs(dy) * e_xhat).sum(axis=red, keepdims=True))
    mult = s / sigma
    size = mult * (np.abs(dy) + w * (np.abs(g1) + np.abs(xhat * g2)) / n)  # >= |dx|
    inner = w * (e_g1 / n + np.abs(xhat) * e_g2 / n + e_xhat * np.abs(g2) / n
                 + 4 * u * (np.abs(g1) / n + np.abs(xhat * g2) / n)) + 4 * u * np.abs(dy)
    e_dx = _rounded_to(out_dtype, mult * inner + size * (e_inv + 2 * u), size, dtype)
    return (e_dx, (e_g2 + u * np.abs(g2)).reshape(fshape), (e_g1 + u * np.abs(g1)).reshape(fshape))


def ema_bound(old, batch, e_batch, momentum, dtype=np.float32, e_old=0.0):
    """Bound on ``momentum * old + (1 - momentum) * batch`` computed in ``dtype``, ``batch``
    known to ``e_batch`` (and ``old`` to ``e_old``, after earlier updates): each error times its
    weight, plus the roundings of the momentum, of ``1 - momentum``, of the two products and
    of the sum."""
    old, batch = _float(old), _float(batch)
    u = _unit(old + batch, dtype)  # complex means: 3 u (see _unit)
    old, batch = np.abs(old), np.abs(batch)
    return ((1 - momentum) * np.asarray(e_batch, np.float64)
            + momentum * np.asarray(e_old, np.float64) + 3 * u * (old + batch))


def accumulate_bound(old, batch, dtype=np.float32):
    """Chan's pooled update of ``(mean, var, n, e_mean, e_var)`` with one batch's, in ``dtype``.

    ``mean = old + w * delta`` and ``var = (1 - w) var_old + w var_b + w (1 - w) delta**2``
    (``w`` the batch's share of the count, ``delta`` the difference of the means): each input's
    error times its weight, the error of ``delta`` times ``2 w (1 - w) |delta|``, and a few
    ulps of every term. Start from ``(0, 0, 0, 0, 0)``; returns the same 5-tuple (float64).
    """
    u = unit_roundoff(dtype)
    m_a, v_a, n_a, e_ma, e_va = (np.asarray(a, np.float64) for a in old)
    m_b, v_b, n_b, e_mb, e_vb = (np.asarray(a, np.float64) for a in batch)
    total = n_a + n_b
    w = n_b / np.maximum(total, 1)
    delta = m_b - m_a
    mean = m_a + w * delta
    var = (1 - w) * v_a + w * v_b + w * (1 - w) * delta ** 2
    e_delta = e_ma + e_mb + u * np.abs(delta)
    e_mean = (1 - w) * e_ma + w * e_mb + 3 * u * (w * np.abs(delta) + np.abs(mean))
    e_var = ((1 - w) * e_va + w * e_vb + 2 * w * (1 - w) * np.abs(delta) * e_delta
             + 6 * u * ((1 - w) * v_a + w * v_b + w * (1 - w) * delta ** 2))
    return mean, var, total, e_mean, e_var


def stats_with_bounds(x, axis=-1, mask=None, dtype=np.float32, stable=True):
    """``(mean, var, n, e_mean, e_var)`` in feature shape: a batch's statistics as a state holds
    them (rounded to ``dtype``) with their bounds; the tuple :func:`accumulate_bound` takes."""
    x = np.asarray(x, np.float64)
    feats, _ = _axes(x.ndim, axis)
    fshape = tuple(x.shape[a] for a in feats)
    mo = moments_bound(x, axis, mask, dtype, stable)
    return tuple(mo[k].reshape(fshape) for k in ("mean", "var", "n", "e_mean_stored",
                                                 "e_var_stored"))


def cumulative_bound(old, batch, e_old, e_batch, k, dtype=np.float32):
    """Bound on the plain average after ``k`` earlier updates, ``old + (batch - old) / (k + 1)``:
    each input's error times its weight, plus the roundings of the difference, the division and
    the sum."""
    u = unit_roundoff(dtype)
    old, batch = np.asarray(old, np.float64), np.asarray(batch, np.float64)
    new = old + (batch - old) / (k + 1)
    return (k * np.asarray(e_old, np.float64) + np.asarray(e_batch, np.float64)) / (k + 1) + (
        3 * u * np.abs(batch - old) / (k + 1) + u * np.abs(new))


def renorm_forward(x, scale, bias, rmean, rvar, r_max, d_max, axis=-1, mask=None, eps=1e-5):
    """Batch renormalization's training output (Ioffe 2017) in float64, and ``r`` and ``d``:
    ``y = scale * (xhat * r + d) + bias`` with ``r = clip(sigma_B / sigma, 1/r_max, r_max)``,
    ``d = clip((mean_B - mean) / sigma, -d_max, d_max)``; ``mean``, ``sigma`` the running ones."""
    x = np.asarray(x, np.float64)
    feats, _ = _axes(x.ndim, axis)
    b = _bshape(x.shape, feats)
    mean, var, _ = batch_stats(x, axis, mask)
    sigma_b = np.sqrt(var + eps)
    sigma = np.sqrt(np.asarray(rvar, np.float64).reshape(b) + eps)
    r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
    d = np.clip((mean - np.asarray(rmean, np.float64).reshape(b)) / sigma, -d_max, d_max)
    y = (x - mean) / sigma_b * r + d
    s = 1.0 if scale is None else np.asarray(scale, np.float64).reshape(b)
    c = 0.0 if bias is None else np.asarray(bias, np.float64).reshape(b)
    return y * s + c, r, d


def renorm_forward_bound(x, scale, bias, rmean, rvar, r_max, d_max, axis=-1, mask=None,
                         eps=1e-5, dtype=np.float32):
    """Elementwise bound on :func:`renorm_forward`'s ``y`` computed in ``dtype``; also returns
    the relative bound on ``r`` (for gradients, where ``r`` scales ``dx``).

    ``xhat`` as in :func:`bn_forward_bound` (scale 1, bias 0), times ``r``; ``r``'s relative
    error is half the batch variance's plus a few ulps of two square roots and a division (0
    once clipped, unless within that error of the clip); ``d``'s is the mean's error over
    ``sigma`` plus a few ulps.
    """
    x = np.asarray(x, np.float64)
    feats, _ = _axes(x.ndim, axis)
    b = _bshape(x.shape, feats)
    u = unit_roundoff(dtype)
    mo = moments_bound(x, axis, mask, dtype)
    y, r, d = renorm_forward(x, None, None, rmean, rvar, r_max, d_max, axis, mask, eps)
    sigma = np.sqrt(np.asarray(rvar, np.float64).reshape(b) + eps)
    e_r = mo["e_var"] / (2 * (mo["var"] + eps)) + (2 * RSQRT_ULPS + 2) * u
    e_d = (mo["e_mean"] + u * np.abs(mo["mean"] - np.asarray(rmean, np.float64).reshape(b))
           ) / sigma + np.abs(d) * (RSQRT_ULPS + 2) * u
    xhat = (x - mo["mean"]) / np.sqrt(mo["var"] + eps)
    e_xhat = bn_forward_bound(x, None, None, axis, mask, eps, dtype)
    s, c = _affine_magnitudes(x, scale, bias, feats)
    bound = s * (r * e_xhat + np.abs(xhat) * r * (e_r + u) + e_d + u * np.abs(y)) + (
        2 * u * (s * np.abs(y) + c))
    return bound, e_r


def bn_forward_propagated(x, scale, e_in, axis=-1, mask=None, eps=1e-5):
    """First-order bound on how far input errors ``e_in`` (elementwise) move a training-mode
    output: ``|J| e_in`` for BatchNorm's Jacobian per feature, ``J = scale / sigma (I - w / N -
    xhat xhat^T w / N)`` (``w`` the mask), i.e. ``|scale| / sigma (e_i + mean_w(e) + |xhat_i|
    mean_w(|xhat| e))``. Adds to :func:`bn_forward_bound` when the input is itself computed."""
    x = _float(x)
    feats, red = _axes(x.ndim, axis)
    w = _weights(x, mask)
    mo = moments_bound(x, axis, mask)
    e_in = np.broadcast_to(np.asarray(e_in, np.float64), x.shape)
    sigma = np.sqrt(mo["var"] + eps)
    xhat = np.abs(x - mo["mean"]) / sigma
    valid = np.where(w > 0, xhat * e_in, 0)  # padding (NaN) takes no part in the statistics
    n = np.maximum(mo["n"], 1)
    s, _ = _affine_magnitudes(x, scale, None, feats)
    return s / sigma * (e_in + np.where(w > 0, e_in, 0).sum(axis=red, keepdims=True) / n
                        + xhat * valid.sum(axis=red, keepdims=True) / n)
