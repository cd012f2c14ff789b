"""Checks of the option values (``Options`` fields, ``bn_init``'s dtypes): clear errors at
trace time, naming what was expected.

These need no input array; :mod:`jaxbn._src.checks` checks the arrays of a call. Every check
runs in Python while the call is traced: it costs nothing at run time.

Example:
  >>> from jaxbn._src.option_checks import check_momentum
  >>> check_momentum(1.5)
  Traceback (most recent call last):
  ...
  ValueError: momentum must be a real number in [0, 1] (or None for a cumulative average), got 1.5
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn._src.checks import describe


def _is_tracer(v) -> bool:
    return isinstance(v, jax.core.Tracer)


def _concrete_real(value, what: str) -> float | None:
    """``value`` as a float when it is a concrete real scalar; None when traced.

    Raises TypeError for bools, strings, complex numbers and non-scalar arrays.
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be a real number, got the bool {value!r}")
    if _is_tracer(value):
        if value.shape != () or not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(f"{what} must be a real scalar, got a traced {describe(value)}")
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        dt = np.dtype(value.dtype)
        if value.shape == () and (np.issubdtype(dt, np.floating) or np.issubdtype(dt, np.integer)
                                  or dt == jnp.bfloat16):
            return float(value)
    raise TypeError(f"{what} must be a real number, got {describe(value)}")


def check_flag(value, name: str) -> None:
    """``value`` is a Python (or NumPy) bool: these options select code at trace time."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {describe(value)}")


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
                        f"{describe(epsilon)}")
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


def check_param_dtype(dtype) -> None:
    """``scale``/``bias`` must be floating: a learned parameter cannot be an integer."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"param_dtype must be a floating dtype, got {dtype!r}") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"param_dtype must be a floating dtype (float32, bfloat16, ...), got "
                        f"{dt}")


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
