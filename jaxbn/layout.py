"""Shapes and axes: which axes hold features, which are reduced, and how to broadcast.

Every other module asks this one how a per-feature vector lines up with ``x``; nothing
else normalizes axes.

Example:
    >>> from jaxbn.layout import make_layout
    >>> lay = make_layout((8, 3, 5, 5), axis=1)
    >>> lay.feature_shape, lay.reduce_axes, lay.broadcast_shape
    ((3,), (0, 2, 3), (1, 3, 1, 1))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

Axis = int | Sequence[int]


class Layout(NamedTuple):
    """Static description of how ``x`` splits into feature and reduced axes."""

    shape: tuple[int, ...]
    feature_axes: tuple[int, ...]  # sorted, non-negative
    reduce_axes: tuple[int, ...]
    feature_shape: tuple[int, ...]  # sizes of x along feature_axes
    broadcast_shape: tuple[int, ...]  # x.ndim entries, 1 on reduced axes

    @property
    def local_count(self) -> int:
        """Number of elements reduced per feature on this device (no mask)."""
        return math.prod(self.shape[a] for a in self.reduce_axes)


def canonicalize_axes(ndim: int, axis: Axis) -> tuple[int, ...]:
    """Returns ``axis`` as sorted non-negative ints; raises ValueError when out of range."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if not axes:
        raise ValueError("axis must name at least one feature axis, got an empty tuple")
    out = []
    for a in axes:
        if not isinstance(a, int) or isinstance(a, bool):
            raise TypeError(f"axis entries must be ints, got {a!r} in axis={axis!r}")
        if not -ndim <= a < ndim:
            raise ValueError(
                    f"axis {a} is out of range for an input of rank {ndim} "
                    f"(valid: {-ndim}..{ndim - 1}); axis={axis!r}")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis={axis!r} names the same axis twice for rank {ndim}")
    return tuple(sorted(out))


def make_layout(shape: Sequence[int], axis: Axis) -> Layout:
    """Builds the :class:`Layout` of an input of ``shape`` with feature axes ``axis``."""
    shape = tuple(int(s) for s in shape)
    feature_axes = canonicalize_axes(len(shape), axis)
    reduce_axes = tuple(a for a in range(len(shape)) if a not in feature_axes)
    feature_shape = tuple(shape[a] for a in feature_axes)
    broadcast_shape = tuple(shape[a] if a in feature_axes else 1 for a in range(len(shape)))
    return Layout(shape, feature_axes, reduce_axes, feature_shape, broadcast_shape)


def as_features(shape: int | Sequence[int]) -> tuple[int, ...]:
    """Normalizes ``features`` (an int or a tuple of ints) to a tuple of positive ints."""
    feats = (shape,) if isinstance(shape, int) else tuple(shape)
    if not feats or any((not isinstance(f, int)) or isinstance(f, bool) or f <= 0 for f in feats):
        raise ValueError(f"features must be a positive int or a tuple of them, got {shape!r}")
    return feats
