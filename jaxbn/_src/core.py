"""The public functional API: ``bn_init``, ``bn_apply`` and ``sync_state``.

``bn_apply`` takes a call in three steps, each a function of its own: :func:`prepare` checks
the inputs and decides everything static (the layout, the update mode, the device count);
:func:`train_statistics` (or ``complex_bn.train`` for complex input) normalizes and returns the
batch statistics; ``state.updated`` makes the new running state. The mathematics lives in
``moments`` / ``combine`` (statistics), ``normalize`` (the normalize step and its derivative)
and ``running`` (update rules).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxbn._src import checks, collectives, complex_bn, ghost, moments, option_checks, running
from jaxbn._src.layout import Layout, as_features, is_static, make_layout
from jaxbn._src.normalize import Fallback, Renorm, TrainConfig, eval_normalize, train_normalize
from jaxbn._src.options import Options
from jaxbn._src.state import Batch, Mode, same_container, update_mode, updated
from jaxbn._src.types import Axis, Params, State


def bn_init(features: int | Sequence[int], *, use_scale: bool = True, use_bias: bool = True,
            param_dtype: Any = jnp.float32,
            stats_dtype: Any = jnp.float32) -> tuple[Params, State]:
    """Creates BatchNorm parameters and state.

    Args:
      features: size of the feature axis, or a tuple of sizes for several feature axes (ints,
        NumPy integers or 0-d integer arrays).
      use_scale: include a learned ``scale`` (initialized to ones).
      use_bias: include a learned ``bias`` (initialized to zeros).
      param_dtype: the floating dtype of ``scale`` and ``bias``.
      stats_dtype: dtype of the running ``mean`` and ``var``: float32 (default) or float64
        (needs ``jax.config.update("jax_enable_x64", True)``; use it for float64 input, whose
        statistics would otherwise be rounded to float32 when stored). ``bn_apply`` returns
        the statistics in the dtype they were given, so the state's dtypes never change (as a
        ``lax.scan`` carry or a checkpoint needs).

    Returns:
      A pair ``(params, state)``. ``params`` holds ``"scale"`` (ones) and ``"bias"``
      (zeros), each absent when disabled. ``state`` holds ``"mean"`` (zeros), ``"var"``
      (ones) and ``"count"`` (an int32 0: the number of running-statistic updates so far).

    Raises:
      ValueError: ``features`` is not a positive int or tuple of them, or ``stats_dtype`` is
        not float32/float64.
      TypeError: ``param_dtype`` is not a floating dtype.

    Example:
      >>> import jaxbn
      >>> params, state = jaxbn.bn_init(3)
      >>> sorted(params), sorted(state), params["scale"].shape, state["mean"].dtype.name
      (['bias', 'scale'], ['count', 'mean', 'var'], (3,), 'float32')
    """
    shape = as_features(features)
    sdt = option_checks.check_stats_dtype(stats_dtype)
    option_checks.check_param_dtype(param_dtype)
    params: Params = {}
    if use_scale:
        params["scale"] = jnp.ones(shape, param_dtype)
    if use_bias:
        params["bias"] = jnp.zeros(shape, param_dtype)
    state: State = {"mean": jnp.zeros(shape, sdt), "var": jnp.ones(shape, sdt),
                    "count": jnp.zeros((), jnp.int32)}
    return params, state


class Call(NamedTuple):
    """One checked call: arrays, the static layout, the options and what they imply."""

    params: dict[str, jax.Array]
    state: dict[str, jax.Array]
    x: jax.Array
    mask: jax.Array | None
    layout: Layout
    options: Options  # checked; epsilon a float
    mode: Mode


def broadcast(value: jax.Array | None, layout: Layout, lead: int = 0) -> jax.Array | None:
    """A per-feature vector reshaped to broadcast against ``x`` (``lead`` extra axes first)."""
    if value is None:
        return None
    return value.reshape((1,) * lead + layout.broadcast_shape)


def prepare(params: Mapping, state: Mapping, x: Any, train: bool, options: Options,
            mask: Any = None) -> Call:
    """Checks one call (clear errors at trace time) and decides what is static."""
    checks.check_train_flag(train)
    x = checks.check_input(x)
    params = checks.check_params(params)
    state = checks.check_state(state)
    layout = make_layout(x.shape, options.axis)
    checks.check_features(layout, params, "params")
    checks.check_features(layout, state, "state")
    options = options._replace(epsilon=option_checks.check_epsilon(
        options.epsilon, moments.stats_dtype(x.dtype)))
    mode = update_mode(state, options.momentum)
    if not train:
        return Call(params, state, x, None, layout, options, mode)
    options = options.checked()
    mask = checks.check_mask(mask, layout.shape)
    options = options._replace(virtual_batch_size=checks.check_virtual_batch(
        layout.shape, layout.feature_axes, options.virtual_batch_size))
    if mode == "cumulative" and "count" not in state:
        raise ValueError("momentum=None (cumulative average) needs state['count']; build the "
                         "state with bn_init")
    devices = 1  # how many devices' batches are pooled into one set of statistics
    if options.axis_name is not None:
        axis_size = collectives.check_bound(options.axis_name)
        if collectives.device_count(options.axis_name) > 1 and not all(
                is_static(d) for d in layout.shape):
            # JAX 0.10.2 cannot call such an export (and crashes refining its shapes)
            raise NotImplementedError(
                f"x has symbolic dimensions {layout.shape} and axis_name={options.axis_name!r} "
                f"names shard_map/pmap axes: JAX cannot run collectives over shapes that are "
                f"symbolic (jax.export). Export synchronized training with static shapes")
        groups = collectives.normalize_groups(options.axis_index_groups)
        option_checks.check_groups_cover(groups, axis_size, options.axis_name)
        devices = axis_size if groups is None else len(groups[0])
    checks.check_enough_elements(layout, mask, devices, options.virtual_batch_size,
                                 options.allow_single_value)
    if jnp.iscomplexobj(x):
        complex_bn.check_supported(options, mode)
    return Call(params, state, x, mask, layout, options, mode)


def train_statistics(call: Call) -> tuple[jax.Array, Batch]:
    """Training mode for real input: ``y`` and the batch statistics for the running update."""
    x, mask, layout, opts = call.x, call.mask, call.layout, call.options
    work_x, work_mask, work_layout, lead = x, mask, layout, 0
    stats_axis_name = opts.axis_name
    if opts.virtual_batch_size is not None:  # ghost batches: each device's own groups
        work_x, work_mask, work_layout = ghost.split(x, mask, layout, opts.virtual_batch_size)
        lead, stats_axis_name = 1, None
    dt = moments.stats_dtype(x.dtype)
    lead_shape = (1,) * lead + layout.broadcast_shape
    running_mean = call.state["mean"].reshape(lead_shape).astype(dt)
    running_var = call.state["var"].reshape(lead_shape).astype(dt)
    renorm = None
    if opts.renorm is not None:
        renorm = Renorm(running_mean, running_var, jnp.asarray(opts.renorm[0], dt),
                        jnp.asarray(opts.renorm[1], dt))
    groups = collectives.normalize_groups(opts.axis_index_groups)
    cfg = TrainConfig(work_layout, stats_axis_name, groups, opts.epsilon, opts.sync_method)
    y, mean, var, count = train_normalize(
        cfg, work_x, work_mask, broadcast(call.params.get("scale"), layout, lead),
        broadcast(call.params.get("bias"), layout, lead), renorm,
        Fallback(running_mean, running_var))  # for features with no valid element
    y = ghost.merge(y, x) if lead else y
    mean, var, count = (jnp.broadcast_to(lax.stop_gradient(v), work_layout.broadcast_shape)
                        .reshape(work_layout.feature_shape) for v in (mean, var, count))
    if opts.unbiased_running_var and call.mode != "precise":  # precise: once, when pooled
        var = running.unbiased(var, count)
    if lead:
        mean, var, count = ghost.pool(mean, var, count, exact=call.mode == "precise",
                                      axis_name=opts.axis_name, groups=groups)
    return y, Batch(mean, var, count)


def apply(params: Mapping, state: Mapping, x: Any, train: bool, options: Options,
          mask: Any = None) -> tuple[jax.Array, Any]:
    """``bn_apply`` with its options as one :class:`~jaxbn._src.options.Options` (what the
    wrappers call)."""
    call = prepare(params, state, x, train, options, mask)
    layout, opts = call.layout, call.options
    if not train:
        normalize = complex_bn.evaluate if jnp.iscomplexobj(call.x) else eval_normalize
        y = normalize(call.x, broadcast(call.state["mean"], layout),
                      broadcast(call.state["var"], layout),
                      broadcast(call.params.get("scale"), layout),
                      broadcast(call.params.get("bias"), layout), opts.epsilon)
        return y, state
    if jnp.iscomplexobj(call.x):
        y, batch = complex_bn.train(call.x, call.mask, call.params, call.state, layout, opts)
    else:
        y, batch = train_statistics(call)
    new = updated(call.state, batch, call.mode, momentum=opts.momentum,
                  skip_nonfinite=opts.skip_nonfinite,
                  unbiased_running_var=opts.unbiased_running_var)
    return y, same_container(state, new)


def bn_apply(params: Params, state: State, x: ArrayLike, train: bool, *, axis: Axis = -1,
             momentum: float | None = 0.99, epsilon: float = 1e-5,
             axis_name: Hashable | tuple[Hashable, ...] | None = None,
             axis_index_groups: Sequence[Sequence[int]] | None = None,
             mask: ArrayLike | None = None, unbiased_running_var: bool = False,
             virtual_batch_size: int | None = None,
             renorm: tuple[Any, Any] | None = None,
             skip_nonfinite: bool = False,
             allow_single_value: bool = False,
             sync_method: str = "auto") -> tuple[jax.Array, State]:
    """Applies Batch Normalization; returns ``(y, new_state)``.

    Args:
      params: ``{"scale", "bias"}`` from ``bn_init`` (either key may be absent); arrays or
        array-likes.
      state: ``{"mean", "var"}`` running statistics from ``bn_init``, optionally with
        ``"count"`` (an integer scalar) and ``"seen"``; other keys raise. The new state has the
        same keys, dtypes and container type (a ``FrozenDict`` stays one): statistics are
        computed in float32 or wider and stored back in the state's dtype.
      x: floating (or complex) input, any array-like. ``y`` comes back in ``x``'s dtype.
      train: True normalizes with this batch's statistics (reduced over every axis but
        ``axis``, and over the devices of ``axis_name``) and updates the running statistics;
        False normalizes with the running statistics and returns ``state`` unchanged.
      axis: the feature axis, or a tuple of them (negative values allowed).
      momentum: running update ``new = momentum * old + (1 - momentum) * batch`` (0 takes the
        batch's statistics, 1 freezes them); ``None`` keeps a cumulative (plain) average of
        all batch statistics instead.
      epsilon: added to the variance before the square root.
      axis_name: mesh/pmap/vmap axis name (or tuple of distinct names) to synchronize
        statistics over, count-weighted.
      axis_index_groups: groups of device indices along ``axis_name`` that share statistics.
      mask: boolean, broadcastable to ``x``: the elements that count toward the statistics.
      unbiased_running_var: accumulate ``n / (n - 1)`` times the batch variance (PyTorch).
        In precise mode (``jaxbn.reset_stats``) the factor is applied once, with ``n`` the
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
      sync_method: how statistics are combined over the devices of ``axis_name``:
        ``"gather"`` (one all-gather of ``(3F + c) * D`` floats), ``"reduce"`` (two all-reduces
        of O(F) floats, whatever the device count ``D``), or ``"auto"`` (gather up to
        ``AUTO_GATHER_MAX_DEVICES = 8`` devices per group, reduce above). All three are exact
        and depend on the batch alone, never on the running statistics.

    Returns:
      ``(y, new_state)``: the normalized ``x`` and the new running state (``state`` itself
      when ``train`` is False).

    Raises:
      TypeError: an argument of the wrong type (``x`` not floating, ``train`` not a bool, a
        non-boolean ``mask``, ...).
      ValueError: shapes that do not match, options out of range, or an unbound
        ``axis_name`` (``jaxbn.UnboundAxisNameError``).

    Example:
      >>> import jax, jax.numpy as jnp, jaxbn
      >>> params, state = jaxbn.bn_init(4)
      >>> x = jax.random.normal(jax.random.key(0), (32, 4)) * 3.0 + 1.0
      >>> y, state = jaxbn.bn_apply(params, state, x, train=True)
      >>> print(jnp.abs(y.mean(0)).max() < 1e-5, jnp.round(y.std(0), 3))
      True [1. 1. 1. 1.]
      >>> y_eval, _ = jaxbn.bn_apply(params, state, x, train=False)
    """
    options = Options(axis, momentum, epsilon, axis_name, axis_index_groups,
                      unbiased_running_var, virtual_batch_size, renorm, skip_nonfinite,
                      allow_single_value, sync_method)
    return apply(params, state, x, train, options, mask)


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
    option_checks.check_groups_cover(groups, axis_size, axis_name)
    stacked = jnp.stack([state["mean"], state["var"].astype(state["mean"].dtype)])
    avg = collectives.mean_over(stacked, axis_name, groups)
    new: Any = dict(state)
    new["mean"], new["var"] = avg[0], avg[1].astype(state["var"].dtype)
    return new
