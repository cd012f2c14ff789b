"""The normalize step: training mode with a closed-form custom JVP, and inference mode.

Training mode computes the batch statistics (one collective when synchronized), normalizes,
and applies the affine transform in one ``jax.custom_jvp`` function. Its tangent rule is the
closed-form linearization of BatchNorm. With ``xhat = ((x - m0) - corr) / sigma``, ``A = scale
* r / sigma`` (``r = 1`` without renorm) and the sums ``t0 = sum(w * dx)``, ``t1 = sum(w * xhat
* dx)`` over every element of every named device (``w`` the mask, ``N`` the global count):

  dy = A * dx + (dbias + d * dscale) + xhat * (r * dscale) - A * (t0 + xhat * t1) / N

Forward mode (``jvp``, ``jacfwd``, ``linearize``) uses it as it is; reverse mode is its
transpose, which JAX derives. The rule is written so that the transpose is the classical
closed-form backward: the per-feature coefficients are stacked and cast to "varying" once, so
their transpose is ONE all-reduce of the stacked sums (which also yields the gradients of
replicated parameters under ``shard_map``), and the rule runs under ``jax.checkpoint`` so that
reverse mode saves only ``x``, the mask and per-feature vectors (1x the input's bytes).

On a CPU, each pass over ``x`` (and, in reverse mode, over the output's cotangent) reads its
own copy (``private_copies``), so a bfloat16 layer makes no float32 copy of its input.

Masked-out elements are padding: they never enter the statistics (only valid elements are
selected, before any arithmetic), and a non-finite value there never meets a zero cotangent in
a product, so with a loss that ignores the padding, every output, statistic and gradient at
valid elements equals the one computed without the padded elements, whatever they hold. A
feature with no valid element is normalized with the running statistics it is given
(``fallback``).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxbn._src.layout import make_layout
  >>> from jaxbn._src.normalize import TrainConfig, train_normalize
  >>> x = jnp.arange(6.0).reshape(3, 2)
  >>> cfg = TrainConfig(make_layout(x.shape, -1), None, None, 1e-5)
  >>> y, mean, var, count = train_normalize(cfg, x, None, None, None, None, None)
  >>> [round(v, 3) for v in y[:, 0].tolist()]
  [-1.225, 0.0, 1.225]
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn._src import collectives, combine, moments, private_copies, running
from jaxbn._src.layout import Layout


class TrainConfig(NamedTuple):
    """Static (hashable) settings of one training-mode normalization."""

    layout: Layout
    axis_name: Any
    groups: collectives.Groups
    epsilon: float
    sync_method: str = "auto"  # combine.METHODS


class Renorm(NamedTuple):
    """Batch renormalization inputs (Ioffe 2017): running statistics and the clipping limits."""

    running_mean: jax.Array  # broadcast shape
    running_var: jax.Array
    r_max: jax.Array
    d_max: jax.Array


class Fallback(NamedTuple):
    """Statistics for features with no valid element (running statistics, broadcast shape)."""

    mean: jax.Array
    var: jax.Array


class _Stats(NamedTuple):
    """What the normalization of one batch needs, per feature (broadcast shape)."""

    m0: jax.Array  # the mean used for x is m0 + corr (two floats)
    corr: jax.Array
    invstd: jax.Array
    count: jax.Array | int  # type: ignore[assignment]  # (shadows tuple.count on purpose)
    r: jax.Array | None  # renorm factors (constants), or None
    d: jax.Array | None


def _statistics(cfg: TrainConfig, x, mask, renorm: Renorm | None, fallback: Fallback | None):
    """Batch (mean, var, count) for the running update, and the normalization's _Stats."""
    # Under plain jit over a sharded batch, these sums are global: XLA all-reduces each pass.
    m = moments.local_moments(x, mask, cfg.layout)
    if cfg.axis_name is not None:
        m = combine.combine_across(m, cfg.axis_name, cfg.groups, cfg.sync_method)
    mean, var, count = moments.finalize(m)
    m0, corr, norm_var = m.m0, m.corr, var
    if fallback is not None and not isinstance(m.count, int):
        seen = m.count > 0  # selects that keep the batch statistics' sharding
        m0 = running.keep_where(seen, m0, fallback.mean)
        corr = running.keep_where(seen, corr, jnp.zeros((), corr.dtype))
        norm_var = running.keep_where(seen, var, fallback.var)
    invstd = lax.rsqrt(norm_var + cfg.epsilon)
    r = d = None
    if renorm is not None:
        sigma = jnp.sqrt(renorm.running_var + cfg.epsilon)
        r = jnp.clip(jnp.sqrt(norm_var + cfg.epsilon) / sigma, 1.0 / renorm.r_max, renorm.r_max)
        d = jnp.clip((mean - renorm.running_mean) / sigma, -renorm.d_max, renorm.d_max)
        r, d = lax.stop_gradient(r), lax.stop_gradient(d)
    return (mean, var, count), _Stats(m0, corr, invstd, m.count, r, d)


def _affine(st: _Stats, scale, bias):
    """Per-feature ``(mult, shift)`` with ``y = xhat * sigma * mult + shift``."""
    dt = st.invstd.dtype
    mult = st.invstd if scale is None else st.invstd * scale.astype(dt)
    shift = jnp.zeros((), dt) if bias is None else bias.astype(dt)
    if st.r is not None and st.d is not None:
        mult = mult * st.r
        shift = shift + (st.d if scale is None else st.d * scale.astype(dt))
    return mult, shift


def _scaled_deviation(x, m0, corr, factor):
    """``(x - mean) * factor`` in the statistics dtype, the mean subtracted as its two floats."""
    return ((x.astype(factor.dtype) - m0) - corr) * factor


def _private_operands(x, st: _Stats, factor, mask):
    """``(x, m0, corr, factor)``, as private copies (``private_copies.fresh``) when there is no
    mask (a masked pass selects its elements first, which the library reductions do not fuse
    either way)."""
    operands = (x, st.m0, st.corr, factor)
    return operands if mask is not None else private_copies.fresh(*operands)


def _primal(cfg: TrainConfig, x, mask, scale, bias, renorm, fallback):
    """``((y, mean, var, count), stats)``: the outputs of ``train_normalize`` and its _Stats."""
    (mean, var, count), st = _statistics(cfg, x, mask, renorm, fallback)
    mult, shift = _affine(st, scale, bias)
    y = (_scaled_deviation(*_private_operands(x, st, mult, mask)) + shift).astype(x.dtype)
    return (y, mean, var, count), st


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def train_normalize(cfg: TrainConfig, x, mask, scale, bias, renorm, fallback):
    """Batch-normalizes ``x`` with its (synchronized) batch statistics.

    Returns ``(y, mean, var, count)``: ``y`` in ``x.dtype``; ``mean``, biased ``var`` and the
    global ``count`` per feature, in broadcast shape and the statistics dtype. ``mask``,
    ``renorm`` and ``fallback`` carry no derivative.
    """
    return _primal(cfg, x, mask, scale, bias, renorm, fallback)[0]


def _vary_like(value: jax.Array, target: jax.Array) -> jax.Array:
    """Casts ``value`` to vary over the shard_map axes along which ``target`` varies and it
    does not (one cast, so its transpose is one all-reduce)."""
    names = tuple(sorted(collectives.varying_axes(target) - collectives.varying_axes(value),
                         key=str))
    return lax.pcast(value, names, to="varying") if names else value


def _tangent(cfg: TrainConfig, x, mask, st: _Stats, scale, x_dot, scale_dot, bias_dot):
    """The linear map (dx, dscale, dbias) -> (dy, dmean, dvar); see the module docstring."""
    dt = st.invstd.dtype
    axes = cfg.layout.reduce_axes
    operands = _private_operands(x, st, st.invstd, mask)
    xhat = _scaled_deviation(*operands)
    dx = x_dot.astype(dt)
    dx_valid = dx
    if mask is not None:
        # Padding may hold anything: a non-finite xhat there is replaced by 0 so that a zero
        # cotangent (a loss that ignores padding) times it stays 0 in the transpose.
        mask = moments.as_rank(mask, x.ndim)
        xhat = jnp.where(mask | jnp.isfinite(xhat), xhat, 0)
        dx_valid = jnp.where(mask, dx, 0)
    local = jnp.stack([jnp.sum(dx_valid, axis=axes, keepdims=True),
                       jnp.sum(xhat * dx_valid, axis=axes, keepdims=True)])
    t = local if cfg.axis_name is None else collectives.sum_over(local, cfg.axis_name,
                                                                  cfg.groups)
    mult, _ = _affine(st, scale, None)
    t = _vary_like(t, mult)
    inv_n = moments.safe_div(jnp.ones((), dt), st.count)
    stat = -(mult * inv_n)[None] * t  # the statistics' coefficients of 1 and xhat
    const, slope = stat[0], stat[1]
    if bias_dot is not None:
        const = const + bias_dot.astype(dt)
    if scale_dot is not None:
        s_dot = scale_dot.astype(dt)
        slope = slope + (s_dot if st.r is None else st.r * s_dot)
        if st.d is not None:
            const = const + st.d * s_dot
    coef = _vary_like(jnp.stack([const, slope]), x)
    if mask is None:  # dy's own copy of xhat (from the sums' copy: a distinct barrier)
        xhat = _scaled_deviation(*private_copies.fresh(*operands))
    # (mult * dx + coef[0] + xhat * coef[1]).astype(x.dtype); the transpose reads dy's
    # cotangent in x.dtype once per term (see private_copies.cast_sum)
    dy = private_copies.cast_sum([mult * dx, coef[0], xhat * coef[1]], x.dtype)
    sigma = 1.0 / st.invstd
    mean_dot = t[0] * inv_n
    var_dot = 2.0 * sigma * t[1] * inv_n
    return dy, mean_dot, var_dot


_checkpointed_tangent = jax.checkpoint(_tangent, static_argnums=(0,))


@train_normalize.defjvp
def _train_normalize_jvp(cfg: TrainConfig, primals, tangents):
    x, mask, scale, bias, renorm, fallback = primals
    x_dot, _, scale_dot, bias_dot, _, _ = tangents
    (y, mean, var, count), st = _primal(cfg, x, mask, scale, bias, renorm, fallback)
    dy, mean_dot, var_dot = _checkpointed_tangent(cfg, x, mask, st, scale, x_dot, scale_dot,
                                                  bias_dot)
    mean_dot = jnp.broadcast_to(mean_dot, mean.shape).astype(mean.dtype)
    var_dot = jnp.broadcast_to(var_dot, var.shape).astype(var.dtype)
    count_dot = jnp.zeros_like(count)
    return (y, mean, var, count), (dy, mean_dot, var_dot, count_dot)


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
