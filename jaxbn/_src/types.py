"""The public types of the functional API: ``Params``, ``State`` and ``Axis``.

``Params`` and ``State`` are TypedDicts, so a type checker tells them apart: passing the state
where the parameters go (``bn_apply(state, params, ...)``) is an error before anything runs.
At run time both are plain dicts of arrays (pytrees), as ``bn_init`` returns them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NotRequired, TypeAlias, TypedDict

import jax


class Params(TypedDict, total=False):
    """BatchNorm's learned parameters: a dict of arrays of the features' shape.

    Both keys are optional: ``bn_init(..., use_scale=False)`` leaves out ``scale`` (as if it
    were ones) and ``use_bias=False`` leaves out ``bias`` (as if zeros).

    Attributes:
      scale: the learned scale ``gamma``, initialized to ones.
      bias: the learned shift ``beta``, initialized to zeros.

    Example:
      >>> import jax.numpy as jnp, jaxbn
      >>> params: jaxbn.Params = {"scale": jnp.full(3, 2.0)}  # no bias: shift of zero
      >>> y, _ = jaxbn.bn_apply(params, jaxbn.bn_init(3)[1], jnp.eye(3), train=False)
      >>> y.round(2).tolist()[0]
      [2.0, 0.0, 0.0]
    """

    scale: jax.Array
    bias: jax.Array


class State(TypedDict):
    """BatchNorm's running statistics: a dict of arrays, float32 or wider.

    ``mean`` and ``var`` have the features' shape; ``count`` and ``seen`` are optional.
    ``bn_apply(train=True)`` returns a new state with the same keys; no gradient flows into it.

    Attributes:
      mean: the running mean (zeros at first).
      var: the running (biased, unless ``unbiased_running_var``) variance (ones at first).
      count: the number of running-statistic updates so far (an int32 scalar); needed by
        ``momentum=None`` (a cumulative average). ``bn_init`` includes it.
      seen: only while precise statistics are accumulated (between ``jaxbn.reset_stats`` and
        ``jaxbn.finish_stats``): how many elements each feature has seen.

    Example:
      >>> import jaxbn
      >>> _, state = jaxbn.bn_init(2)
      >>> sorted(state), state["count"].dtype.name
      (['count', 'mean', 'var'], 'int32')
    """

    mean: jax.Array
    var: jax.Array
    count: NotRequired[jax.Array]
    seen: NotRequired[jax.Array]


Axis: TypeAlias = int | Sequence[int]
"""The feature axis of ``x``, or a tuple of them; negative values count from the end.

``-1`` (the default) suits NHWC and ``(N, C)`` input, ``1`` NCHW, ``(1, 2)`` a tuple of
feature axes (statistics per ``(x.shape[1], x.shape[2])`` element)."""
