"""Checks of ``jaxbn.equinox.BatchNorm``'s arguments (constructor and call), with Equinox's
meanings: clear errors naming what was expected.

Example:
  >>> from jaxbn._src.equinox_checks import checked_args
  >>> checked_args(3, "legacy", 0.9, 1e-5, False, None)
  ('ema', dtype('float32'))
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp

MODES = ("ema", "batch", "legacy")


def default_dtype() -> Any:
    """Equinox's default: float64 in 64-bit mode, else float32."""
    return jnp.dtype(jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32)


def checked_args(input_size: Any, mode: Any, momentum: Any, eps: Any, inference: Any,
                 dtype: Any) -> tuple[Literal["ema", "batch"], Any]:
    """Checks the constructor's arguments; returns ``(mode, dtype)`` as the layer keeps them:
    ``"legacy"`` is ``"ema"``, and ``dtype=None`` Equinox's default."""
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"input_size must be a positive int (the number of channels), "
                         f"got {input_size!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be 'ema' or 'batch' ('legacy' means 'ema'), got "
                         f"{mode!r}")
    mode = "ema" if mode == "legacy" else mode
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a Python float in [0, 1], got {momentum!r}")
    top = 1.0 if mode == "ema" else math.nextafter(1.0, 0.0)
    if not 0.0 <= momentum <= top:
        raise ValueError(f"momentum must be in [0, 1] (and below 1 with mode='batch', "
                         f"whose average is divided by 1 - momentum**k), got {momentum!r} "
                         f"with mode={mode!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (
            math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite Python float > 0, got {eps!r}")
    if not isinstance(inference, bool):
        raise TypeError(f"inference must be a bool, got {inference!r}")
    dtype = default_dtype() if dtype is None else jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a real floating dtype (float32, bfloat16, ...), "
                        f"got {dtype}")
    return mode, dtype


def check_call(x: Any, inference: Any, input_size: int, axis_name: Any) -> None:
    """Checks a call: ``inference`` a Python bool, ``x`` one example of shape
    ``(input_size, *spatial)``."""
    if not isinstance(inference, bool):
        raise TypeError(f"inference must be a Python bool (or None), got "
                        f"{type(inference).__name__}")
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) < 1 or shape[0] != input_size:
        raise ValueError(f"BatchNorm(input_size={input_size}) takes one example of "
                         f"shape (input_size, *spatial) = ({input_size}, ...), got "
                         f"shape {shape}; map over the batch with jax.vmap(..., "
                         f"axis_name={axis_name!r})")
