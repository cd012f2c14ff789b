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

import jax
from jax.typing import ArrayLike

from jaxbn._src import optional

try:  # Flax is optional (pip install 'jaxbn[flax]'): only this module and jaxbn.nnx need it
    import flax

    optional.check_version("flax", flax.__version__, __name__)  # before any use of Flax
    import flax.linen as nn

    from jaxbn._src.linen_intercept import intercept
    from jaxbn._src.linen_layer import BatchStatsNotMutableError, normalize
except ModuleNotFoundError as err:
    optional.raise_missing("flax", __name__, err)

__all__ = ["BatchNorm", "BatchStatsNotMutableError", "intercept"]


class BatchNorm(nn.BatchNorm):
    """BatchNorm layer with the fields and variables of ``flax.linen.BatchNorm``.

    It subclasses ``flax.linen.BatchNorm`` so that ``isinstance(m, flax.linen.BatchNorm)``
    holds (code that freezes, folds or counts BatchNorm layers by type finds it); every
    computation is jaxbn's (``__call__`` is replaced, nothing of Flax's runs). The fields up to
    ``force_float32_reductions`` are Flax's, in Flax's order; the fields after it are jaxbn's
    (see ``jaxbn.bn_apply``). Variables: ``params/scale``, ``params/bias`` and
    ``batch_stats/mean``, ``batch_stats/var`` (plus ``batch_stats/count`` with
    ``momentum=None``), in the dtypes Flax creates them (see ``force_float32_reductions``).

    Attributes:
      use_running_average: True normalizes with the stored running statistics (evaluation);
        False with the batch's own statistics, updating the running ones (training: apply
        with ``mutable=["batch_stats"]``). Can be set here or per call (not both).
      axis: the feature axis of the input, or a tuple of them (negative values count from the
        end); the statistics are reduced over every other axis.
      momentum: running update ``new = momentum * old + (1 - momentum) * batch``; None keeps
        a cumulative (plain) average of all batch statistics instead and adds a
        ``batch_stats/count`` variable.
      epsilon: added to the variance before its square root.
      dtype: the dtype of the output (None: the promotion of the input and the parameters).
        The statistics are computed in this dtype promoted to at least float32.
      param_dtype: the dtype in which ``scale`` and ``bias`` are created.
      use_bias: learn an additive ``bias`` (created with ``bias_init``).
      use_scale: learn a multiplicative ``scale`` (created with ``scale_init``).
      bias_init: the initializer of ``bias`` (zeros by default).
      scale_init: the initializer of ``scale`` (ones by default).
      axis_name: the ``pmap``/``shard_map``/``vmap`` axis name (or a tuple of names) whose
        devices pool their batches into one set of statistics, weighted by their counts.
        Ignored during ``init``, which issues no collective.
      axis_index_groups: groups of device indices along ``axis_name`` that share statistics
        (None: all of them).
      use_fast_variance: accepted for compatibility and ignored: the variance is always
        computed stably (two passes about the mean), at the speed of Flax's fast formula.
      force_float32_reductions: the dtype of the created running statistics, as in Flax:
        float32 when True, ``param_dtype`` when False. They are computed in float32 or wider
        either way, and every call returns them in the dtype they were given (a bfloat16
        checkpoint stays bfloat16). A bfloat16 or float16 running average moves only in steps
        of its own resolution, so it can stop short of the batch statistics: at momentum 0.99
        by up to 39% (bfloat16) or 5% (float16). jaxbn warns when such a training step is
        traced; keep the statistics float32 (True, the default) or lower the momentum. For
        float64 input (``jax_enable_x64``) and complex input the statistics are created in
        that wider dtype (Flax creates float32 and widens them at its first training step).
      unbiased_running_var: accumulate the unbiased batch variance ``n / (n - 1) * var`` in
        the running variance (PyTorch's convention).
      virtual_batch_size: ghost batch normalization: normalize consecutive groups of this many
        examples (along axis 0) each with their own statistics (None: the whole batch).
      renorm: ``(r_max, d_max)`` for batch renormalization (Ioffe, 2017); None disables it.
      skip_nonfinite: leave the running statistics unchanged after a batch whose statistics
        are not finite.
      sync_method: how statistics are combined over the devices of ``axis_name``:
        ``"auto"``, ``"gather"`` or ``"reduce"`` (see ``jaxbn.bn_apply``).
    """

    axis: int | Sequence[int] = -1  # type: ignore[assignment]
    momentum: float | None = 0.99  # type: ignore[assignment]
    unbiased_running_var: bool = False
    virtual_batch_size: int | None = None
    renorm: tuple[Any, Any] | None = None
    skip_nonfinite: bool = False
    sync_method: str = "auto"

    @nn.compact
    def __call__(self, x: ArrayLike, use_running_average: bool | None = None, *,
                 mask: ArrayLike | None = None) -> jax.Array:
        """Normalizes ``x``; with batch statistics unless ``use_running_average``.

        During ``init`` in training mode ``x`` is normalized with its own statistics, but the
        running statistics are not updated and no collective is issued (as in Flax), so a
        module with ``axis_name`` can be initialized outside ``pmap``/``shard_map``.

        Args:
          x: the input; its sizes along ``axis`` are the features.
          use_running_average: overrides the field when not None (set one of the two).
          mask: broadcastable to ``x`` (boolean, or 0/1 values): the elements that count
            toward the batch statistics.

        Returns:
          The normalized ``x``, of the same shape.

        Raises:
          BatchStatsNotMutableError: a training call (outside ``init``) whose ``batch_stats``
            collection is not mutable.
          ValueError: stored statistics whose shape does not match ``x``'s features.
        """
        return normalize(self, self, x, use_running_average, mask=mask)
