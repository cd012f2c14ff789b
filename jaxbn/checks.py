"""Input validation for bn_apply: clear errors at trace time, naming what was expected.

Example:
  >>> from jaxbn.checks import check_momentum
  >>> check_momentum(1.5)
  Traceback (most recent call last):
  ...
  ValueError: momentum must lie in [0, 1] (or be None for a cumulative average), got 1.5
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn.layout import Layout


def _is_concrete_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, jax.core.Tracer)


def check_input(x) -> None:
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"x must be an array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must have a floating dtype (float16, bfloat16, float32, float64), "
                        f"got {x.dtype}")
    if x.ndim == 0:
        raise ValueError("x must have at least one axis (the feature axis), got a scalar")


def check_train_flag(train) -> None:
    if not isinstance(train, (bool, np.bool_)):
        raise TypeError(f"train must be a Python bool (it selects the computation at trace "
                        f"time), got {type(train).__name__}; use jax.lax.cond on two calls "
                        f"for a traced flag")


def check_momentum(momentum) -> None:
    if momentum is None:
        return
    if _is_concrete_number(momentum) and not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1] (or be None for a cumulative average), "
                         f"got {momentum}")


def check_epsilon(epsilon) -> None:
    if not _is_concrete_number(epsilon):
        raise TypeError(f"epsilon must be a Python number, got {type(epsilon).__name__}")
    if not float(epsilon) > 0.0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")


def check_features(layout: Layout, tree: dict, what: str) -> None:
    for key, value in tree.items():
        if key == "count":
            continue
        if tuple(value.shape) != layout.feature_shape:
            raise ValueError(
                f"{what}[{key!r}] has shape {tuple(value.shape)} but x of shape {layout.shape} "
                f"has features {layout.feature_shape} along axis {layout.feature_axes}; "
                f"pass axis= for the feature axis, or bn_init with the right features")


def check_mask(mask, x_shape: tuple[int, ...]):
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be boolean, got dtype {mask.dtype}")
    try:
        out = np.broadcast_shapes(tuple(mask.shape), x_shape)
    except ValueError:
        out = None
    if out != x_shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to x's shape "
                         f"{x_shape}")
    return mask


def check_enough_elements(layout: Layout, mask, axis_name) -> None:
    if axis_name is None and mask is None and layout.local_count <= 1:
        raise ValueError(
            f"training needs more than one value per feature to compute a variance, got x of "
            f"shape {layout.shape} with features on axis {layout.feature_axes} (1 value each); "
            f"use train=False, a larger batch, or axis_name to pool over devices")


def check_groups(axis_name, axis_index_groups) -> None:
    if axis_index_groups is not None and axis_name is None:
        raise ValueError("axis_index_groups was given without axis_name; name the axis the "
                         "groups index")


def check_virtual_batch(x_shape: tuple[int, ...], feature_axes, virtual_batch_size) -> None:
    if virtual_batch_size is None:
        return
    if not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
        raise ValueError(f"virtual_batch_size must be a positive int, got {virtual_batch_size!r}")
    if 0 in feature_axes:
        raise ValueError("virtual_batch_size splits axis 0 (the batch), which is a feature axis "
                         "here")
    if x_shape[0] % virtual_batch_size:
        raise ValueError(f"the batch size {x_shape[0]} (axis 0) is not divisible by "
                         f"virtual_batch_size={virtual_batch_size}")


def check_renorm(renorm) -> None:
    if renorm is None:
        return
    if not isinstance(renorm, (tuple, list)) or len(renorm) != 2:
        raise ValueError(f"renorm must be a pair (r_max, d_max), got {renorm!r}")
    r_max, d_max = renorm
    if _is_concrete_number(r_max) and not r_max >= 1.0:
        raise ValueError(f"renorm r_max must be >= 1, got {r_max}")
    if _is_concrete_number(d_max) and not d_max >= 0.0:
        raise ValueError(f"renorm d_max must be >= 0, got {d_max}")
