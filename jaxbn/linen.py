"""``jaxbn.linen.BatchNorm``: a drop-in replacement for ``flax.linen.BatchNorm``.

Same fields, same call, same variables (``params/{scale,bias}``, ``batch_stats/{mean,var}``):
change the import and keep your code and checkpoints. What differs: the variance is always
computed stably (``use_fast_variance`` is accepted and ignored: the stable path is as fast),
statistics across devices are count-weighted (right with masks), and the fields after
``force_float32_reductions`` add jaxbn's features.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxbn.linen import BatchNorm
  >>> bn = BatchNorm(use_running_average=False, momentum=0.9)
  >>> x = jnp.arange(12.0).reshape(4, 3)
  >>> variables = bn.init(jax.random.key(0), x)
  >>> y, updates = bn.apply(variables, x, mutable=["batch_stats"])
  >>> updates["batch_stats"]["mean"].round(4).tolist()
  [0.44999998807907104, 0.550000011920929, 0.6499999761581421]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from jaxbn._src import optional
from jaxbn._src.flax_common import Extras, apply_core, as_hashable, state_dtypes
from jaxbn._src.layout import make_layout

try:  # Flax is optional (pip install 'jaxbn[flax]'): only this module and jaxbn.nnx need it
    import flax
    import flax.linen as nn
    from flax.linen import dtypes as flax_dtypes
except ModuleNotFoundError as err:
    optional.raise_missing("flax", __name__, err)
optional.check_version("flax", flax.__version__, __name__)


class BatchNorm(nn.BatchNorm):
    """BatchNorm layer with the fields and variables of ``flax.linen.BatchNorm``.

    It subclasses ``flax.linen.BatchNorm`` so that ``isinstance(m, flax.linen.BatchNorm)``
    holds (code that freezes, folds or counts BatchNorm layers by type finds it); every
    computation is jaxbn's (``__call__`` is replaced, nothing of Flax's runs).

    Attributes (Flax's): use_running_average, axis (an int or a tuple), momentum, epsilon,
      dtype, param_dtype, use_bias, use_scale, bias_init, scale_init, axis_name,
      axis_index_groups, use_fast_variance (ignored: always stable),
      force_float32_reductions (the dtype of the created statistics; they are computed in
      float32 or wider either way).
    Attributes (jaxbn's; see ``jaxbn.bn_apply``): unbiased_running_var, virtual_batch_size,
      renorm, skip_nonfinite. ``momentum=None`` keeps a cumulative average and adds a
      ``batch_stats/count`` variable.
    """

    axis: int | Sequence[int] = -1  # type: ignore[assignment]
    momentum: float | None = 0.99  # type: ignore[assignment]
    unbiased_running_var: bool = False
    virtual_batch_size: int | None = None
    renorm: tuple[Any, Any] | None = None
    skip_nonfinite: bool = False

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalizes ``x``; with batch statistics unless ``use_running_average``.

        During ``init`` in training mode ``x`` is normalized with its own statistics, but the
        running statistics are not updated and no collective is issued (as in Flax), so a
        module with ``axis_name`` can be initialized outside ``pmap``/``shard_map``.
        """
        use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                             use_running_average)
        axis = as_hashable(self.axis)
        feature_shape = make_layout(x.shape, axis).feature_shape
        declared = jnp.float32 if self.force_float32_reductions else self.param_dtype
        mean_dt, var_dt = state_dtypes(declared, x.dtype, self.dtype)
        mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, mean_dt),
                             feature_shape)
        var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, var_dt),
                            feature_shape)
        extra = {}  # optional state: update count (momentum=None), seen (precise BN)
        if self.momentum is None or self.has_variable("batch_stats", "count"):
            extra["count"] = self.variable("batch_stats", "count",
                                           lambda: jnp.zeros((), jnp.int32))
        if self.has_variable("batch_stats", "seen"):
            extra["seen"] = self.variable("batch_stats", "seen",
                                          lambda: None)  # type: ignore[arg-type,return-value]
        params = {}
        if self.use_scale:
            params["scale"] = self.param("scale", self.scale_init, feature_shape,
                                         self.param_dtype)
        if self.use_bias:
            params["bias"] = self.param("bias", self.bias_init, feature_shape, self.param_dtype)
        state = {"mean": mean.value, "var": var.value}
        state.update({k: v.value for k, v in extra.items()})
        out_dtype = flax_dtypes.canonicalize_dtype(x, *params.values(), dtype=self.dtype)
        train = not use_running_average
        initializing = self.is_initializing()
        y, new = apply_core(
            x, params, state, train, axis=axis, momentum=self.momentum,
            epsilon=self.epsilon, axis_name=None if initializing else self.axis_name,
            axis_index_groups=None if initializing else self.axis_index_groups, mask=mask,
            out_dtype=out_dtype,
            extras=Extras(self.unbiased_running_var, self.virtual_batch_size,
                          as_hashable(self.renorm), self.skip_nonfinite))
        if train and not initializing:
            mean.value, var.value = new["mean"], new["var"]
            for k, v in extra.items():
                v.value = new[k]
        return y
