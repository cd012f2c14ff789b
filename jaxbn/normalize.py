"""The normalize step: training mode with a closed-form custom VJP, and inference mode.

Training mode computes the batch statistics (one all-gather when synchronized), normalizes,
and applies the affine transform in one custom-VJP function. Its backward pass is the closed
form of the BatchNorm gradient:

  dx = scale * r / sigma * (dy - w * (sum(dy) + xhat * sum(dy * xhat)) / N)

where ``w`` is the mask, ``N`` the global count and the two sums run over every element on
every named device: ONE all-reduce of the stacked sums. It saves only the input, the mask and
per-feature vectors for the backward (``xhat`` is recomputed), i.e. 1x the input's bytes.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxbn.layout import make_layout
  >>> from jaxbn.normalize import TrainConfig, train_normalize
  >>> x = jnp.arange(6.0).reshape(3, 2)
  >>> cfg = TrainConfig(make_layout(x.shape, -1), None, None, 1e-5, (), ())
  >>> y, mean, var, count = train_normalize(cfg, x, None, None, None, None)
  >>> [round(v, 3) for v in y[:, 0].tolist()]
  [-1.225, 0.0, 1.225]
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import collectives, moments
from jaxbn.layout import Layout


class TrainConfig(NamedTuple):
    """Static (hashable) settings of one training-mode normalization."""

    layout: Layout
    axis_name: Any
    groups: collectives.Groups
    epsilon: float
    scale_sum_names: tuple  # named axes to sum the scale gradient over (see collectives)
    bias_sum_names: tuple


class Renorm(NamedTuple):
    """Batch renormalization inputs (Ioffe 2017): running statistics and the clipping limits."""

    running_mean: jax.Array  # broadcast shape
    running_var: jax.Array
    r_max: jax.Array
    d_max: jax.Array


def _sum_to_shape(t: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums ``t`` over the axes where ``shape`` has 1 and ``t`` does not."""
    pairs = zip(t.shape, shape, strict=True)
    axes = tuple(i for i, (a, b) in enumerate(pairs) if b == 1 and a != 1)
    return jnp.sum(t, axis=axes, keepdims=True) if axes else t


def _renorm_correction(mean, invstd, rn: Renorm, eps):
    sigma = jnp.sqrt(rn.running_var + eps)
    r = jnp.clip((1.0 / invstd) / sigma, 1.0 / rn.r_max, rn.r_max)
    d = jnp.clip((mean - rn.running_mean) / sigma, -rn.d_max, rn.d_max)
    return lax.stop_gradient(r), lax.stop_gradient(d)


def _forward(cfg: TrainConfig, x, mask, scale, bias, renorm):
    m = moments.local_moments(x, mask, cfg.layout)
    if cfg.axis_name is not None:
        m = moments.combine_across(m, cfg.axis_name, cfg.groups)
    mean, var, count = moments.finalize(m)
    dt = mean.dtype
    invstd = lax.rsqrt(var + cfg.epsilon)
    mult = invstd if scale is None else invstd * scale.astype(dt)
    shift = jnp.zeros((), dt) if bias is None else bias.astype(dt)
    r = d = None
    if renorm is not None:
        r, d = _renorm_correction(mean, invstd, renorm, cfg.epsilon)
        mult = mult * r
        shift = shift + (d if scale is None else d * scale.astype(dt))
    y = ((x.astype(dt) - mean) * mult + shift).astype(x.dtype)
    residuals = (x, mask, mean, invstd, count, scale, bias, renorm, r, d)
    return (y, mean, var, count), residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def train_normalize(cfg: TrainConfig, x, mask, scale, bias, renorm):
    """Batch-normalizes ``x`` with its (synchronized) batch statistics.

    Returns ``(y, mean, var, count)``: ``y`` in ``x.dtype``; ``mean``, biased ``var`` and the
    global ``count`` per feature, in broadcast shape and the statistics dtype.
    """
    return _forward(cfg, x, mask, scale, bias, renorm)[0]


def _fwd(cfg, x, mask, scale, bias, renorm):
    return _forward(cfg, x, mask, scale, bias, renorm)


def _param_grad(local, total, sum_names, cfg, shape):
    if sum_names and tuple(sum_names) == collectives.names_of(cfg.axis_name):
        g = total
    elif sum_names:
        g = collectives.sum_over(local, tuple(sum_names), cfg.groups)
    else:
        g = local
    return _sum_to_shape(g, shape)


def _bwd(cfg, residuals, cotangents):
    x, mask, mean, invstd, count, scale, bias, renorm, r, d = residuals
    dy, dmean, dvar, _ = cotangents
    dt = mean.dtype
    axes = cfg.layout.reduce_axes
    g = dy.astype(dt)
    xc = x.astype(dt) - mean
    xhat = xc * invstd
    local = jnp.stack([jnp.sum(g, axis=axes, keepdims=True),
                       jnp.sum(g * xhat, axis=axes, keepdims=True)])
    total = local if cfg.axis_name is None else collectives.sum_over(local, cfg.axis_name,
                                                                      cfg.groups)
    inv_n = 1.0 / jnp.maximum(count, 1)
    mult = invstd if scale is None else invstd * scale.astype(dt)
    if r is not None:
        mult = mult * r
    centred = total[0] * inv_n + xhat * (total[1] * inv_n)
    stat_grad = (dmean + 2.0 * dvar * xc) * inv_n
    if mask is None:
        dx = mult * (g - centred) + stat_grad
    else:
        dx = mult * g - jnp.where(mask, mult * centred - stat_grad, 0)
    dx = dx.astype(x.dtype)

    dscale = dbias = None
    if scale is not None:
        s2_local, s2_total = local[1], total[1]
        if r is not None:
            s2_local = r * local[1] + d * local[0]
            s2_total = r * total[1] + d * total[0]
        dscale = _param_grad(s2_local, s2_total, cfg.scale_sum_names, cfg,
                             scale.shape).astype(scale.dtype)
    if bias is not None:
        dbias = _param_grad(local[0], total[0], cfg.bias_sum_names, cfg,
                            bias.shape).astype(bias.dtype)
    drenorm = None if renorm is None else jax.tree.map(jnp.zeros_like, renorm)
    return dx, None, dscale, dbias, drenorm


train_normalize.defvjp(_fwd, _bwd)


def eval_normalize(x, mean, var, scale, bias, epsilon):
    """Normalizes ``x`` with given (running) statistics, all in broadcast shape."""
    dt = moments.stats_dtype(x.dtype)
    mult = lax.rsqrt(var.astype(dt) + epsilon)
    if scale is not None:
        mult = mult * scale.astype(dt)
    y = (x.astype(dt) - mean.astype(dt)) * mult
    if bias is not None:
        y = y + bias.astype(dt)
    return y.astype(x.dtype)
