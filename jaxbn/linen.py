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
  >>> updates["batch_stats"]["mean"].tolist()
  [0.45000001788139343, 0.550000011920929, 0.6500000357627869]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes
from flax.linen import initializers

from jaxbn.flax_common import apply_core, jaxbn_extras
from jaxbn.layout import make_layout


class BatchNorm(nn.Module):
    """BatchNorm layer with the fields and variables of ``flax.linen.BatchNorm``.

    Attributes (Flax's): use_running_average, axis, momentum, epsilon, dtype, param_dtype,
      use_bias, use_scale, bias_init, scale_init, axis_name, axis_index_groups,
      use_fast_variance (ignored: always stable), force_float32_reductions.
    Attributes (jaxbn's; see ``jaxbn.bn_apply``): unbiased_running_var, virtual_batch_size,
      renorm, skip_nonfinite. ``momentum=None`` keeps a cumulative average and adds a
      ``batch_stats/count`` variable.
    """

    use_running_average: bool | None = None
    axis: int | Sequence[int] = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Any = initializers.zeros
    scale_init: Any = initializers.ones
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    unbiased_running_var: bool = False
    virtual_batch_size: int | None = None
    renorm: tuple[Any, Any] | None = None
    skip_nonfinite: bool = False

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalizes ``x``; with batch statistics unless ``use_running_average``.

        During ``init`` the statistics are not updated and no collective is issued, so a
        module with ``axis_name`` can be initialized outside ``pmap``/``shard_map``.
        """
        use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                             use_running_average)
        feature_shape = make_layout(x.shape, self.axis).feature_shape
        stat_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, stat_dtype),
                             feature_shape)
        var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, stat_dtype),
                            feature_shape)
        extra = {}  # optional state: update count (momentum=None), seen (precise BN)
        if self.momentum is None or self.has_variable("batch_stats", "count"):
            extra["count"] = self.variable("batch_stats", "count",
                                           lambda: jnp.zeros((), jnp.int32))
        if self.has_variable("batch_stats", "seen"):
            extra["seen"] = self.variable("batch_stats", "seen", lambda: None)
        params = {}
        if self.use_scale:
            params["scale"] = self.param("scale", self.scale_init, feature_shape,
                                         self.param_dtype)
        if self.use_bias:
            params["bias"] = self.param("bias", self.bias_init, feature_shape, self.param_dtype)
        state = {"mean": mean.value, "var": var.value}
        state.update({k: v.value for k, v in extra.items()})
        out_dtype = flax_dtypes.canonicalize_dtype(x, *params.values(), dtype=self.dtype)
        train = not use_running_average and not self.is_initializing()
        y, new = apply_core(
            x, params, state, train, axis=self.axis, momentum=self.momentum,
            epsilon=self.epsilon, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, mask=mask, out_dtype=out_dtype,
            extras=jaxbn_extras(self.unbiased_running_var, self.virtual_batch_size,
                                self.renorm, self.skip_nonfinite))
        if train:
            mean.value, var.value = new["mean"], new["var"]
            for k, v in extra.items():
                v.value = new[k]
        return y
