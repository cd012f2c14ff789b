"""``jaxbn.equinox.BatchNorm``: a drop-in replacement for ``equinox.nn.BatchNorm``.

Same constructor (``input_size, axis_name, eps, channelwise_affine, momentum, inference,
dtype, mode``), same per-example call ``bn(x, state, *, key=None, inference=None) -> (y,
state)`` with ``x`` of shape ``(input_size, *spatial)`` under ``jax.vmap``/``jax.pmap`` with
``axis_name``, and the same ``eqx.nn.State`` entries (same ``StateIndex`` fields, shapes and
meaning), so ``eqx.nn.make_with_state``, ``eqx.nn.inference_mode``, ``eqx.nn.Sequential``,
``eqx.tree_serialise_leaves`` and Equinox checkpoints work unchanged. It subclasses
``equinox.nn.BatchNorm`` (``isinstance`` checks still hold); every computation is the
functional core's (``jaxbn.bn_apply``). Equinox is an optional dependency: only this module,
and the ``jaxbn._src.equinox_tools`` module it loads, import it.

What differs from Equinox 0.13.8 (each one measured there, see the Equinox guide):

- Training normalizes with the batch's own statistics in both modes (the paper's rule):
  Equinox's ``mode="ema"`` normalizes training batches with the running averages instead.
  The modes differ only in how the running statistics are kept (see :class:`BatchNorm`).
- ``mode="batch"``: the variance accumulator starts from zero, so its debiased value is the
  average of the batch variances (Equinox starts it from ones and divides those by
  ``1 - momentum**k`` too). A state written by Equinox still loads and reads as Equinox read
  it; :func:`from_equinox_state` removes Equinox's ones from it.
- ``mode="ema"`` before any training step normalizes with mean 0, variance 1 (Equinox reads
  its uninitialized buffers).
- Statistics in float32 or wider whatever the input dtype, computed stably, ``y`` in the
  input's dtype; running statistics are created in float32 or wider (``dtype`` sets
  ``weight`` and ``bias``), so a bfloat16 model's EMA does not stall.
- One collective forward and one backward per layer (Equinox: two and four).
- No warning when ``mode`` is left out (it means ``"ema"``, Equinox's default).

Example:
  >>> import jax, jax.numpy as jnp, equinox as eqx
  >>> import jaxbn.equinox
  >>> bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(3, "batch", mode="batch")
  >>> x = jnp.arange(12.0).reshape(4, 3)  # 4 examples of 3 channels
  >>> train = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
  >>> y, state = train(x, state)
  >>> [round(v, 4) for v in y[:, 0].tolist()]
  [-1.3416, -0.4472, 0.4472, 1.3416]
  >>> mean, var = bn.inference_statistics(state)  # what inference normalizes with
  >>> jnp.round(mean, 4).tolist(), jnp.round(var, 4).tolist()
  ([4.5, 5.5, 6.5], [11.25, 11.25, 11.25])
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from jaxbn import Params, State
from jaxbn._src import core, equinox_axes, optional
from jaxbn._src.equinox_checks import check_call, checked_args
from jaxbn._src.options import Options, from_attributes

try:  # Equinox is optional (pip install 'jaxbn[equinox]'): only this module needs it
    import equinox as eqx

    optional.check_version("equinox", eqx.__version__, __name__)  # before any use of Equinox
    from jaxbn._src.equinox_tools import convert, fold, from_equinox_state
except ModuleNotFoundError as err:
    optional.raise_missing("equinox", __name__, err)

__all__ = ["BatchNorm", "convert", "fold", "from_equinox_state"]


class BatchNorm(eqx.nn.BatchNorm):
    """BatchNorm with the constructor, call and state of ``equinox.nn.BatchNorm``.

    Args:
      input_size: the number of channels (axis 0 of each example).
      axis_name: the ``vmap``/``pmap`` axis (or a tuple/list of axes) that holds the batch:
        statistics are pooled over every example and device along it.
      eps: added to the variance before the square root.
      channelwise_affine: learn a per-channel ``weight`` (ones) and ``bias`` (zeros).
      momentum: running update ``new = momentum * old + (1 - momentum) * batch``, in [0, 1]
        (below 1 in ``"batch"`` mode, where the average is debiased by ``1 - momentum**k``).
      inference: normalize with the running statistics (toggle with
        ``eqx.nn.inference_mode``, or per call).
      dtype: dtype of ``weight`` and ``bias``; the running statistics are kept in this dtype
        promoted to at least float32 (Equinox keeps them in ``dtype``). Default: float32, or
        float64 in 64-bit mode. Real floating dtypes only.
      mode: how the running statistics are kept (training always normalizes with the batch's
        statistics):

        - ``"ema"`` (the default; ``"legacy"`` is accepted as Equinox's name for it, without
          Equinox's warning): the first training step stores the batch statistics, later
          steps the exponential average. State: ``ema_first_time_index`` (a bool, True until
          the first step) and ``ema_state_index`` (mean, var). Before the first step inference
          uses mean 0 and variance 1.
        - ``"batch"``: an exponential average started from zero, divided at inference by the
          weight it has gathered, ``1 - momentum**k`` after ``k`` updates (Adam's debiasing).
          State: ``batch_counter`` (``k``) and ``batch_state_index`` (the undivided mean and
          variance averages). A fresh state holds ``(0, 1)`` as Equinox's does; the first
          update discards it (Equinox keeps the 1 in the variance average, which is what makes
          its debiased variance wrong); with ``k = 0`` inference uses mean 0 and variance 1.

    Example:
      >>> import jax, jax.numpy as jnp, equinox as eqx
      >>> from jaxbn.equinox import BatchNorm
      >>> bn, state = eqx.nn.make_with_state(BatchNorm)(2, "batch", mode="ema")
      >>> x = jnp.array([[0.0, 10.0], [2.0, 30.0]])
      >>> y, state = jax.vmap(bn, axis_name="batch", in_axes=(0, None),
      ...                     out_axes=(0, None))(x, state)
      >>> jnp.round(y, 3).tolist()
      [[-1.0, -1.0], [1.0, 1.0]]
      >>> [v.tolist() for v in state.get(bn.ema_state_index)]  # the first batch's
      [[1.0, 20.0], [1.0, 100.0]]
    """

    def __init__(self, input_size: int, axis_name: Hashable | Sequence[Hashable],
                 eps: float = 1e-5, channelwise_affine: bool = True, momentum: float = 0.99,
                 inference: bool = False, dtype: Any = None,
                 mode: Literal["ema", "batch", "legacy"] = "legacy"):
        kept_mode, dtype = checked_args(input_size, mode, momentum, eps, inference, dtype)
        stats_dtype = jnp.promote_types(dtype, jnp.float32)
        if channelwise_affine:
            self.weight = jnp.ones((input_size,), dtype)
            self.bias = jnp.zeros((input_size,), dtype)
        else:
            self.weight = None
            self.bias = None
        stats = (jnp.zeros((input_size,), stats_dtype), jnp.ones((input_size,), stats_dtype))
        if kept_mode == "ema":
            self.ema_first_time_index = eqx.nn.StateIndex(jnp.array(True))
            self.ema_state_index = eqx.nn.StateIndex(stats)
            self.batch_counter = None
            self.batch_state_index = None
        else:
            self.ema_first_time_index = None
            self.ema_state_index = None
            self.batch_counter = eqx.nn.StateIndex(jnp.array(0))
            self.batch_state_index = eqx.nn.StateIndex(stats)
        self.axis_name = axis_name
        self.inference = inference
        self.input_size = input_size
        self.eps = float(eps)
        self.channelwise_affine = bool(channelwise_affine)
        self.momentum = float(momentum)
        self.mode = kept_mode

    def _options(self, **overrides: Any) -> Options:
        """The core's options: from this layer's fields of the same names (``momentum``; a
        field named as an option of ``jaxbn.bn_apply`` would be taken up too), ``eps`` as
        ``epsilon``, then ``overrides``. As in Equinox, one value per channel is accepted in
        training (``y = bias``)."""
        return from_attributes(self, **{"epsilon": self.eps, "allow_single_value": True,
                                        **overrides})

    def _params(self) -> Params:
        if not self.channelwise_affine:
            return {}
        assert self.weight is not None and self.bias is not None
        return {"scale": self.weight, "bias": self.bias}

    def _debias(self, counter: jax.Array, dtype: Any) -> jax.Array:
        """``1 - m**k`` for the float ``m`` the update applies (``k > 0``; 1 where ``k <= 0``)."""
        m = jnp.asarray(self.momentum, dtype)
        k = jnp.maximum(counter, 1).astype(dtype)
        return jnp.where(counter > 0, -jnp.expm1(k * jnp.log(m)), jnp.ones((), dtype))

    def inference_statistics(self, state: eqx.nn.State) -> tuple[jax.Array, jax.Array]:
        """The ``(mean, var)`` that inference normalizes with, in the state's dtype.

        ``"ema"``: the running averages (mean 0, variance 1 before the first training step).
        ``"batch"``: the averages divided by ``1 - momentum**k`` (the stored ones, ``(0, 1)``
        for a fresh state, when ``k = 0``).

        Example:
          >>> import equinox as eqx
          >>> from jaxbn.equinox import BatchNorm
          >>> bn, state = eqx.nn.make_with_state(BatchNorm)(2, "batch")
          >>> [v.tolist() for v in bn.inference_statistics(state)]
          [[0.0, 0.0], [1.0, 1.0]]
        """
        marker, mean, var = self._read(state)
        if self.mode == "ema":
            return _ema_statistics(marker, mean, var)
        dt = jnp.promote_types(mean.dtype, jnp.float32)
        w = self._debias(marker, dt)
        return ((mean.astype(dt) / w).astype(mean.dtype), (var.astype(dt) / w).astype(var.dtype))

    def __call__(self, x: jax.Array, state: eqx.nn.State, *, key: Any = None,
                 inference: bool | None = None) -> tuple[jax.Array, eqx.nn.State]:
        """Normalizes one example ``x`` of shape ``(input_size, *spatial)``.

        Training mode must run under ``jax.vmap`` (or ``jax.pmap``) with this layer's
        ``axis_name``: the statistics are those of every example along it (one collective),
        and the returned state is the same for every example (``out_axes=(0, None)``).
        Inference needs no named axis.

        Args:
          x: one example, channels first.
          state: the ``eqx.nn.State`` holding this layer's running statistics.
          key: ignored (Equinox's layer API).
          inference: overrides ``self.inference`` when not None.

        Returns:
          ``(y, new_state)``: ``y`` has ``x``'s shape and dtype; in inference mode the state
          comes back unchanged.

        Raises:
          NameError: (``jaxbn.UnboundAxisNameError``) in training mode when ``axis_name`` is
            not bound by an enclosing ``vmap``/``pmap``/``shard_map``.
        """
        del key
        if inference is None:
            inference = self.inference
        check_call(x, inference, self.input_size, self.axis_name)
        params = self._params()
        if inference:
            mean, var = self.inference_statistics(state)
            stats: State = {"mean": mean, "var": var}
            y, _ = core.apply(params, stats, x[None], False,
                              self._options(axis=1, axis_name=None))
            return y[0], state
        if self.mode == "ema":
            return self._train_ema(params, x, state)
        return self._train_batch(params, x, state)

    def _read(self, state: eqx.nn.State) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(marker, mean, var)`` as this mode stores them; the marker is
        ``ema_first_time_index``'s flag (``"ema"``) or ``batch_counter``'s ``k`` (``"batch"``)."""
        marker, stats = self._indices()
        mean, var = state.get(stats)
        return state.get(marker), mean, var

    def _write(self, state: eqx.nn.State, marker: jax.Array, mean: jax.Array,
               var: jax.Array) -> eqx.nn.State:
        """``state`` with this mode's entries set to ``marker`` and ``(mean, var)``."""
        marker_index, stats = self._indices()
        return state.set(marker_index, marker).set(stats, (mean, var))

    def _indices(self) -> tuple[eqx.nn.StateIndex, eqx.nn.StateIndex]:
        if self.mode == "ema":
            marker, stats = self.ema_first_time_index, self.ema_state_index
        else:
            marker, stats = self.batch_counter, self.batch_state_index
        assert marker is not None and stats is not None
        return marker, stats

    def _train(self, params: Params, old: State, x: jax.Array,
               momentum: Any) -> tuple[jax.Array, State]:
        """The core over the examples along ``axis_name``; returns this example's ``y``."""
        return equinox_axes.train(params, old, x, self.axis_name,
                                  self._options(momentum=momentum))

    def _train_ema(self, params: Params, x: jax.Array,
                   state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        first, mean, var = self._read(state)
        dt = jnp.promote_types(mean.dtype, jnp.float32)
        # Before the first step the buffers are placeholders (uninitialized in Equinox's own
        # states): never read them. Momentum 0 stores the batch's statistics.
        old_mean, old_var = _ema_statistics(first, mean, var)
        old: State = {"mean": old_mean, "var": old_var}
        momentum = jnp.where(first, jnp.zeros((), dt), jnp.asarray(self.momentum, dt))
        y, new = self._train(params, old, x, momentum)
        return y, self._write(state, jnp.zeros_like(first), new["mean"].astype(mean.dtype),
                              new["var"].astype(var.dtype))

    def _train_batch(self, params: Params, x: jax.Array,
                     state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        counter, mean, var = self._read(state)
        dt = jnp.promote_types(mean.dtype, jnp.float32)
        fresh = counter <= 0
        # The averages start from zero: the stored (0, 1) of a fresh state is discarded.
        old: State = {"mean": jnp.where(fresh, jnp.zeros_like(mean), mean),
                      "var": jnp.where(fresh, jnp.zeros_like(var), var),
                      "count": jnp.maximum(counter, 0)}
        # A float of the statistics' dtype: the update weighs old and new by m and 1 - m of
        # that same float, so the weights sum to exactly 1 - m**k (see _debias).
        y, new = self._train(params, old, x, jnp.asarray(self.momentum, dt))
        advanced = new["count"] > old["count"]
        counter = jnp.where(advanced, counter + 1, counter)  # keeps the counter's weak type
        return y, self._write(state, counter,
                              jnp.where(advanced, new["mean"].astype(mean.dtype), mean),
                              jnp.where(advanced, new["var"].astype(var.dtype), var))


def _ema_statistics(first: jax.Array, mean: jax.Array,
                    var: jax.Array) -> tuple[jax.Array, jax.Array]:
    """An ``"ema"`` state's statistics: mean 0 and variance 1 before the first step (``first``),
    whatever the buffers hold."""
    return (jnp.where(first, jnp.zeros_like(mean), mean),
            jnp.where(first, jnp.ones_like(var), var))
