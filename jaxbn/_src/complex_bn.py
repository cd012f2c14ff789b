"""Batch Normalization of complex input (what Flax accepts with ``dtype=jnp.complex64``).

The statistics are those Flax computes for complex ``x``: the mean is complex, the variance is
real, ``var = mean(|x - mean|^2)``, and ``y = (x - mean) / sqrt(var + epsilon) * scale + bias``.
The running mean becomes complex after the first update (as a ``flax.linen`` variable does);
the running variance stays real.

This is a small pure-``jnp`` path: two passes over ``x`` (mean, then the squared deviations),
combined across devices weighted by counts with one all-reduce per pass, and ordinary JAX
autodiff (no custom rule). :func:`jaxbn.bn_apply` hands complex input to
:func:`complex_bn_apply`.

Example:
  >>> import jax.numpy as jnp, jaxbn
  >>> from jaxbn._src.complex_bn import complex_bn_apply
  >>> params, state = jaxbn.bn_init(1)
  >>> x = jnp.array([[1 + 1j], [-1 - 1j]], jnp.complex64)
  >>> y, new = complex_bn_apply(params, state, x, True, momentum=0.5, epsilon=1e-6)
  >>> print(jnp.round(y[:, 0], 3), new["var"].dtype, new["mean"].dtype)
  [ 0.707+0.707j -0.707-0.707j] float32 complex64
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn._src import checks, collectives, running
from jaxbn._src.layout import Axis, make_layout


def _abs_sq(z: jax.Array) -> jax.Array:
    """``|z|^2`` as a real array."""
    return lax.square(jnp.real(z)) + lax.square(jnp.imag(z))


def _check(params, state, x, momentum, renorm, virtual_batch_size) -> None:
    if not jnp.iscomplexobj(x):
        raise TypeError(f"complex_bn_apply needs complex x (complex64/complex128), got {x.dtype}")
    if x.ndim == 0:
        raise ValueError("x must have at least one axis (the feature axis), got a scalar")
    checks.check_params(params)
    if not isinstance(state, Mapping) or "mean" not in state or "var" not in state:
        raise ValueError(f"state must be a dict with 'mean' and 'var', got {state!r}")
    if "seen" in state or renorm is not None or virtual_batch_size is not None:
        raise NotImplementedError("complex input supports the EMA and cumulative running "
                                  "statistics only (no precise mode, renorm or "
                                  "virtual_batch_size)")
    if momentum is None and "count" not in state:
        raise ValueError("momentum=None (cumulative average) needs state['count']; build the "
                         "state with bn_init")


def complex_bn_apply(params: Mapping[str, jax.Array], state: Mapping[str, jax.Array],
                     x: jax.Array, train: bool, *, axis: Axis = -1,
                     momentum: float | None = 0.99, epsilon: float = 1e-5,
                     axis_name: Hashable | tuple[Hashable, ...] | None = None,
                     axis_index_groups: Sequence[Sequence[int]] | None = None,
                     mask: jax.Array | None = None, unbiased_running_var: bool = False,
                     virtual_batch_size: int | None = None,
                     renorm: tuple[Any, Any] | None = None, skip_nonfinite: bool = False,
                     allow_single_value: bool = False,
                     sync_method: str = "auto") -> tuple[jax.Array, dict]:
    """:func:`jaxbn.bn_apply` for complex ``x``; same arguments, returns ``(y, new_state)``.

    ``y`` has ``x``'s dtype. Statistics are computed in complex64 or wider; the new running
    ``mean`` is complex, ``var`` real. A feature with no valid element under ``mask`` is
    normalized with the running statistics and leaves them unchanged. ``renorm``,
    ``virtual_batch_size`` and precise mode raise ``NotImplementedError``.
    """
    _check(params, state, x, momentum, renorm, virtual_batch_size)
    checks.check_train_flag(train)
    layout = make_layout(x.shape, axis)
    checks.check_features(layout, params, "params")
    checks.check_features(layout, state, "state")
    cdt = jnp.promote_types(x.dtype, jnp.complex64)
    rdt = jnp.finfo(cdt).dtype
    eps = checks.check_epsilon(epsilon, rdt)
    bshape = layout.broadcast_shape
    scale, bias = params.get("scale"), params.get("bias")

    def normalize(mean, var):
        y = (x.astype(cdt) - mean.reshape(bshape)) * lax.rsqrt(var.reshape(bshape) + eps)
        if scale is not None:
            y = y * scale.reshape(bshape)
        if bias is not None:
            y = y + bias.reshape(bshape)
        return y.astype(x.dtype)

    run_mean, run_var = state["mean"].astype(cdt), state["var"].real.astype(rdt)
    if not train:
        return normalize(run_mean, run_var), dict(state)

    checks.check_momentum(momentum)
    mask = checks.check_mask(mask, layout.shape)
    checks.check_groups(axis_name, axis_index_groups)
    groups = collectives.normalize_groups(axis_index_groups)
    devices = 1
    if axis_name is not None:
        axis_size = collectives.check_bound(axis_name)
        devices = axis_size if groups is None else len(groups[0])
    checks.check_enough_elements(layout, mask, devices, None, allow_single_value)

    def total(v):  # sum over the reduced axes and the named devices, keeping x's rank
        s = jnp.sum(v, axis=layout.reduce_axes, keepdims=True)
        return s if axis_name is None else collectives.sum_over(s, axis_name, groups)

    valid = jnp.ones(layout.shape, bool) if mask is None else jnp.broadcast_to(mask, x.shape)
    xs = jnp.where(valid, x.astype(cdt), 0)
    count = total(valid.astype(rdt))
    safe = jnp.maximum(count, 1)
    mean = total(xs) / safe
    var = total(jnp.where(valid, _abs_sq(xs - mean), 0)) / safe
    mean, var = mean.reshape(layout.feature_shape), var.reshape(layout.feature_shape)
    count = count.reshape(layout.feature_shape)
    has = count > 0  # a feature with no valid element keeps the running statistics
    y = normalize(jnp.where(has, mean, run_mean), jnp.where(has, var, run_var))

    if unbiased_running_var:
        var = running.unbiased(var, count)
    ok = has
    if skip_nonfinite:
        ok = ok & jnp.all(jnp.isfinite(mean)) & jnp.all(jnp.isfinite(var))
    new = dict(state)
    for key, batch in (("mean", mean), ("var", var)):
        if momentum is None:
            value = running.cumulative(state[key], batch, state["count"])
        else:
            value = running.ema(state[key], batch, momentum)
        new[key] = running.keep_where(ok, value, state[key].astype(value.dtype))
    if "count" in state:
        new["count"] = state["count"] + jnp.any(ok).astype(state["count"].dtype)
    return y, new
