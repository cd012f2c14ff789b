"""Shapes and axes: which axes hold features, which are reduced, and how to broadcast.

Every other module asks this one how a per-feature vector lines up with ``x``; nothing
else normalizes axes.

A size is a Python int, or, when ``x`` is traced by ``jax.export`` with a symbolic shape
(``jax.export.symbolic_shape("b, 8")``), a symbolic dimension: an expression in the shape's
symbols whose value is only known when the exported function is called. Sizes are never
passed to ``int()``: a static size stays a Python int (the computation, and the compiled
program, are then those of an ordinary call), a symbolic one stays an expression, and where
a value is needed it becomes a ``jnp`` value (:func:`as_count`).

Example:
    >>> from jaxbn._src.layout import make_layout
    >>> lay = make_layout((8, 3, 5, 5), axis=1)
    >>> lay.feature_shape, lay.reduce_axes, lay.broadcast_shape
    ((3,), (0, 2, 3), (1, 3, 1, 1))
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

Axis = int | Sequence[int]
#: A size along one axis: a Python int, or a symbolic dimension of ``jax.export`` (an
#: expression such as ``b`` or ``4*k``, whose value is known only when the export is called).
Dim = Any


def is_static(size: Dim) -> bool:
    """True for a size known at trace time (a Python int); False for a symbolic dimension.

    >>> from jax import export
    >>> is_static(8), is_static(export.symbolic_shape("b")[0])
    (True, False)
    """
    return not jax_export.is_symbolic_dim(size)


def as_dim(size: Any) -> Dim:
    """One entry of a shape: a symbolic dimension as it is, anything else as a Python int."""
    return size if jax_export.is_symbolic_dim(size) else operator.index(size)


def describe_dim(size: Dim) -> str:
    """``size`` for an error message: ``8``, or ``'b' (symbolic)``."""
    return str(size) if is_static(size) else f"'{size}' (symbolic)"


def provably(decide) -> bool | None:
    """The answer to a comparison of sizes, or None when symbolic sizes leave it open.

    ``decide`` is a function of no arguments making the comparison (``lambda: n >= 2``):
    with symbolic sizes JAX decides it from the symbols' bounds (every symbol is >= 1, plus
    the export's constraints) or raises ``InconclusiveDimensionOperation``, returned here as
    None. Equality is not decided this way: ``==`` on a symbolic size answers False when it
    cannot prove equality (use :func:`provably_equal`).
    """
    try:
        return bool(decide())
    except jax.errors.InconclusiveDimensionOperation:
        return None


def provably_equal(a: Dim, b: Dim) -> bool:
    """True when sizes ``a`` and ``b`` are equal for every value of their symbols."""
    if a == b:  # for symbolic sizes, True only when their difference is the constant 0
        return True
    if is_static(a) and is_static(b):
        return False
    return provably(lambda: a >= b) is True and provably(lambda: b >= a) is True


def as_count(n: Dim, dtype: Any) -> Any:
    """A number of elements for arithmetic: a static count as the Python int it is (folded at
    trace time, as in an ordinary call), a symbolic one (``jax.export``) as a scalar ``jnp``
    value of ``dtype``, computed when the exported function runs.

    >>> as_count(6, jnp.float32)
    6
    """
    return n if is_static(n) else jnp.asarray(n, dtype)


def typed_sharding(x) -> tuple[Any, tuple] | None:
    """``(mesh, spec)`` of the sharding in ``x``'s type (the spec with one entry per axis), or
    None when its type names no mesh with axes (outside any mesh, or a NumPy array)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if sharding is None or mesh is None or not mesh.axis_names:
        return None
    spec = tuple(sharding.spec)
    return mesh, spec + (None,) * (len(x.shape) - len(spec))


class Layout(NamedTuple):
    """Static description of how ``x`` splits into feature and reduced axes."""

    shape: tuple[Dim, ...]  # Python ints, or symbolic dimensions under jax.export
    feature_axes: tuple[int, ...]  # sorted, non-negative
    reduce_axes: tuple[int, ...]
    feature_shape: tuple[Dim, ...]  # sizes of x along feature_axes
    broadcast_shape: tuple[Dim, ...]  # x.ndim entries, 1 on reduced axes

    @property
    def local_count(self) -> Dim:
        """Number of elements reduced per feature on this device (no mask): a Python int,
        or a symbolic dimension when a reduced axis has a symbolic size."""
        return math.prod(self.shape[a] for a in self.reduce_axes)


def as_index(value: Any, what: str) -> int:
    """``value`` as a Python int: ints, NumPy integers and concrete 0-d integer arrays pass;
    bools, floats and traced values raise a TypeError naming ``what``."""
    if isinstance(value, (bool, np.bool_)) or getattr(value, "dtype", None) == np.bool_:
        raise TypeError(f"{what} must be an int, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        pass
    except Exception as err:  # a tracer: jax raises its own ConcretizationTypeError subclass
        raise TypeError(f"{what} must be a static (concrete) int, got a traced value: "
                        f"{value!r}") from err
    kind = f"{type(value).__name__}"
    if hasattr(value, "dtype"):
        kind += f" of dtype {value.dtype} and shape {tuple(value.shape)}"
    raise TypeError(f"{what} must be an int, got {value!r} ({kind})")


def _int_or_tuple(value: Any, what: str) -> tuple[int, ...]:
    """An int (any integer type) or a sequence of them, as a tuple of Python ints."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{what} must be an int or a tuple of ints, got {value!r}")
    if np.ndim(value) == 0 or not hasattr(value, "__iter__"):
        return (as_index(value, what),)
    return tuple(as_index(v, f"each entry of {what}={value!r}") for v in value)


def canonicalize_axes(ndim: int, axis: Axis) -> tuple[int, ...]:
    """Returns ``axis`` as sorted non-negative ints; raises ValueError when out of range."""
    axes = _int_or_tuple(axis, "axis")
    if not axes:
        raise ValueError("axis must name at least one feature axis, got an empty tuple")
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                    f"axis {a} is out of range for an input of rank {ndim} "
                    f"(valid: {-ndim}..{ndim - 1}); axis={axis!r}")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis={axis!r} names the same axis twice for rank {ndim}")
    return tuple(sorted(out))


def make_layout(shape: Sequence[Dim], axis: Axis) -> Layout:
    """Builds the :class:`Layout` of an input of ``shape`` with feature axes ``axis``.

    ``shape`` holds ints (any integer type), or symbolic dimensions (``jax.export``), which are
    kept as they are.
    """
    shape = tuple(as_dim(s) for s in shape)
    feature_axes = canonicalize_axes(len(shape), axis)
    reduce_axes = tuple(a for a in range(len(shape)) if a not in feature_axes)
    feature_shape = tuple(shape[a] for a in feature_axes)
    broadcast_shape = tuple(shape[a] if a in feature_axes else 1 for a in range(len(shape)))
    return Layout(shape, feature_axes, reduce_axes, feature_shape, broadcast_shape)


def as_features(shape: int | Sequence[int]) -> tuple[int, ...]:
    """Normalizes ``features`` (an int or a tuple of ints) to a tuple of positive ints."""
    feats = _int_or_tuple(shape, "features")
    if not feats or any(f <= 0 for f in feats):
        raise ValueError(f"features must be a positive int or a tuple of them, got {shape!r}")
    return feats
