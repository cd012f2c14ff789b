"""One call of a ``jaxbn.linen.BatchNorm`` in a linen scope: its variables created in Flax's
dtypes, checked against ``x``, handed to the core, and updated.

``jaxbn.linen.BatchNorm`` and ``jaxbn.linen.intercept`` call :func:`normalize`. It needs Flax:
only ``jaxbn.linen`` imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import flax.errors
import flax.linen as nn
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes

from jaxbn._src.flax_common import as_hashable, call_core, state_dtypes
from jaxbn._src.layout import make_layout
from jaxbn._src.options import from_attributes

if TYPE_CHECKING:
    from jaxbn.linen import BatchNorm

class BatchStatsNotMutableError(flax.errors.ModifyScopeVariableError):
    """A training call of a BatchNorm whose ``batch_stats`` collection is immutable.

    A subclass of Flax's ``ModifyScopeVariableError`` (what Flax's own BatchNorm raises
    there), with a message that says what to do.
    """

    def __init__(self, message: str):  # Flax's signature names a variable; this says more
        Exception.__init__(self, message)


def _check_mutable(module: nn.Module) -> None:
    if not module.is_mutable_collection("batch_stats"):
        where = "/".join(module.scope.path) if module.scope is not None else ""
        raise BatchStatsNotMutableError(
            f"the BatchNorm at '{where or '(top level)'}' was called in training mode "
            f"(use_running_average=False), which updates its running statistics, but the "
            f"'batch_stats' collection is immutable in this apply. Pass "
            f"mutable=['batch_stats'] and keep the statistics it returns: "
            f"`y, updates = model.apply(variables, x, mutable=['batch_stats'])`, then "
            f"`variables = {{**variables, **updates}}`. To evaluate, call it with "
            f"use_running_average=True (in most models: train=False).")


def _check_stored(variable: Any, name: str, feature_shape: tuple, x_shape: tuple,
                  axis: Any) -> None:
    shape = tuple(variable.value.shape)
    if shape != tuple(feature_shape):
        raise ValueError(
            f"batch_stats/{name} has shape {shape}, but x of shape {tuple(x_shape)} has "
            f"features {tuple(feature_shape)} along axis={axis!r}: the variables were made "
            f"for other input (a different axis= or feature count, or another model's "
            f"checkpoint). Set axis= to the feature axis, or initialize the model on input of "
            f"this shape.")


def normalize(module: nn.Module, cfg: BatchNorm, x, use_running_average: bool | None = None,
              *, mask=None):
    """One BatchNorm call: the variables are ``module``'s (created and updated in its scope),
    the settings ``cfg``'s (a ``jaxbn.linen.BatchNorm``). ``jaxbn.linen.BatchNorm`` passes
    itself as both; ``jaxbn.linen.intercept`` passes the intercepted ``flax.linen.BatchNorm``
    and a ``jaxbn.linen.BatchNorm`` holding its settings."""
    use_running_average = nn.merge_param("use_running_average", cfg.use_running_average,
                                         use_running_average)
    train = not use_running_average
    initializing = module.is_initializing()
    if train and not initializing:
        _check_mutable(module)
    axis = as_hashable(cfg.axis)
    feature_shape = make_layout(x.shape, axis).feature_shape
    declared = jnp.float32 if cfg.force_float32_reductions else cfg.param_dtype
    mean_dt, var_dt = state_dtypes(declared, x.dtype, cfg.dtype)
    mean = module.variable("batch_stats", "mean", lambda s: jnp.zeros(s, mean_dt),
                           feature_shape)
    var = module.variable("batch_stats", "var", lambda s: jnp.ones(s, var_dt), feature_shape)
    for name, stored in (("mean", mean), ("var", var)):
        _check_stored(stored, name, feature_shape, x.shape, cfg.axis)
    extra = {}  # optional state: update count (momentum=None), seen (precise BN)
    if cfg.momentum is None or module.has_variable("batch_stats", "count"):
        extra["count"] = module.variable("batch_stats", "count",
                                         lambda: jnp.zeros((), jnp.int32))
    if module.has_variable("batch_stats", "seen"):
        extra["seen"] = module.variable("batch_stats", "seen",
                                        lambda: None)  # type: ignore[arg-type,return-value]
    params = {}
    if cfg.use_scale:
        params["scale"] = module.param("scale", cfg.scale_init, feature_shape,
                                       cfg.param_dtype)
    if cfg.use_bias:
        params["bias"] = module.param("bias", cfg.bias_init, feature_shape, cfg.param_dtype)
    state = {"mean": mean.value, "var": var.value}
    state.update({k: v.value for k, v in extra.items()})
    if initializing:  # the new state is discarded: hand the core exact float32 (or wider)
        # copies, so that it does not warn about updates of low-precision statistics
        state["mean"], state["var"] = (v.astype(jnp.promote_types(v.dtype, jnp.float32))
                                       for v in (state["mean"], state["var"]))
    out_dtype = flax_dtypes.canonicalize_dtype(x, *params.values(), dtype=cfg.dtype)
    options = from_attributes(cfg, axis=axis, renorm=as_hashable(cfg.renorm),
                              axis_name=None if initializing else cfg.axis_name,
                              axis_index_groups=None if initializing else cfg.axis_index_groups)
    y, new = call_core(x, params, state, train, options, mask, out_dtype)
    if train and not initializing:
        mean.value, var.value = new["mean"], new["var"]
        for k, v in extra.items():
            v.value = new[k]
    return y
