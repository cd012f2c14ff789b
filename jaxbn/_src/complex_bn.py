"""Batch Normalization of complex input (what Flax accepts with ``dtype=jnp.complex64``).

The statistics are those Flax computes for complex ``x``: the mean is complex, the variance is
real, ``var = mean(|x - mean|^2)``, and ``y = (x - mean) / sqrt(var + epsilon) * scale + bias``.
The running mean becomes complex after the first update (as a ``flax.linen`` variable does);
the running variance stays real.

This is a small pure-``jnp`` path: two passes over ``x`` (mean, then the squared deviations),
combined across devices weighted by counts with one all-reduce per pass, and ordinary JAX
autodiff (no custom rule). ``jaxbn.bn_apply`` checks the call and updates the running state as
for real input (``core`` and ``state``); this module only computes ``y`` and the statistics.

Example:
  >>> import jax.numpy as jnp, jaxbn
  >>> params, state = jaxbn.bn_init(1)
  >>> x = jnp.array([[1 + 1j], [-1 - 1j]], jnp.complex64)
  >>> y, new = jaxbn.bn_apply(params, state, x, True, momentum=0.5, epsilon=1e-6)
  >>> print(jnp.round(y[:, 0], 3), new["var"].dtype, new["mean"].dtype)
  [ 0.707+0.707j -0.707-0.707j] float32 complex64
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn._src import collectives, running
from jaxbn._src.layout import Layout
from jaxbn._src.options import Options
from jaxbn._src.state import Batch


def _abs_sq(z: jax.Array) -> jax.Array:
    """``|z|^2`` as a real array."""
    return lax.square(jnp.real(z)) + lax.square(jnp.imag(z))


def check_supported(options: Options, mode: str) -> None:
    """Complex input supports the EMA and cumulative running statistics only."""
    if mode == "precise" or options.renorm is not None or options.virtual_batch_size is not None:
        raise NotImplementedError("complex input supports the EMA and cumulative running "
                                  "statistics only (no precise mode, renorm or "
                                  "virtual_batch_size)")


def _dtypes(x: jax.Array) -> tuple[jnp.dtype, jnp.dtype]:
    cdt = jnp.promote_types(x.dtype, jnp.complex64)
    return cdt, jnp.finfo(cdt).dtype


def evaluate(x, mean, var, scale, bias, epsilon: float) -> jax.Array:
    """``(x - mean) / sqrt(var + epsilon) * scale + bias`` for complex ``x``; statistics and
    parameters in broadcast shape (``scale``/``bias`` may be None)."""
    cdt, rdt = _dtypes(x)
    y = (x.astype(cdt) - mean.astype(cdt)) * lax.rsqrt(var.real.astype(rdt) + epsilon)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype)


def train(x: jax.Array, mask: jax.Array | None, params: dict, state: dict, layout: Layout,
          options: Options) -> tuple[jax.Array, Batch]:
    """Training mode: ``y`` and the batch statistics (complex mean, real variance). A feature
    with no valid element is normalized with the running statistics."""
    cdt, rdt = _dtypes(x)
    axis_name, groups = options.axis_name, options.axis_index_groups

    def total(v):  # sum over the reduced axes and the named devices, keeping x's rank
        s = jnp.sum(v, axis=layout.reduce_axes, keepdims=True)
        return s if axis_name is None else collectives.sum_over(s, axis_name, groups)

    valid = jnp.ones(layout.shape, bool) if mask is None else jnp.broadcast_to(mask, x.shape)
    xs = jnp.where(valid, x.astype(cdt), 0)
    count = total(valid.astype(rdt))
    safe = jnp.maximum(count, 1)
    mean = total(xs) / safe
    var = total(jnp.where(valid, _abs_sq(xs - mean), 0)) / safe
    has = count > 0
    bshape = layout.broadcast_shape
    norm_mean = jnp.where(has, mean, state["mean"].astype(cdt).reshape(bshape))
    norm_var = jnp.where(has, var, state["var"].real.astype(rdt).reshape(bshape))
    scale, bias = (None if v is None else v.reshape(bshape)
                   for v in (params.get("scale"), params.get("bias")))
    y = evaluate(x, norm_mean, norm_var, scale, bias, options.epsilon)
    mean, var, count = (lax.stop_gradient(v).reshape(layout.feature_shape)
                        for v in (mean, var, count))
    if options.unbiased_running_var:
        var = running.unbiased(var, count)
    return y, Batch(mean, var, count)
