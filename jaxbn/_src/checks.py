"""Input validation for bn_apply: clear errors at trace time, naming what was expected.

Every check here runs in Python while ``bn_apply`` is traced: it costs nothing at run time.

Example:
  >>> from jaxbn._src.checks import check_momentum
  >>> check_momentum(1.5)
  Traceback (most recent call last):
  ...
  ValueError: momentum must be a real number in [0, 1] (or None for a cumulative average), got 1.5
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn._src.layout import Dim, Layout, as_index, describe_dim, is_static, provably_equal

PARAM_KEYS = ("scale", "bias")
STATE_KEYS = ("mean", "var", "count", "seen")  # "count" and "seen" are optional


def _is_tracer(v) -> bool:
    return isinstance(v, jax.core.Tracer)


def _describe(v) -> str:
    if hasattr(v, "dtype") and hasattr(v, "shape"):
        return f"{type(v).__name__} of dtype {v.dtype} and shape {tuple(v.shape)}"
    return f"{v!r} ({type(v).__name__})"


def _concrete_real(value, what: str) -> float | None:
    """``value`` as a float when it is a concrete real scalar; None when traced.

    Raises TypeError for bools, strings, complex numbers and non-scalar arrays.
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be a real number, got the bool {value!r}")
    if _is_tracer(value):
        if value.shape != () or not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(f"{what} must be a real scalar, got a traced {_describe(value)}")
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        dt = np.dtype(value.dtype)
        if value.shape == () and (np.issubdtype(dt, np.floating) or np.issubdtype(dt, np.integer)
                                  or dt == jnp.bfloat16):
            return float(value)
    raise TypeError(f"{what} must be a real number, got {_describe(value)}")


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


def check_flag(value, name: str) -> None:
    """``value`` is a Python (or NumPy) bool: these options select code at trace time."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {_describe(value)}")


def check_axis_name(axis_name) -> None:
    """None, one hashable name, or a non-empty tuple/list of distinct names."""
    if axis_name is None or not isinstance(axis_name, (tuple, list)):
        return
    if not axis_name:
        raise ValueError(f"axis_name={axis_name!r} names no axis: pass the name of a pmap, "
                         f"shard_map or vmap axis, or None for per-device statistics")
    dup = sorted({str(n) for n in axis_name if list(axis_name).count(n) > 1})
    if dup:
        raise ValueError(f"axis_name={axis_name!r} names {dup} more than once: each device "
                         f"would be counted once per repetition; name each axis once")


def check_param_dtype(dtype) -> None:
    """``scale``/``bias`` must be floating: a learned parameter cannot be an integer."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"param_dtype must be a floating dtype, got {dtype!r}") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"param_dtype must be a floating dtype (float32, bfloat16, ...), got "
                        f"{dt}")


def check_train_flag(train) -> None:
    if not isinstance(train, (bool, np.bool_)):
        raise TypeError(f"train must be a Python bool (it selects the computation at trace "
                        f"time), got {type(train).__name__}; use jax.lax.cond on two calls "
                        f"for a traced flag")


def check_momentum(momentum) -> None:
    """None, or a real scalar in [0, 1]; a traced float scalar is accepted unchecked."""
    if momentum is None:
        return
    value = _concrete_real(momentum, "momentum")
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"momentum must be a real number in [0, 1] (or None for a cumulative "
                         f"average), got {momentum}")


def check_epsilon(epsilon, dtype: Any = jnp.float32) -> float:
    """Returns ``epsilon`` as a float: finite, > 0 and not zero (or subnormal) in ``dtype``."""
    if _is_tracer(epsilon):
        raise TypeError(f"epsilon must be a concrete (static) number, got a traced "
                        f"{_describe(epsilon)}")
    value = _concrete_real(epsilon, "epsilon")
    assert value is not None
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon}")
    tiny = float(jnp.finfo(dtype).tiny)
    if value < tiny:
        raise ValueError(f"epsilon={epsilon} is zero or subnormal in {jnp.dtype(dtype).name} "
                         f"(the statistics dtype) and would not keep 1/sqrt(var + epsilon) "
                         f"finite; use epsilon >= {tiny:.3g}")
    return value


def _keys_error(what: str, expected: str, given: list, hint: str = "") -> ValueError:
    return ValueError(f"{what} must have keys {expected}, got keys {given}{hint}")


def check_params(params) -> dict:
    """``params`` is a mapping whose keys are among ``scale`` and ``bias``; returns it as a
    dict of arrays (array-likes such as lists are accepted)."""
    expected = "among ('scale', 'bias') (as made by bn_init; {} for neither)"
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict with keys {expected}, got {_describe(params)}")
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
            raise TypeError(f"params[{key!r}] must be a floating array, got {_describe(value)}")
        out[key] = value
    return out


def check_state(state) -> dict:
    """``state`` is a mapping with ``mean`` and ``var`` and optionally ``count`` and ``seen``;
    returns it as a dict, ``count`` an integer scalar array (a Python int is accepted)."""
    expected = "'mean' and 'var', optionally 'count' and 'seen' (as made by bn_init)"
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict with keys {expected}, got {_describe(state)}")
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
                            f"{_describe(state[key])}")
    if "count" in state:
        count = state["count"]
        if isinstance(count, (bool, np.bool_)) or not (
                isinstance(count, (int, np.integer)) or jnp.issubdtype(
                    getattr(count, "dtype", np.float64), jnp.integer)):
            raise TypeError(f"state['count'] must be an integer scalar (the number of updates), "
                            f"got {_describe(count)}")
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


def check_groups(axis_name, axis_index_groups) -> None:
    if axis_index_groups is not None and axis_name is None:
        raise ValueError("axis_index_groups was given without axis_name; name the axis the "
                         "groups index")


def check_groups_cover(groups: tuple[tuple[int, ...], ...] | None, axis_size: int,
                       axis_name) -> None:
    """``groups`` must split the device indices ``0..axis_size-1`` into disjoint groups."""
    if groups is None:
        return
    flat = [i for g in groups for i in g]
    bad = sorted({i for i in flat if not 0 <= i < axis_size})
    dup = sorted({i for i in flat if flat.count(i) > 1})
    missing = sorted(set(range(axis_size)) - set(flat))
    if bad or dup or missing:
        raise ValueError(
            f"axis_index_groups must split the {axis_size} device indices 0..{axis_size - 1} "
            f"of axis_name={axis_name!r} into disjoint groups of equal size, got {groups} "
            f"(out of range: {bad}, repeated: {dup}, missing: {missing})")


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


def check_renorm(renorm) -> None:
    if renorm is None:
        return
    if not isinstance(renorm, (tuple, list)) or len(renorm) != 2:
        raise ValueError(f"renorm must be a pair (r_max, d_max), got {renorm!r}")
    r_max, d_max = renorm
    r = _concrete_real(r_max, "renorm r_max")
    d = _concrete_real(d_max, "renorm d_max")
    if r is not None and not r >= 1.0:
        raise ValueError(f"renorm r_max must be >= 1, got {r_max}")
    if d is not None and not d >= 0.0:
        raise ValueError(f"renorm d_max must be >= 0, got {d_max}")


def check_stats_dtype(dtype) -> jnp.dtype:
    """The dtype of running statistics: float32 or float64 (float64 needs jax_enable_x64)."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"stats_dtype must be a floating dtype (float32 or float64), got "
                        f"{dtype!r}") from None
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(f"stats_dtype must be float32 or float64 (running statistics in a "
                         f"narrower dtype stall: momentum * old rounds back to old), got {dt}")
    if dt == jnp.float64 and not jax.config.read("jax_enable_x64"):
        raise ValueError("stats_dtype=float64 needs 64-bit JAX: "
                         "jax.config.update('jax_enable_x64', True) before creating arrays")
    return dt

