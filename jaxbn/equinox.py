"""``jaxbn.equinox.BatchNorm``: a drop-in replacement for ``equinox.nn.BatchNorm``.

Same constructor (``input_size, axis_name, eps, channelwise_affine, momentum, inference,
dtype, mode``), same per-example call ``bn(x, state, *, key=None, inference=None) -> (y,
state)`` with ``x`` of shape ``(input_size, *spatial)`` under ``jax.vmap``/``jax.pmap`` with
``axis_name``, and the same ``eqx.nn.State`` entries (same ``StateIndex`` fields, shapes and
meaning), so ``eqx.nn.make_with_state``, ``eqx.nn.inference_mode``, ``eqx.nn.Sequential``,
``eqx.tree_serialise_leaves`` and Equinox checkpoints work unchanged. It subclasses
``equinox.nn.BatchNorm`` (``isinstance`` checks still hold); every computation is the
functional core's (``jaxbn.bn_apply``). Equinox is an optional dependency: only this module
imports it.

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

import dataclasses
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import Params, State, UnboundAxisNameError, fold_conv, fold_dense
from jaxbn._src import core, optional
from jaxbn._src.options import Options, from_attributes

try:  # Equinox is optional (pip install 'jaxbn[equinox]'): only this module needs it
    import equinox as eqx
except ModuleNotFoundError as err:
    optional.raise_missing("equinox", __name__, err)
optional.check_version("equinox", eqx.__version__, __name__)

__all__ = ["BatchNorm", "convert", "fold", "from_equinox_state"]

_MODES = ("ema", "batch", "legacy")


def _default_dtype() -> Any:
    """Equinox's default: float64 in 64-bit mode, else float32."""
    return jnp.dtype(jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32)


def _split_names(axis_name: Any) -> tuple[tuple[Hashable, ...], tuple[Hashable, ...]]:
    """The names in ``axis_name`` bound by ``vmap`` (examples of this device's batch) and those
    bound by ``pmap``/``shard_map`` (devices: the abstract mesh's manual axes)."""
    names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
    for name in names:
        try:
            lax.axis_size(name)
        except NameError:
            raise UnboundAxisNameError(
                f"axis_name {name!r} is not bound: call the BatchNorm in training mode inside "
                f"jax.vmap(..., axis_name={name!r}) (or jax.pmap) over the batch, as "
                f"equinox.nn.BatchNorm requires") from None
    manual = set(getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()))
    return (tuple(n for n in names if n not in manual), tuple(n for n in names if n in manual))


def _varying_axes(x: Any) -> frozenset:
    """The shard_map axes ``x`` varies along (empty outside shard_map or without check_vma)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


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
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
            raise ValueError(f"input_size must be a positive int (the number of channels), "
                             f"got {input_size!r}")
        if mode not in _MODES:
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
        dtype = _default_dtype() if dtype is None else jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"dtype must be a real floating dtype (float32, bfloat16, ...), "
                            f"got {dtype}")
        stats_dtype = jnp.promote_types(dtype, jnp.float32)
        if channelwise_affine:
            self.weight = jnp.ones((input_size,), dtype)
            self.bias = jnp.zeros((input_size,), dtype)
        else:
            self.weight = None
            self.bias = None
        stats = (jnp.zeros((input_size,), stats_dtype), jnp.ones((input_size,), stats_dtype))
        if mode == "ema":
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
        self.mode = mode

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
        if self.mode == "ema":
            assert self.ema_first_time_index is not None and self.ema_state_index is not None
            first = state.get(self.ema_first_time_index)
            mean, var = state.get(self.ema_state_index)
            return (jnp.where(first, jnp.zeros_like(mean), mean),
                    jnp.where(first, jnp.ones_like(var), var))
        assert self.batch_counter is not None and self.batch_state_index is not None
        counter = state.get(self.batch_counter)
        mean, var = state.get(self.batch_state_index)
        dt = jnp.promote_types(mean.dtype, jnp.float32)
        w = self._debias(counter, dt)
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
        if not isinstance(inference, bool):
            raise TypeError(f"inference must be a Python bool (or None), got "
                            f"{type(inference).__name__}")
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) < 1 or shape[0] != self.input_size:
            raise ValueError(f"BatchNorm(input_size={self.input_size}) takes one example of "
                             f"shape (input_size, *spatial) = ({self.input_size}, ...), got "
                             f"shape {shape}; map over the batch with jax.vmap(..., "
                             f"axis_name={self.axis_name!r})")
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

    def _train(self, params: Params, state_in: State, x: jax.Array,
               momentum: Any) -> tuple[jax.Array, State]:
        """The core over the examples along ``axis_name``; returns this example's ``y``.

        Without a device axis among the names (plain ``vmap``, on one device or under ``jit``
        over a sharded batch) the example goes to the core as a batch of one with the
        vmapped names as ``axis_name``: the core's "collectives" over them are array
        operations. Under ``pmap``/``shard_map`` the examples along the vmapped names are
        first gathered into this device's batch (array operations under vmap, no
        communication) and the device names alone go to the core, so the collectives are
        the core's over devices (up to 8 devices: one all-gather forward, one all-reduce
        backward), with a payload that does not grow with the batch.
        """
        vmapped, devices = _split_names(self.axis_name)
        if vmapped and _varying_axes(x):
            raise NotImplementedError(
                f"BatchNorm(axis_name={self.axis_name!r}) is vmapped over {vmapped} inside "
                f"jax.shard_map with check_vma=True: JAX 0.10 cannot run a collective over a "
                f"vmap axis there (equinox.nn.BatchNorm fails alike). Use "
                f"shard_map(..., check_vma=False), jax.pmap, or jax.jit over a batch sharded "
                f"on a mesh with Auto axes (see the Equinox guide)")
        if not devices or not vmapped:
            names = vmapped or devices
            options = self._options(axis=1, momentum=momentum,
                                    axis_name=names if len(names) > 1 else names[0])
            y, new = core.apply(params, state_in, x[None], True, options)
            return y[0], new
        batch = x
        for name in reversed(vmapped):  # leading axes in the order of vmapped
            batch = lax.all_gather(batch, name)
        options = self._options(axis=len(vmapped), momentum=momentum,
                                axis_name=devices if len(devices) > 1 else devices[0])
        y, new = core.apply(params, state_in, batch, True, options)
        for name in vmapped:
            y = y[lax.axis_index(name)]
        return y, new

    def _train_ema(self, params: Params, x: jax.Array,
                   state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        assert self.ema_first_time_index is not None and self.ema_state_index is not None
        first = state.get(self.ema_first_time_index)
        mean, var = state.get(self.ema_state_index)
        dt = jnp.promote_types(mean.dtype, jnp.float32)
        # Before the first step the buffers are placeholders (uninitialized in Equinox's own
        # states): never read them. Momentum 0 stores the batch's statistics.
        old: State = {"mean": jnp.where(first, jnp.zeros_like(mean), mean),
               "var": jnp.where(first, jnp.ones_like(var), var)}
        momentum = jnp.where(first, jnp.zeros((), dt), jnp.asarray(self.momentum, dt))
        y, new = self._train(params, old, x, momentum)
        state = state.set(self.ema_first_time_index, jnp.zeros_like(first))
        state = state.set(self.ema_state_index,
                          (new["mean"].astype(mean.dtype), new["var"].astype(var.dtype)))
        return y, state

    def _train_batch(self, params: Params, x: jax.Array,
                     state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        assert self.batch_counter is not None and self.batch_state_index is not None
        counter = state.get(self.batch_counter)
        mean, var = state.get(self.batch_state_index)
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
        state = state.set(self.batch_counter, counter)
        state = state.set(self.batch_state_index,
                          (jnp.where(advanced, new["mean"].astype(mean.dtype), mean),
                           jnp.where(advanced, new["var"].astype(var.dtype), var)))
        return y, state


def _is_eqx_bn(node: Any) -> bool:
    return isinstance(node, eqx.nn.BatchNorm)


def _rebuilt(module: Any, cls: type, **changes: Any) -> Any:
    """A copy of an Equinox module as ``cls`` (same fields, ``changes`` applied). Fields are
    set as Equinox's own unflattening sets them: ``StateIndex`` markers are kept, so the
    model's existing ``eqx.nn.State`` stays valid."""
    new: Any = object.__new__(cls)
    for f in dataclasses.fields(module):
        object.__setattr__(new, f.name, changes.pop(f.name, getattr(module, f.name)))
    if changes:
        raise AssertionError(f"unknown fields {sorted(changes)}")
    return new


def convert(model: Any) -> Any:
    """Replaces every ``equinox.nn.BatchNorm`` in ``model`` with :class:`BatchNorm`.

    Each layer keeps its fields, parameters and ``StateIndex`` entries, so the model's
    existing ``eqx.nn.State`` (and checkpoints) work with the converted model. Use it on
    models built by code you do not edit (libraries that call ``eqx.nn.BatchNorm``).

    Example:
      >>> import equinox as eqx, jax
      >>> import jaxbn.equinox
      >>> model, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
      >>> type(jaxbn.equinox.convert(model)).__module__
      'jaxbn.equinox'
    """
    def visit(node):
        if _is_eqx_bn(node) and not isinstance(node, BatchNorm):
            return _rebuilt(node, BatchNorm)
        return node
    return jax.tree.map(visit, model, is_leaf=_is_eqx_bn)


def from_equinox_state(model: Any, state: eqx.nn.State) -> eqx.nn.State:
    """Rereads a state written by ``equinox.nn.BatchNorm`` as jaxbn keeps it.

    Equinox's ``mode="batch"`` starts its variance average from ones, so after ``k`` updates
    it holds ``momentum**k`` too much; this removes it from every ``"batch"``-mode
    :class:`BatchNorm` of ``model`` (convert the model first). ``"ema"`` states need nothing.
    Call it once, eagerly (not under ``jit``), on a state that Equinox's layer trained (a
    jaxbn-trained state has no such excess): a variance average below ``momentum**k`` cannot
    come from Equinox and raises.
    The result is as accurate as the checkpoint allows: the ones cost float32 digits while
    ``momentum**k`` is near 1.

    Example:
      >>> import equinox as eqx, jax, jax.numpy as jnp
      >>> import jaxbn.equinox
      >>> eqx_bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(1, "b", mode="batch")
      >>> x = jnp.array([[0.0], [2.0]])  # batch variance 1
      >>> step = jax.vmap(eqx_bn, axis_name="b", in_axes=(0, None), out_axes=(0, None))
      >>> _, state = step(x, state)
      >>> bn = jaxbn.equinox.convert(eqx_bn)
      >>> bn.inference_statistics(state)[1].round(2).tolist()  # Equinox's reading
      [100.0]
      >>> state = jaxbn.equinox.from_equinox_state(bn, state)
      >>> bn.inference_statistics(state)[1].round(4).tolist()
      [1.0]
    """
    layers = [n for n in jax.tree.leaves(model, is_leaf=_is_eqx_bn) if _is_eqx_bn(n)]
    for bn in layers:
        if not isinstance(bn, BatchNorm):
            raise TypeError("from_equinox_state reads states for jaxbn.equinox.BatchNorm; "
                            "convert the model first: model = jaxbn.equinox.convert(model)")
        if bn.mode != "batch":
            continue
        assert bn.batch_counter is not None and bn.batch_state_index is not None
        counter = state.get(bn.batch_counter)
        mean, var = state.get(bn.batch_state_index)
        dt = jnp.promote_types(var.dtype, jnp.float32)
        k = jnp.maximum(counter, 0).astype(dt)
        excess = jnp.where(counter > 0, jnp.asarray(bn.momentum, dt) ** k, jnp.zeros((), dt))
        ulp = jnp.finfo(var.dtype).eps
        if bool(jnp.any(var.astype(dt) < excess * (1 - 4 * k * ulp))):
            raise ValueError(f"this state's variance average is below momentum**k = "
                             f"{float(excess):.6g} (k = {int(counter)}): it was not written "
                             f"by equinox.nn.BatchNorm in mode='batch' (or was already "
                             f"converted)")
        new_var = jnp.where(counter > 0, jnp.maximum(var.astype(dt) - excess, 0), var)
        state = state.set(bn.batch_state_index, (mean, new_var.astype(var.dtype)))
    return state


_FOLDABLE = (eqx.nn.Linear, eqx.nn.Conv, eqx.nn.ConvTranspose)


def _fold_layer(layer: Any, bn: BatchNorm, state: eqx.nn.State) -> Any:
    mean, var = bn.inference_statistics(state)
    stats: State = {"mean": mean, "var": var}
    params = bn._params()
    w = layer.weight
    if isinstance(layer, eqx.nn.Linear):
        if layer.out_features == "scalar":
            raise ValueError("fold: a Linear with out_features='scalar' cannot be followed by "
                             "a BatchNorm (it gives no channel axis)")
        kernel, bias = fold_dense(w.T, layer.bias, params, stats, epsilon=bn.eps)
        return _rebuilt(layer, type(layer), weight=kernel.T, bias=bias, use_bias=True)
    out = w.shape[0]
    b = None if layer.bias is None else layer.bias.reshape(out)
    kernel, bias = fold_conv(jnp.moveaxis(w, 0, -1), b, params, stats, epsilon=bn.eps)
    return _rebuilt(layer, type(layer), weight=jnp.moveaxis(kernel, -1, 0),
                    bias=bias.reshape((out,) + (1,) * (w.ndim - 2)), use_bias=True)


def fold(model: Any, state: eqx.nn.State) -> Any:
    """Folds each BatchNorm that follows a Linear or Conv in an ``eqx.nn.Sequential``.

    For inference: every ``eqx.nn.Sequential`` in ``model`` (nested ones too) in which a
    :class:`BatchNorm` directly follows an ``eqx.nn.Linear``, ``eqx.nn.Conv*`` or
    ``eqx.nn.ConvTranspose*`` gets that layer with the folded weight and bias (from
    ``jaxbn.fold_dense`` / ``jaxbn.fold_conv``, with the statistics inference uses; a layer
    built with ``use_bias=False`` gains a bias) and ``eqx.nn.Identity()`` in place of the
    BatchNorm. The result, called in inference mode, computes what ``model`` computes there,
    with ``state`` still passed where the model takes one. Other BatchNorms are kept.
    ``model`` is not modified.

    Raises:
      TypeError: when such a pair holds an ``equinox.nn.BatchNorm`` (convert the model first
        with :func:`convert`).

    Example:
      >>> import jax, jax.numpy as jnp, equinox as eqx
      >>> import jaxbn.equinox
      >>> def make():
      ...     return eqx.nn.Sequential([eqx.nn.Linear(3, 2, key=jax.random.key(0)),
      ...                               jaxbn.equinox.BatchNorm(2, "batch", mode="batch")])
      >>> model, state = eqx.nn.make_with_state(make)()
      >>> x = jax.random.normal(jax.random.key(1), (8, 3))
      >>> _, state = jax.vmap(model, axis_name="batch", in_axes=(0, None),
      ...                     out_axes=(0, None))(x, state)
      >>> model = eqx.nn.inference_mode(model)
      >>> folded = jaxbn.equinox.fold(model, state)
      >>> type(folded.layers[1]).__name__
      'Identity'
      >>> y, _ = jax.vmap(model, in_axes=(0, None), out_axes=(0, None))(x, state)
      >>> y2, _ = jax.vmap(folded, in_axes=(0, None), out_axes=(0, None))(x, state)
      >>> bool(jnp.allclose(y, y2, atol=1e-5))
      True
    """
    def is_seq(node: Any) -> bool:
        return isinstance(node, eqx.nn.Sequential)

    def visit(node: Any) -> Any:
        return fold_sequential(node) if is_seq(node) else node

    def fold_sequential(seq: eqx.nn.Sequential) -> eqx.nn.Sequential:
        layers = [jax.tree.map(visit, layer, is_leaf=is_seq) for layer in seq.layers]
        for i in range(len(layers) - 1):
            layer, bn = layers[i], layers[i + 1]
            if not (isinstance(layer, _FOLDABLE) and _is_eqx_bn(bn)):
                continue
            if not isinstance(bn, BatchNorm):
                raise TypeError(f"fold: layer {i + 1} of a Sequential is an "
                                f"equinox.nn.BatchNorm; fold folds jaxbn.equinox.BatchNorm: "
                                f"convert the model first (model = jaxbn.equinox.convert("
                                f"model))")
            layers[i] = _fold_layer(layer, bn, state)
            layers[i + 1] = eqx.nn.Identity()
        return eqx.tree_at(lambda s: s.layers, seq, tuple(layers))

    visit_fn: Callable[[Any], Any] = visit
    return jax.tree.map(visit_fn, model, is_leaf=is_seq)
