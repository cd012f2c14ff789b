"""``jaxbn.nnx.BatchNorm``: a drop-in replacement for ``flax.nnx.BatchNorm``.

Same constructor, same ``nnx.Param`` (scale, bias) and ``nnx.BatchStat`` (mean, var)
attributes, and the same switches: ``model.train()``, ``model.eval()`` and ``nnx.view``.
What differs: the variance is always stable, statistics across devices are count-weighted,
and the keyword arguments after ``scale_metadata`` add jaxbn's features.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxbn.nnx import BatchNorm
  >>> bn = BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
  >>> y = bn(jnp.arange(12.0).reshape(4, 3))
  >>> bn.mean[...].tolist()
  [0.45000001788139343, 0.550000011920929, 0.6500000357627869]
  >>> bn.eval(); bn.use_running_average
  True
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from flax.nnx.nn import initializers

from jaxbn.flax_common import apply_core, jaxbn_extras
from jaxbn.precise import reset_stats

_ZEROS = initializers.zeros_init()
_ONES = initializers.ones_init()


class BatchNorm(nnx.Module):
    """BatchNorm layer with the constructor and attributes of ``flax.nnx.BatchNorm``.

    ``momentum=None`` keeps a cumulative average and adds a ``count`` BatchStat. jaxbn's extra
    options (``unbiased_running_var``, ``virtual_batch_size``, ``renorm``,
    ``skip_nonfinite``) are described in ``jaxbn.bn_apply``.
    """

    def __init__(self, num_features: int, *, use_running_average: bool | None = False,
                 axis: int = -1, momentum: float | None = 0.99, epsilon: float = 1e-5,
                 dtype: Any = None, param_dtype: Any = jnp.float32, use_bias: bool = True,
                 use_scale: bool = True, bias_init: Any = _ZEROS,
                 scale_init: Any = _ONES, axis_name: Any = None,
                 axis_index_groups: Any = None, use_fast_variance: bool = True,
                 promote_dtype: Any = nnx_dtypes.promote_dtype, rngs: nnx.Rngs,
                 bias_metadata: Mapping[str, Any] = MappingProxyType({}),
                 scale_metadata: Mapping[str, Any] = MappingProxyType({}),
                 unbiased_running_var: bool = False, virtual_batch_size: int | None = None,
                 renorm: tuple[Any, Any] | None = None, skip_nonfinite: bool = False):
        shape = (num_features,)
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        self.count = nnx.BatchStat(jnp.zeros((), jnp.int32)) if momentum is None else None
        self.scale = (nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata)
                      if use_scale else nnx.data(None))
        self.bias = (nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata)
                     if use_bias else nnx.data(None))
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.extras = jaxbn_extras(unbiased_running_var, virtual_batch_size, renorm,
                                   skip_nonfinite)

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view``: switches between batch and running statistics."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalizes ``x``; the call's ``use_running_average`` overrides the attribute."""
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError("no use_running_average was given: pass it to BatchNorm(...), to "
                             "the call, or set it with model.train()/model.eval()/nnx.view")
        params = {}
        if self.scale is not None:
            params["scale"] = self.scale[...]
        if self.bias is not None:
            params["bias"] = self.bias[...]
        names = self._stat_names()
        state = {k: getattr(self, k)[...] for k in names}
        promoted = self.promote_dtype((x, state["mean"], state["var"], *params.values()),
                                      dtype=self.dtype)
        train = not use_running_average
        y, new = apply_core(x, params, state, train, axis=self.axis, momentum=self.momentum,
                            epsilon=self.epsilon, axis_name=self.axis_name,
                            axis_index_groups=self.axis_index_groups, mask=mask,
                            extras=self.extras, out_dtype=promoted[0].dtype)
        if train:
            for k in names:
                getattr(self, k)[...] = new[k]
        return y

    def _stat_names(self) -> list[str]:
        """The BatchStat attributes that form the core's state dict (``count`` and ``seen``
        only when present)."""
        return ["mean", "var"] + [k for k in ("count", "seen") if getattr(self, k, None)
                                  is not None]


def precise_stats(model: nnx.Module, batches, call=None) -> None:
    """Recomputes, in place, the exact population statistics of every ``jaxbn.nnx.BatchNorm``
    in ``model`` over ``batches`` (precise BN; see ``jaxbn.precise``).

    ``call(model, batch)`` runs the model in training mode (default: ``model(batch)``).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxbn.nnx import BatchNorm, precise_stats
      >>> bn = BatchNorm(1, rngs=nnx.Rngs(0))
      >>> precise_stats(bn, [jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [6.0]])])
      >>> bn.mean[...].tolist(), bn.var[...].tolist()
      ([3.0], [5.0])
    """
    layers = [m for _, m in model.iter_modules() if isinstance(m, BatchNorm)]
    for m in layers:
        fresh = reset_stats({"mean": m.mean[...], "var": m.var[...]})
        m.mean[...], m.var[...] = fresh["mean"], fresh["var"]
        m.seen = nnx.BatchStat(fresh["seen"])
    model.train()
    try:
        for batch in batches:
            (call or (lambda mdl, b: mdl(b)))(model, batch)
    finally:
        for m in layers:
            del m.seen
