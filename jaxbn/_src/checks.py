"""Checks of the arrays of a call (``x``, ``params``, ``state``, ``mask``, ``train``) and of
what their shapes allow: clear errors at trace time, naming what was expected.

:mod:`jaxbn._src.option_checks` checks the option values. Every check runs in Python while
``bn_apply`` is traced: it costs nothing at run time.

Example:
  >>> from jaxbn._src.checks import check_input
  >>> check_input(3.0)
  Traceback (most recent call last):
  ...
  TypeError: x must be an array, got float
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn._src.layout import Dim, Layout, as_index, describe_dim, is_static, provably_equal

PARAM_KEYS = ("scale", "bias")
STATE_KEYS = ("mean", "var", "count", "seen")  # "count" and "seen" are optional


def describe(v) -> str:
    """How an error message names a given value: an array by type, dtype and shape."""
    if hasattr(v, "dtype") and hasattr(v, "shape"):
        return f"{type(v).__name__} of dtype {v.dtype} and shape {tuple(v.shape)}"
    return f"{v!r} ({type(v).__name__})"


def check_train_flag(train) -> None:
    if not isinstance(train, (bool, np.bool_)):
        raise TypeError(f"train must be a Python bool (it selects the computation at trace "
                        f"time), got {type(train).__name__}; use jax.lax.cond on two calls "
                        f"for a traced flag")


def check_input(x) -> jax.Array:
    """``x`` as an array: any floating (or complex) array-like with at least one axis."""
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        if isinstance(x, (str, bytes, Mapping)) or not hasattr(x, "__len__"):
            raise TypeError(f"x must be an array, got {type(x).__name__}")
        x = np.asarray(x)
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype,
                                                                    jnp.complexfloating)):
        raise TypeError(f"x must have a floating dtype (float16, bfloat16, float32, float64; "
                        f"or complex), got {x.dtype}")
    if x.ndim == 0:
        raise ValueError("x must have at least one axis (the feature axis), got a scalar")
    return x if isinstance(x, jax.Array) else jnp.asarray(x)


def _keys_error(what: str, expected: str, given: list, hint: str = "") -> ValueError:
    return ValueError(f"{what} must have keys {expected}, got keys {given}{hint}")


def check_params(params) -> dict:
    """``params`` is a mapping whose keys are among ``scale`` and ``bias``; returns it as a
    dict of arrays (array-likes such as lists are accepted)."""
    expected = "among ('scale', 'bias') (as made by bn_init; {} for neither)"
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict with keys {expected}, got {describe(params)}")
    unknown = [k for k in params if k not in PARAM_KEYS]
    if unknown:
        hint = ""
        if "mean" in params or "var" in params:
            hint = "; params and state look swapped: call bn_apply(params, state, x, train)"
        raise _keys_error("params", expected, sorted(map(str, params)),
                          hint + f" (unknown: {unknown})" if not hint else hint)
    out = {}
    for key, value in params.items():
        value = value if isinstance(value, jax.Array) else jnp.asarray(value)
        if not jnp.issubdtype(value.dtype, jnp.inexact):
            raise TypeError(f"params[{key!r}] must be a floating array, got {describe(value)}")
        out[key] = value
    return out


def check_state(state) -> dict:
    """``state`` is a mapping with ``mean`` and ``var`` and optionally ``count`` and ``seen``;
    returns it as a dict, ``count`` an integer scalar array (a Python int is accepted)."""
    expected = "'mean' and 'var', optionally 'count' and 'seen' (as made by bn_init)"
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict with keys {expected}, got {describe(state)}")
    given = sorted(map(str, state))
    if "scale" in state or "bias" in state:
        raise _keys_error("state", expected, given, "; params and state look swapped: call "
                          "bn_apply(params, state, x, train)")
    missing = [k for k in ("mean", "var") if k not in state]
    unknown = [k for k in state if k not in STATE_KEYS]
    if missing or unknown:
        raise _keys_error("state", expected, given, f" (missing: {missing}, unknown: {unknown})")
    out = dict(state)
    for key in ("mean", "var"):
        dt = getattr(state[key], "dtype", None)
        if dt is None or not jnp.issubdtype(dt, jnp.inexact):
            raise TypeError(f"state[{key!r}] must be a floating array, got "
                            f"{describe(state[key])}")
    if "count" in state:
        count = state["count"]
        if isinstance(count, (bool, np.bool_)) or not (
                isinstance(count, (int, np.integer)) or jnp.issubdtype(
                    getattr(count, "dtype", np.float64), jnp.integer)):
            raise TypeError(f"state['count'] must be an integer scalar (the number of updates), "
                            f"got {describe(count)}")
        if isinstance(count, (int, np.integer)):
            count = jnp.asarray(count, jnp.int32)
        if np.shape(count) != ():
            raise ValueError(f"state['count'] must be a scalar (one update count per layer), "
                             f"got shape {tuple(np.shape(count))}")
        out["count"] = count
    return out


def check_features(layout: Layout, tree: Mapping, what: str) -> None:
    for key, value in tree.items():
        if key == "count":
            continue
        if tuple(np.shape(value)) != layout.feature_shape:
            raise ValueError(
                f"{what}[{key!r}] has shape {tuple(np.shape(value))} but x of shape "
                f"{layout.shape} has features {layout.feature_shape} along axis "
                f"{layout.feature_axes}; pass axis= for the feature axis, or bn_init with the "
                f"right features")


def _broadcasts_to(shape: tuple[Dim, ...], target: tuple[Dim, ...]) -> bool:
    """``shape`` broadcasts to ``target``: each size, aligned from the right, is 1 or the
    target's (for symbolic sizes: provably so, whatever values the symbols take)."""
    if len(shape) > len(target):
        return False
    return all(provably_equal(s, 1) or provably_equal(s, t)
               for s, t in zip(shape, target[len(target) - len(shape):], strict=True))


def check_mask(mask, x_shape: tuple[Dim, ...]):
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be boolean, got dtype {mask.dtype}")
    if not _broadcasts_to(tuple(mask.shape), x_shape):
        symbolic = ""
        if not all(is_static(d) for d in tuple(mask.shape) + tuple(x_shape)):
            symbolic = (" (with symbolic sizes, each of the mask's sizes must be 1 or the same "
                        "expression as x's, for every value of the symbols)")
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to x's shape "
                         f"{x_shape}{symbolic}")
    return mask


def check_enough_elements(layout: Layout, mask, devices: int = 1,
                          virtual_batch_size: int | None = None,
                          allow_single_value: bool = False) -> None:
    """Refuses a batch with exactly one value per feature (the variance is undefined).

    The count is the global one: this device's elements times ``devices``, the number of
    devices pooled over; with ``virtual_batch_size``, the elements of one ghost batch (ghost
    batches are per device, so ``devices`` does not count). An empty
    batch (count 0) is accepted: ``y`` is empty and the state is left unchanged. With a mask
    the count is only known at run time and is not checked here.

    With symbolic sizes (``jax.export``) the count is an expression: a count that is 1 for
    every value of the symbols raises; one that may be 1 for some values (``b`` for a batch
    ``(b, 8)``) cannot be refused at trace time and is accepted, as with ``allow_single_value``
    (the exported function then gives variance 0 and ``y = bias`` for a batch of one). To
    refuse it there, export with a constraint: ``jax.export.symbolic_shape("b, 8",
    constraints=("b >= 2",))`` makes the exported function raise when called with ``b = 1``.
    """
    if mask is not None or allow_single_value:
        return
    local = layout.local_count
    vb = ""
    if virtual_batch_size is not None:  # ghost batches are each device's own groups
        # the elements of one ghost batch: virtual_batch_size rows of the other reduced axes
        # (none when the batch is empty)
        rows = math.prod(layout.shape[a] for a in layout.reduce_axes if a != 0)
        local = 0 if provably_equal(layout.shape[0], 0) else rows * virtual_batch_size
        vb = f" in each ghost batch of virtual_batch_size={virtual_batch_size}"
        devices = 1
    total = local * devices
    if provably_equal(total, 1):
        pooled = f" over the {devices} pooled device(s)" if devices > 1 else ""
        raise ValueError(
            f"training needs more than one value per feature to compute a variance; x of "
            f"shape {layout.shape} with features on axis {layout.feature_axes} gives 1 value "
            f"per feature{vb}{pooled}. Use train=False, a larger batch, axis_name to pool "
            f"over devices, or allow_single_value=True (variance 0: y = bias, as flax.linen)")


def check_virtual_batch(x_shape: tuple[Dim, ...], feature_axes,
                        virtual_batch_size) -> int | None:
    """Returns ``virtual_batch_size`` as an int (or None) after checking it splits axis 0."""
    if virtual_batch_size is None:
        return None
    size = as_index(virtual_batch_size, "virtual_batch_size")
    if size < 1:
        raise ValueError(f"virtual_batch_size must be a positive int, got {virtual_batch_size!r}")
    if 0 in feature_axes:
        raise ValueError("virtual_batch_size splits axis 0 (the batch), which is a feature axis "
                         "here")
    remainder = x_shape[0] % size
    if not is_static(remainder):  # a symbolic batch size (jax.export) not known to divide
        raise ValueError(
            f"the batch size {describe_dim(x_shape[0])} (axis 0) is not known to be divisible "
            f"by virtual_batch_size={size}: ghost batches split axis 0 into groups of {size}, "
            f"which needs a batch size that is a multiple of {size} for every value of the "
            f"symbols. Export with a batch dimension written as one, e.g. "
            f"jax.export.symbolic_shape('{size}*k, ...')")
    if remainder:
        raise ValueError(f"the batch size {x_shape[0]} (axis 0) is not divisible by "
                         f"virtual_batch_size={size}")
    return size
