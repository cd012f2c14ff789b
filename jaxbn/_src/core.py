"""The public functional API: ``bn_init``, ``bn_apply`` and ``sync_state``.

This module only composes the pieces: validation (``checks``), shapes (``layout``), the
normalize step (``normalize``), statistics (``moments``) and running updates (``running``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn._src import checks, collectives, combine, complex_bn, ghost, moments, running
from jaxbn._src.layout import Axis, Layout, as_features, make_layout
from jaxbn._src.normalize import Fallback, Renorm, TrainConfig, eval_normalize, train_normalize

Params = dict[str, jax.Array]
State = dict[str, jax.Array]


def bn_init(features: int | Sequence[int], *, use_scale: bool = True, use_bias: bool = True,
            param_dtype: Any = jnp.float32,
            stats_dtype: Any = jnp.float32) -> tuple[Params, State]:
    """Creates BatchNorm parameters and state.

    Args:
      features: size of the feature axis, or a tuple of sizes for several feature axes (ints,
        NumPy integers or 0-d integer arrays).
      use_scale: include a learned ``scale`` (initialized to ones).
      use_bias: include a learned ``bias`` (initialized to zeros).
      param_dtype: dtype of ``scale`` and ``bias``.
      stats_dtype: dtype of the running ``mean`` and ``var``: float32 (default) or float64
        (needs ``jax.config.update("jax_enable_x64", True)``). ``bn_apply`` never narrows
        it: the updated statistics come back in the wider of this dtype and the batch
        statistics' (float32, or float64 for float64 input), like flax.linen, so with float64
        input pass ``stats_dtype=jnp.float64`` to keep the state's dtype fixed from the start
        (as ``lax.scan`` carries need). A state cast to bfloat16/float16 comes back float32.

    Returns:
      ``(params, state)``: ``params = {"scale", "bias"}`` (a key is absent when disabled);
      ``state = {"mean": zeros, "var": ones, "count": 0}`` where ``count`` is the number of
      running-statistic updates so far.

    Example:
      >>> import jaxbn
      >>> params, state = jaxbn.bn_init(3)
      >>> sorted(params), sorted(state), params["scale"].shape, state["mean"].dtype.name
      (['bias', 'scale'], ['count', 'mean', 'var'], (3,), 'float32')
    """
    shape = as_features(features)
    sdt = checks.check_stats_dtype(stats_dtype)
    params: Params = {}
    if use_scale:
        params["scale"] = jnp.ones(shape, param_dtype)
    if use_bias:
        params["bias"] = jnp.zeros(shape, param_dtype)
    state: State = {"mean": jnp.zeros(shape, sdt), "var": jnp.ones(shape, sdt),
                    "count": jnp.zeros((), jnp.int32)}
    return params, state


def _as_broadcast(value, layout: Layout, lead: int = 0):
    if value is None:
        return None
    return value.reshape((1,) * lead + layout.broadcast_shape)


def bn_apply(params: Params, state: State, x: jax.Array, train: bool, *, axis: Axis = -1,
             momentum: float | None = 0.99, epsilon: float = 1e-5,
             axis_name: Hashable | tuple[Hashable, ...] | None = None,
             axis_index_groups: Sequence[Sequence[int]] | None = None,
             mask: jax.Array | None = None, unbiased_running_var: bool = False,
             virtual_batch_size: int | None = None,
             renorm: tuple[Any, Any] | None = None,
             skip_nonfinite: bool = False,
             allow_single_value: bool = False,
             sync_method: str = "auto") -> tuple[jax.Array, State]:
    """Applies Batch Normalization; returns ``(y, new_state)``.

    Args:
      params: ``{"scale", "bias"}`` from :func:`bn_init` (either key may be absent).
      state: ``{"mean", "var"}`` running statistics from :func:`bn_init`, optionally with
        ``"count"`` and ``"seen"``; other keys raise. The new state's statistics come back in
        the wider of the state's dtype and the batch statistics' (at least float32).
      x: floating input. ``y`` comes back in ``x``'s dtype; statistics are float32 or wider.
      train: True normalizes with this batch's statistics (reduced over every axis but
        ``axis``, and over the devices of ``axis_name``) and updates the running statistics;
        False normalizes with the running statistics and returns ``state`` unchanged.
      axis: the feature axis, or a tuple of them (negative values allowed).
      momentum: running update ``new = momentum * old + (1 - momentum) * batch``; ``None``
        keeps a cumulative (plain) average of all batch statistics instead.
      epsilon: added to the variance before the square root.
      axis_name: mesh/pmap/vmap axis name (or tuple of names) to synchronize statistics
        over. One all-gather forward, one all-reduce backward, count-weighted.
      axis_index_groups: groups of device indices along ``axis_name`` that share statistics.
      mask: boolean, broadcastable to ``x``: the elements that count toward the statistics.
      unbiased_running_var: accumulate ``n / (n - 1)`` times the batch variance (PyTorch).
        In precise mode (:func:`jaxbn.reset_stats`) the factor is applied once, with ``n`` the
        whole population's count, so the result is the unbiased variance of all the batches.
      virtual_batch_size: ghost batch normalization: normalize consecutive groups of this many
        examples (along axis 0) with their own statistics.
      renorm: ``(r_max, d_max)`` for batch renormalization (Ioffe 2017); may be traced.
      skip_nonfinite: leave the running statistics unchanged when the batch statistics are
        not finite.
      allow_single_value: by default, training on a batch with exactly one value per feature
        (counted over all devices of ``axis_name``, or per ghost batch) raises a ValueError,
        as PyTorch does: its variance is undefined. True accepts it as flax.linen does: the
        variance is 0, so ``y = bias`` and the running variance is pulled toward 0. An empty
        batch (no values) is always accepted: ``y`` is empty and the state is unchanged, as
        with an all-False ``mask``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxbn
      >>> params, state = jaxbn.bn_init(4)
      >>> x = jax.random.normal(jax.random.key(0), (32, 4)) * 3.0 + 1.0
      >>> y, state = jaxbn.bn_apply(params, state, x, train=True)
      >>> print(jnp.abs(y.mean(0)).max() < 1e-5, jnp.round(y.std(0), 3))
      True [1. 1. 1. 1.]
      >>> y_eval, _ = jaxbn.bn_apply(params, state, x, train=False)
    """
    if hasattr(x, "dtype") and jnp.iscomplexobj(x):  # a variant of its own (plain jnp)
        return complex_bn.complex_bn_apply(
            params, state, x, train, axis=axis, momentum=momentum, epsilon=epsilon,
            axis_name=axis_name, axis_index_groups=axis_index_groups, mask=mask,
            unbiased_running_var=unbiased_running_var, virtual_batch_size=virtual_batch_size,
            renorm=renorm, skip_nonfinite=skip_nonfinite, allow_single_value=allow_single_value,
            sync_method=sync_method)
    checks.check_input(x)
    checks.check_train_flag(train)
    checks.check_params(params)
    checks.check_state(state)
    layout = make_layout(x.shape, axis)
    checks.check_features(layout, params, "params")
    checks.check_features(layout, state, "state")
    epsilon = checks.check_epsilon(epsilon, moments.stats_dtype(x.dtype))
    scale, bias = params.get("scale"), params.get("bias")
    if not train:
        y = eval_normalize(x, _as_broadcast(state["mean"], layout),
                           _as_broadcast(state["var"], layout), _as_broadcast(scale, layout),
                           _as_broadcast(bias, layout), float(epsilon))
        return y, state

    checks.check_momentum(momentum)
    mask = checks.check_mask(mask, layout.shape)
    checks.check_groups(axis_name, axis_index_groups)
    virtual_batch_size = checks.check_virtual_batch(layout.shape, layout.feature_axes,
                                                    virtual_batch_size)
    checks.check_renorm(renorm)
    if momentum is None and "count" not in state:
        raise ValueError("momentum=None (cumulative average) needs state['count']; build the "
                         "state with bn_init")
    groups = collectives.normalize_groups(axis_index_groups)
    devices = 1  # how many devices' batches are pooled into one set of statistics
    if axis_name is not None:
        axis_size = collectives.check_bound(axis_name)
        checks.check_groups_cover(groups, axis_size, axis_name)
        devices = axis_size if groups is None else len(groups[0])
    checks.check_enough_elements(layout, mask, devices, virtual_batch_size, allow_single_value)

    work_x, work_mask, work_layout, lead = x, mask, layout, 0
    stats_axis_name = axis_name
    if virtual_batch_size is not None:  # ghost batches: each device's own groups
        work_x, work_mask, work_layout = ghost.split(x, mask, layout, virtual_batch_size)
        lead, stats_axis_name = 1, None
    scale_b, bias_b = _as_broadcast(scale, layout, lead), _as_broadcast(bias, layout, lead)
    dt = moments.stats_dtype(x.dtype)
    running_mean = _as_broadcast(state["mean"], layout, lead).astype(dt)
    running_var = _as_broadcast(state["var"], layout, lead).astype(dt)
    rn = None
    if renorm is not None:
        rn = Renorm(running_mean, running_var, jnp.asarray(renorm[0], dt),
                    jnp.asarray(renorm[1], dt))
    fallback = Fallback(running_mean, running_var)  # features with no valid element
    cfg = TrainConfig(work_layout, stats_axis_name, groups, float(epsilon),
                      combine.check_method(sync_method))
    y, mean, var, count = train_normalize(cfg, work_x, work_mask, scale_b, bias_b, rn, fallback)
    y = ghost.merge(y, x) if lead else y

    mean, var, count = (jnp.broadcast_to(lax.stop_gradient(v), work_layout.broadcast_shape)
                        .reshape(work_layout.feature_shape) for v in (mean, var, count))
    if unbiased_running_var and "seen" not in state:  # precise mode: once, in _update_state
        var = running.unbiased(var, count)
    if lead:
        mean, var, count = ghost.pool(mean, var, count, exact="seen" in state,
                                      axis_name=axis_name, groups=groups)
    return y, _update_state(state, mean, var, count, momentum, skip_nonfinite,
                            unbiased_running_var)


def _update_state(state: State, mean, var, count, momentum, skip_nonfinite,
                  unbiased_running_var: bool = False) -> State:
    """The new running statistics. Each comes back in ``running.update_dtype``: never narrower
    than the given state or the batch statistics (a bfloat16 state comes back float32)."""
    ok = count > 0
    if skip_nonfinite:
        ok = ok & jnp.all(jnp.isfinite(mean)) & jnp.all(jnp.isfinite(var))
    if "seen" in state:  # precise mode (see reset_stats): exact population statistics
        m, v, seen = running.accumulate(state["mean"], state["var"], state["seen"], mean, var,
                                        count, unbiased_var=unbiased_running_var)
        updated = {"mean": m, "var": v, "seen": seen}
    elif momentum is None:
        updated = {k: running.cumulative(state[k], b, state["count"])
                   for k, b in (("mean", mean), ("var", var))}
    else:
        updated = {k: running.ema(state[k], b, momentum) for k, b in (("mean", mean), ("var", var))}
    new = dict(state)
    for key, value in updated.items():
        new[key] = running.keep_where(ok, value, state[key])
    if "count" in state:
        new["count"] = state["count"] + jnp.any(ok).astype(state["count"].dtype)
    return new


def sync_state(state: State, axis_name: Hashable | tuple[Hashable, ...],
               axis_index_groups: Sequence[Sequence[int]] | None = None) -> State:
    """Averages the running mean and variance over the named devices (one all-reduce).

    For models trained with per-device statistics: call it before evaluation or checkpointing
    so every replica holds the same running statistics. ``count`` is left as it is.

    Example:
      >>> import jax, jax.numpy as jnp, jaxbn
      >>> _, state = jaxbn.bn_init(2)
      >>> states = jax.tree.map(lambda v: jnp.stack([v, v + 2]), state)
      >>> synced = jax.vmap(lambda s: jaxbn.sync_state(s, "i"), axis_name="i")(states)
      >>> synced["mean"].tolist()
      [[1.0, 1.0], [1.0, 1.0]]
    """
    checks.check_state(state)
    axis_size = collectives.check_bound(axis_name)
    groups = collectives.normalize_groups(axis_index_groups)
    checks.check_groups_cover(groups, axis_size, axis_name)
    stacked = jnp.stack([state["mean"], state["var"].astype(state["mean"].dtype)])
    avg = collectives.mean_over(stacked, axis_name, groups)
    new = dict(state)
    new["mean"], new["var"] = avg[0], avg[1].astype(state["var"].dtype)
    return new
