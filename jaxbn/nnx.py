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

    from jaxbn._src.nnx_fold import Folded, fold
except ModuleNotFoundError as err:
    optional.raise_missing("flax", __name__, err)

__all__ = ["BatchNorm", "Folded", "convert", "fold", "precise_stats"]

_ZEROS = initializers.zeros_init()
_ONES = initializers.ones_init()
_STATS = ("mean", "var", "count", "seen")  # the BatchStat attributes the core's state uses


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
      param_dtype: the dtype in which ``scale`` and ``bias`` are created.
      use_bias: learn an additive ``bias`` (created with ``bias_init``).
      use_scale: learn a multiplicative ``scale`` (created with ``scale_init``).
      bias_init: the initializer of ``bias`` (zeros by default).
      scale_init: the initializer of ``scale`` (ones by default).
      axis_name: the ``pmap``/``shard_map``/``vmap`` axis name (or a tuple of names) whose
        devices pool their batches into one set of statistics, weighted by their counts.
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
      unbiased_running_var: accumulate the unbiased batch variance ``n / (n - 1) * var`` in
        the running variance (PyTorch's convention).
      virtual_batch_size: ghost batch normalization: normalize consecutive groups of this many
        examples (along axis 0) each with their own statistics (None: the whole batch).
      renorm: ``(r_max, d_max)`` for batch renormalization (Ioffe, 2017); None disables it.
      skip_nonfinite: leave the running statistics unchanged after a batch whose statistics
        are not finite.
      sync_method: how statistics are combined over the devices of ``axis_name``:
        ``"auto"``, ``"gather"`` or ``"reduce"`` (see ``jaxbn.bn_apply``).

    The running statistics are created float32, as Flax creates them, except with
    ``param_dtype`` or ``dtype`` float64 (under ``jax_enable_x64``; Flax: float32), where they
    are created float64, and with a complex ``dtype``, where the mean is complex. Every call
    keeps them in the dtype they hold: one restored from a bfloat16 checkpoint stays
    bfloat16, and jaxbn warns when the training step is traced where such a low-precision
    average can stop short of the batch statistics (bfloat16 at momentum 0.99: by up to 39%;
    keep them float32 or lower the momentum). Only complex input makes a real mean complex.
    """

    unbiased_running_var: bool = False
    virtual_batch_size: int | None = None
    renorm: tuple[Any, Any] | None = None
    skip_nonfinite: bool = False
    sync_method: str = "auto"
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
          mask: broadcastable to ``x`` (boolean, or 0/1 values): the elements that count
            toward the batch statistics.

        Returns:
          The normalized ``x``, of the same shape.

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
        names = [k for k in _STATS if getattr(self, k, None) is not None]
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


# ------------------------------------------------------------------------------- convert()

# jaxbn's options that BatchNorm exposes beyond Flax's (its class attributes of the names of
# Options' fields).
_JAXBN_OPTIONS = tuple(f for f in Options._fields if f in vars(BatchNorm))
# Constructor arguments of BatchNorm that convert() may override, and those it may not: the
# latter decide which parameters exist and how they were created, and the layer's own
# parameters are kept.
_OVERRIDABLE = ("use_running_average", "axis", "momentum", "epsilon", "dtype", "axis_name",
                "axis_index_groups", "use_fast_variance", "promote_dtype", *_JAXBN_OPTIONS)
_FIXED = ("num_features", "param_dtype", "use_bias", "use_scale", "bias_init", "scale_init",
          "bias_metadata", "scale_metadata", "rngs")
_FLAX_SETTINGS = ("use_running_average", "axis", "momentum", "epsilon", "dtype", "param_dtype",
                  "use_bias", "use_scale", "axis_name", "axis_index_groups",
                  "use_fast_variance", "promote_dtype")


def _where(path: tuple) -> str:
    return "/".join(map(str, path)) or "the model itself"


def _converted(old: nnx.BatchNorm, overrides: dict[str, Any], path: tuple) -> nnx.BatchNorm:
    """The layer that takes ``old``'s place: ``old`` itself, or a ``BatchNorm`` with its
    settings (then ``overrides``) holding its very Variable objects."""
    if isinstance(old, BatchNorm):
        if type(old) is BatchNorm and overrides:
            settings = {k: getattr(old, k) for k in (*_FLAX_SETTINGS, *_JAXBN_OPTIONS)}
        elif overrides:
            raise TypeError(f"jaxbn.nnx.convert: the layer at {_where(path)} is a "
                            f"{type(old).__qualname__}, a subclass of jaxbn.nnx.BatchNorm; "
                            f"convert() cannot rebuild it with overrides: set them on it")
        else:
            return old
    elif type(old) is nnx.BatchNorm:
        settings = {k: getattr(old, k) for k in _FLAX_SETTINGS}
    else:
        raise TypeError(f"jaxbn.nnx.convert: the layer at {_where(path)} is a "
                        f"{type(old).__module__}.{type(old).__qualname__}, a subclass of "
                        f"flax.nnx.BatchNorm whose code convert() cannot carry over; convert "
                        f"replaces flax.nnx.BatchNorm itself (subclass jaxbn.nnx.BatchNorm "
                        f"instead)")
    new = BatchNorm(old.num_features, **{**settings, **overrides}, rngs=nnx.Rngs(0))
    for name in ("scale", "bias", *_STATS):  # the same Variables: values, dtypes, metadata
        variable = vars(old).get(name)
        if isinstance(variable, nnx.Variable):
            setattr(new, name, variable)
    return new


def convert(model: Any, **overrides: Any) -> Any:
    """Replaces every ``flax.nnx.BatchNorm`` in ``model`` by a ``jaxbn.nnx.BatchNorm``.

    The NNX counterpart of PyTorch's ``SyncBatchNorm.convert_sync_batchnorm``, for model code
    that is not edited. Each ``flax.nnx.BatchNorm`` found anywhere in the graph (attributes,
    ``nnx.List``/``nnx.Dict``, lists, dicts and tuples, nested modules) is replaced by a
    ``jaxbn.nnx.BatchNorm`` with the same settings (``use_running_average``, ``axis``,
    ``momentum``, ``epsilon``, ``dtype``, ``param_dtype``, ``axis_name``, ...) that holds the
    layer's very ``nnx.Param``/``nnx.BatchStat`` objects, so values, dtypes, shardings and
    metadata are kept, as are ``nnx.state(model)``'s paths (checkpoints load unchanged). A
    layer referenced from several places stays one layer.

    ``model`` is changed in place and returned (as PyTorch does): keep using it, or the return
    value. When ``model`` is itself a BatchNorm (or a tuple), it cannot be changed in place:
    use the return value. The replaced ``flax.nnx.BatchNorm`` objects are left out of the
    model; they still work, and share their Variables with the new layers. For a converted
    copy that leaves the original alone, convert ``nnx.clone(model)``.

    ``overrides`` set constructor options on every converted layer: ``axis_name``,
    ``axis_index_groups``, ``momentum``, ``epsilon``, ``dtype``, ``axis``,
    ``use_running_average``, ``use_fast_variance``, ``promote_dtype`` and jaxbn's own
    (``unbiased_running_var``, ``virtual_batch_size``, ``renorm``, ``skip_nonfinite``,
    ``sync_method``). With overrides, existing ``jaxbn.nnx.BatchNorm`` layers are rebuilt
    with them too; without, they are left as they are. ``momentum=None`` adds a ``count``
    BatchStat (from 0). Unknown names raise a TypeError, as do the options that decide which
    parameters exist (``use_bias``, ``use_scale``, ``param_dtype``, initializers, metadata).
    A subclass of ``flax.nnx.BatchNorm`` (other than jaxbn's) raises a TypeError: its own
    code cannot be carried over.

    Args:
      model: an NNX module (or a graph of them: lists, dicts, tuples).
      **overrides: constructor options to set on every converted layer.

    Returns:
      ``model`` (changed in place), or the new object where ``model`` could not be changed.

    Example:
      >>> import jax.numpy as jnp, jaxbn
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
      ...                        nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
      >>> model = jaxbn.nnx.convert(model, axis_name=None, momentum=0.9)
      >>> type(model.layers[1]).__module__, model.layers[1].momentum
      ('jaxbn.nnx', 0.9)
    """
    from flax.nnx import graphlib  # imported here: the import block above is optional-Flax code

    fixed = sorted(set(overrides) & set(_FIXED))
    if fixed:
        raise TypeError(f"jaxbn.nnx.convert cannot override {fixed}: these options decide which "
                        f"parameters a layer has, and convert() keeps the layer's own; the "
                        f"options it can set are {sorted(_OVERRIDABLE)}")
    unknown = sorted(set(overrides) - set(_OVERRIDABLE))
    if unknown:
        raise TypeError(f"jaxbn.nnx.convert got unknown option(s) {unknown}; the options of "
                        f"jaxbn.nnx.BatchNorm it can set are {sorted(_OVERRIDABLE)}")
    done: dict[int, Any] = {}  # id -> what replaces it (itself when nothing changes)

    def visit(node: Any, path: tuple) -> Any:
        if id(node) in done:
            return done[id(node)]
        if isinstance(node, nnx.BatchNorm):
            done[id(node)] = _converted(node, overrides, path)
            return done[id(node)]
        impl = graphlib.get_node_impl(node)
        if impl is None:  # a Variable, an array, a static value
            return node
        done[id(node)] = node  # before the children: cycles end here
        children = impl.node_dict(node)
        changed = {k: new for k, child in children.items()
                   if (new := visit(child, (*path, k))) is not child}
        if not changed:
            return node
        if impl.set_key is not None:  # a module, nnx.List/Dict, list, dict: in place
            for k, new in changed.items():
                impl.set_key(node, k, new)
            return node
        items, aux = impl.flatten(node)  # an immutable pytree (tuple, namedtuple): rebuilt
        rebuilt = impl.unflatten([(k, changed.get(k, v)) for k, v in items], aux)
        done[id(node)] = rebuilt
        return rebuilt

    return visit(model, ())
