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
  >>> bn.mean[...].round(4).tolist()
  [0.44999998807907104, 0.550000011920929, 0.6499999761581421]
  >>> bn.eval(); bn.use_running_average
  True
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxbn._src import optional
from jaxbn._src.checks import STATE_KEYS
from jaxbn._src.flax_common import as_hashable, call_core, state_dtypes
from jaxbn._src.layout import make_layout
from jaxbn._src.options import Options, from_attributes
from jaxbn.precise import reset_stats

try:  # Flax is optional (pip install 'jaxbn[flax]'): only this module and jaxbn.linen need it
    import flax

    optional.check_version("flax", flax.__version__, __name__)  # before any use of Flax
    from flax import nnx
    from flax.nnx.nn import dtypes as nnx_dtypes
    from flax.nnx.nn import initializers

    from jaxbn._src.nnx_convert import convert
    from jaxbn._src.nnx_fold import Folded, fold
except ModuleNotFoundError as err:
    optional.raise_missing("flax", __name__, err)

__all__ = ["BatchNorm", "Folded", "convert", "fold", "precise_stats"]

_ZEROS = initializers.zeros_init()
_ONES = initializers.ones_init()
_DEFAULTS = Options()


class BatchNorm(nnx.BatchNorm):
    """BatchNorm layer with the constructor and attributes of ``flax.nnx.BatchNorm``.

    It subclasses ``flax.nnx.BatchNorm`` so that ``isinstance(m, flax.nnx.BatchNorm)`` holds;
    Flax's constructor sets up the same attributes (so ``vars()``, the repr and the graphdef
    are Flax's), and every computation is jaxbn's (``__call__`` is replaced). The arguments up
    to ``scale_metadata`` are Flax's; those after it are jaxbn's (see ``jaxbn.bn_apply``): an
    instance stores one only when it differs from the default (a class attribute), as a
    hashable static attribute.

    The layer holds ``scale`` and ``bias`` (``nnx.Param``, None when disabled), ``mean`` and
    ``var`` (``nnx.BatchStat``), ``count`` (``nnx.BatchStat``, only with ``momentum=None``),
    and the arguments below under their own names.

    Args:
      num_features: the size of the feature axis.
      use_running_average: True normalizes with the stored running statistics (evaluation);
        False with the batch's own statistics, updating the running ones (training); None
        leaves it to the call. ``model.train()``, ``model.eval()`` and ``nnx.view`` set it.
      axis: the feature axis of the input (negative values count from the end); the
        statistics are reduced over every other axis.
      momentum: running update ``new = momentum * old + (1 - momentum) * batch``; None keeps
        a cumulative (plain) average of all batch statistics instead and adds a ``count``
        BatchStat.
      epsilon: added to the variance before its square root.
      dtype: the dtype of the output and of the computation (None: the promotion of the input
        and the parameters). The statistics are computed in this dtype promoted to at least
        float32.
      param_dtype: the dtype of the ``scale`` and ``bias`` Params.
      use_bias: hold a learned additive ``bias`` Param (else ``bias`` is None).
      use_scale: hold a learned multiplicative ``scale`` Param (else ``scale`` is None).
      bias_init: makes ``bias``'s value from a key of ``rngs.params`` (zeros by default).
      scale_init: makes ``scale``'s value from a key of ``rngs.params`` (ones by default).
      axis_name: the ``pmap``/``shard_map``/``vmap`` axis name, or a tuple of names: the
        batches of all the devices along it give one set of statistics, count-weighted.
      axis_index_groups: groups of device indices along ``axis_name`` that share statistics
        (None: all of them).
      use_fast_variance: accepted for compatibility and ignored: the variance is always
        computed stably (two passes about the mean).
      promote_dtype: called as ``promote_dtype((x, mean, var, scale, bias), dtype=dtype)``
        (None for a disabled scale or bias) before normalizing, as in Flax: the promoted
        ``x``, ``scale`` and ``bias`` are used; the statistics keep their own dtype.
      rngs: the ``nnx.Rngs`` whose ``params`` stream the initializers receive.
      bias_metadata: metadata for the ``bias`` ``nnx.Param`` (e.g. sharding annotations).
      scale_metadata: metadata for the ``scale`` ``nnx.Param``.
      unbiased_running_var: ``var`` averages the batch variances times ``n / (n - 1)``
        (unbiased, as PyTorch's running variance).
      virtual_batch_size: ghost batches: each group of this many examples along axis 0 is
        normalized with its own statistics (None: the whole batch is one group).
      renorm: batch renormalization's ``(r_max, d_max)`` (Ioffe, 2017), or None (off).
      skip_nonfinite: a batch whose statistics are not finite leaves ``mean`` and ``var`` as
        they were.
      sync_method: ``"auto"``, ``"gather"`` or ``"reduce"``: how the devices of
        ``axis_name`` combine their statistics (see ``jaxbn.bn_apply``).

    The running statistics are created float32, as Flax creates them, except with
    ``param_dtype`` or ``dtype`` float64 (under ``jax_enable_x64``; Flax: float32), where they
    are created float64, and with a complex ``dtype``, where the mean is complex. Every call
    keeps them in the dtype they hold: one restored from a bfloat16 checkpoint stays
    bfloat16, and jaxbn warns when the training step is traced where such a low-precision
    average can stop short of the batch statistics (bfloat16 at momentum 0.99: by up to 39%;
    keep them float32 or lower the momentum). Only complex input makes a real mean complex.
    """

    # jaxbn's options at their defaults (Options'): an instance stores one only where it differs
    unbiased_running_var: bool = _DEFAULTS.unbiased_running_var
    virtual_batch_size: int | None = _DEFAULTS.virtual_batch_size
    renorm: tuple[Any, Any] | None = _DEFAULTS.renorm
    skip_nonfinite: bool = _DEFAULTS.skip_nonfinite
    sync_method: str = _DEFAULTS.sync_method
    count: nnx.BatchStat  # only with momentum=None
    seen: nnx.BatchStat  # only during precise_stats

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
                 renorm: tuple[Any, Any] | None = None, skip_nonfinite: bool = False,
                 sync_method: str = "auto"):
        super().__init__(  # Flax's attribute set-up only (no computation)
            num_features, use_running_average=use_running_average, axis=as_hashable(axis),
            momentum=momentum,  # type: ignore[arg-type]  # None: jaxbn's cumulative average
            epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
            use_bias=use_bias, use_scale=use_scale, bias_init=bias_init,
            scale_init=scale_init, axis_name=as_hashable(axis_name),
            axis_index_groups=as_hashable(axis_index_groups),
            use_fast_variance=use_fast_variance, promote_dtype=promote_dtype, rngs=rngs,
            bias_metadata=bias_metadata, scale_metadata=scale_metadata)
        mean_dt, var_dt = state_dtypes(jnp.float32, param_dtype, dtype)
        if mean_dt != jnp.float32:
            self.mean = nnx.BatchStat(jnp.zeros((num_features,), mean_dt))
            self.var = nnx.BatchStat(jnp.ones((num_features,), var_dt))
        if momentum is None:
            self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))
        jaxbn_options = dict(unbiased_running_var=unbiased_running_var,
                             virtual_batch_size=virtual_batch_size, renorm=renorm,
                             skip_nonfinite=skip_nonfinite, sync_method=sync_method)
        for name, value in jaxbn_options.items():
            value = as_hashable(value)
            if value != getattr(BatchNorm, name):  # defaults stay class attributes
                setattr(self, name, value)

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view`` (and ``model.train()``/``model.eval()``).

        Args:
          use_running_average: if True, normalize with the stored running statistics and leave
            them unchanged; if False, normalize with the batch's statistics and update them.
            None leaves the setting as it is.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x: ArrayLike, use_running_average: bool | None = None, *,
                 mask: ArrayLike | None = None) -> jax.Array:
        """Normalizes ``x``; the call's ``use_running_average`` overrides the attribute.

        Like Flax, ``promote_dtype`` receives ``(x, mean, var, scale, bias)`` (``None`` for a
        disabled scale or bias); the promoted ``x``, ``scale`` and ``bias`` are normalized,
        while the statistics stay in their own (float32 or wider) dtype.

        Args:
          x: the input; its size along ``axis`` must be ``num_features``.
          use_running_average: overrides the attribute when not None.
          mask: the elements of ``x`` that count toward the batch statistics: boolean (or 0/1)
            values that broadcast to ``x``'s shape.

        Returns:
          ``x`` normalized: same shape, in ``dtype`` (None: the promoted dtype of ``x``,
          ``scale`` and ``bias``).

        Raises:
          ValueError: ``use_running_average`` is None in both places, or ``x`` does not have
            ``num_features`` features along ``axis``.
        """
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError("no use_running_average was given: pass it to BatchNorm(...), to "
                             "the call, or set it with model.train()/model.eval()/nnx.view")
        self._check_features(x)
        names = [k for k in STATE_KEYS if getattr(self, k, None) is not None]
        state = {k: getattr(self, k)[...] for k in names}
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        x, _, _, scale, bias = self.promote_dtype((x, state["mean"], state["var"], scale, bias),
                                                  dtype=self.dtype)
        params = {k: v for k, v in (("scale", scale), ("bias", bias)) if v is not None}
        out_dtype = nnx_dtypes.canonicalize_dtype(x, *params.values(), dtype=self.dtype)
        train = not use_running_average
        y, new = call_core(x, params, state, train, from_attributes(self), mask, out_dtype)
        if train:
            for k in names:
                stat = getattr(self, k)
                if new[k].dtype == stat[...].dtype:
                    stat[...] = new[k]
                else:  # a real mean made complex by complex input: replaced, as linen does
                    stat.set_value(new[k])
        return y

    def _check_features(self, x: Any) -> None:
        """A jaxbn error, in the module's own terms, when ``x`` does not fit ``num_features``
        (the core's would speak of ``params['scale']``)."""
        shape = tuple(getattr(x, "shape", ()))
        if not shape:
            return  # the core says what is wrong with x
        features = make_layout(shape, self.axis).feature_shape
        if tuple(features) != (self.num_features,):
            raise ValueError(
                f"BatchNorm(num_features={self.num_features}, axis={self.axis!r}) got x of "
                f"shape {shape}, whose size along axis {self.axis!r} is "
                f"{features[0] if len(features) == 1 else features}: build the layer with "
                f"num_features equal to that size, or pass axis= for the axis that holds "
                f"{self.num_features} features")


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
    layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, BatchNorm)]
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
