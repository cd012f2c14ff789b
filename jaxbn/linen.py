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
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxbn._src import optional
from jaxbn._src.flax_common import as_hashable, call_core, state_dtypes
from jaxbn._src.layout import make_layout
from jaxbn._src.options import from_attributes

try:  # Flax is optional (pip install 'jaxbn[flax]'): only this module and jaxbn.nnx need it
    import flax
    import flax.errors
    import flax.linen as nn
    from flax.linen import dtypes as flax_dtypes
except ModuleNotFoundError as err:
    optional.raise_missing("flax", __name__, err)
optional.check_version("flax", flax.__version__, __name__)


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
        return _normalize(self, self, x, use_running_average, mask=mask)


class BatchStatsNotMutableError(flax.errors.ModifyScopeVariableError):
    """A training call of a BatchNorm whose ``batch_stats`` collection is immutable.

    A subclass of Flax's ``ModifyScopeVariableError`` (what Flax's own BatchNorm raises
    there), with a message that says what to do.
    """

    def __init__(self, message: str):  # Flax's signature names a variable; this says more
        Exception.__init__(self, message)


def _check_mutable(module: nn.Module) -> None:
    if not module.is_mutable_collection("batch_stats"):
        where = "/".join(module.scope.path) if module.scope is not None else ""
        raise BatchStatsNotMutableError(
            f"the BatchNorm at '{where or '(top level)'}' was called in training mode "
            f"(use_running_average=False), which updates its running statistics, but the "
            f"'batch_stats' collection is immutable in this apply. Pass "
            f"mutable=['batch_stats'] and keep the statistics it returns: "
            f"`y, updates = model.apply(variables, x, mutable=['batch_stats'])`, then "
            f"`variables = {{**variables, **updates}}`. To evaluate, call it with "
            f"use_running_average=True (in most models: train=False).")


def _check_stored(variable: Any, name: str, feature_shape: tuple, x_shape: tuple,
                  axis: Any) -> None:
    shape = tuple(variable.value.shape)
    if shape != tuple(feature_shape):
        raise ValueError(
            f"batch_stats/{name} has shape {shape}, but x of shape {tuple(x_shape)} has "
            f"features {tuple(feature_shape)} along axis={axis!r}: the variables were made "
            f"for other input (a different axis= or feature count, or another model's "
            f"checkpoint). Set axis= to the feature axis, or initialize the model on input of "
            f"this shape.")


def _normalize(module: nn.Module, cfg: BatchNorm, x, use_running_average: bool | None = None,
               *, mask=None):
    """One BatchNorm call: the variables are ``module``'s (created and updated in its scope),
    the settings ``cfg``'s. ``BatchNorm`` passes itself as both; :func:`intercept` passes the
    intercepted ``flax.linen.BatchNorm`` and a ``BatchNorm`` holding its settings."""
    use_running_average = nn.merge_param("use_running_average", cfg.use_running_average,
                                         use_running_average)
    train = not use_running_average
    initializing = module.is_initializing()
    if train and not initializing:
        _check_mutable(module)
    axis = as_hashable(cfg.axis)
    feature_shape = make_layout(x.shape, axis).feature_shape
    declared = jnp.float32 if cfg.force_float32_reductions else cfg.param_dtype
    mean_dt, var_dt = state_dtypes(declared, x.dtype, cfg.dtype)
    mean = module.variable("batch_stats", "mean", lambda s: jnp.zeros(s, mean_dt),
                           feature_shape)
    var = module.variable("batch_stats", "var", lambda s: jnp.ones(s, var_dt), feature_shape)
    for name, stored in (("mean", mean), ("var", var)):
        _check_stored(stored, name, feature_shape, x.shape, cfg.axis)
    extra = {}  # optional state: update count (momentum=None), seen (precise BN)
    if cfg.momentum is None or module.has_variable("batch_stats", "count"):
        extra["count"] = module.variable("batch_stats", "count",
                                         lambda: jnp.zeros((), jnp.int32))
    if module.has_variable("batch_stats", "seen"):
        extra["seen"] = module.variable("batch_stats", "seen",
                                        lambda: None)  # type: ignore[arg-type,return-value]
    params = {}
    if cfg.use_scale:
        params["scale"] = module.param("scale", cfg.scale_init, feature_shape,
                                       cfg.param_dtype)
    if cfg.use_bias:
        params["bias"] = module.param("bias", cfg.bias_init, feature_shape, cfg.param_dtype)
    state = {"mean": mean.value, "var": var.value}
    state.update({k: v.value for k, v in extra.items()})
    if initializing:  # the new state is discarded: hand the core exact float32 (or wider)
        # copies, so that it does not warn about updates of low-precision statistics
        state["mean"], state["var"] = (v.astype(jnp.promote_types(v.dtype, jnp.float32))
                                       for v in (state["mean"], state["var"]))
    out_dtype = flax_dtypes.canonicalize_dtype(x, *params.values(), dtype=cfg.dtype)
    options = from_attributes(cfg, axis=axis, renorm=as_hashable(cfg.renorm),
                              axis_name=None if initializing else cfg.axis_name,
                              axis_index_groups=None if initializing else cfg.axis_index_groups)
    y, new = call_core(x, params, state, train, options, mask, out_dtype)
    if train and not initializing:
        mean.value, var.value = new["mean"], new["var"]
        for k, v in extra.items():
            v.value = new[k]
    return y


# ------------------------------------------------------------------------------ intercept()

_SETTINGS = tuple(f for f in BatchNorm.__dataclass_fields__ if f not in ("parent", "name"))
# Fields that decide which variables exist and how they are created: not overridable.
_FIXED = ("use_bias", "use_scale", "param_dtype", "bias_init", "scale_init",
          "force_float32_reductions")
_OVERRIDABLE = sorted(set(_SETTINGS) - set(_FIXED))
# The bodies of the two __call__ methods (linen wraps each method with functools.wraps):
# intercept() replaces exactly these, so a subclass's own __call__ still runs (and a
# super().__call__ in it is intercepted).
_FLAX_CALL = nn.BatchNorm.__dict__["__call__"].__wrapped__
_JAXBN_CALL = BatchNorm.__dict__["__call__"].__wrapped__


def _thread_local() -> Any:
    import threading  # imported here: the import block above is kept as Flax-optional code

    return threading.local()


_ACTIVE = _thread_local()  # .stack: this thread's open intercept() overrides, outermost first


def _active_overrides() -> list[dict[str, Any]]:
    if not hasattr(_ACTIVE, "stack"):
        _ACTIVE.stack = []
    return _ACTIVE.stack


def _settings(module: nn.BatchNorm, overrides: dict[str, Any]) -> BatchNorm:
    """An unbound ``BatchNorm`` with ``module``'s settings (jaxbn's own fields at their defaults
    for a Flax layer), then ``overrides``."""
    fields = {f: getattr(module, f) for f in _SETTINGS if hasattr(module, f)}
    return BatchNorm(**{**fields, **overrides, "parent": None})


def _interceptor(next_fun, args, kwargs, context):
    """The ``nn.intercept_methods`` hook: runs jaxbn's BatchNorm where Flax's would run."""
    body = getattr(context.orig_method, "func", None)
    stack = _active_overrides()
    if context.method_name == "__call__" and stack:
        overrides = {k: v for layer in stack for k, v in layer.items()}  # inner ones win
        if body is _FLAX_CALL or (body is _JAXBN_CALL and overrides):
            module = context.module
            return _normalize(module, _settings(module, overrides), *args, **kwargs)
    return next_fun(*args, **kwargs)


class _Intercept:
    """What :func:`intercept` returns: a context manager and a function decorator."""

    def __init__(self, overrides: dict[str, Any]):
        self.overrides = overrides
        self._exits: list[Any] = []

    def __enter__(self) -> None:
        stack = _active_overrides()
        hook = None
        if not stack:  # the outermost intercept() of this thread registers the one hook
            hook = nn.intercept_methods(_interceptor)
            hook.__enter__()
        stack.append(self.overrides)
        self._exits.append(hook)

    def __exit__(self, *exc_info: Any) -> None:
        stack = _active_overrides()
        if not self._exits or not stack or stack[-1] is not self.overrides:
            raise RuntimeError("jaxbn.linen.intercept() contexts must be exited in the reverse "
                               "order of entering them, in the thread that entered them")
        hook = self._exits.pop()
        stack.pop()
        if hook is not None:
            hook.__exit__(*exc_info)

    def __call__(self, fn: Any) -> Any:
        import functools  # see _thread_local

        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with _Intercept(self.overrides):
                return fn(*args, **kwargs)

        return wrapped


def intercept(**overrides: Any) -> _Intercept:
    """Runs every ``flax.linen.BatchNorm`` with jaxbn, in model code that is not edited.

    Under ``with jaxbn.linen.intercept(**overrides):``, each call of a ``flax.linen.BatchNorm``
    (of any model, however its class was bound: ``nn.BatchNorm``, ``from flax.linen import
    BatchNorm`` or a ``functools.partial`` made at import) computes exactly what
    ``jaxbn.linen.BatchNorm`` with the same fields computes, in the layer's own scope: the
    variables, their names and the tree (``params/{scale,bias}``,
    ``batch_stats/{mean,var}``) are the ones the model already has, so its checkpoints load
    unchanged. Outside the context nothing changes. The mechanism is Flax's
    ``nn.intercept_methods``; Flax's BatchNorm code does not run.

    ``overrides`` set fields of every intercepted layer: Flax's (``axis_name``,
    ``axis_index_groups``, ``momentum``, ``epsilon``, ``dtype``, ``axis``,
    ``use_running_average``) and jaxbn's (``unbiased_running_var``, ``virtual_batch_size``,
    ``renorm``, ``skip_nonfinite``, ``sync_method``). With overrides,
    ``jaxbn.linen.BatchNorm`` layers take them too; without, they run as they are. An unknown
    name raises a TypeError, and so do the fields that decide which variables exist
    (``use_bias``, ``use_scale``, ``param_dtype``, ``bias_init``, ``scale_init``,
    ``force_float32_reductions``). ``momentum=None`` (jaxbn's cumulative average) needs a
    ``batch_stats/count`` variable: it is created where the collection is mutable (``init``,
    training), and is missing from older checkpoints.

    Scope and nesting: the context is per thread (as Flax's interceptors are) and may be
    nested: an inner ``intercept()`` adds its overrides to the outer ones (the inner value of a
    field wins) until it exits. Method interceptors that are registered inside it do not see
    the BatchNorm calls it computes. It also works as a decorator (``@intercept(...)``).

    ``jax.jit`` caches what it traced: put the context *inside* the jitted (or
    ``pmap``/``shard_map``-ed) function, as in the example, so that every trace sees it; a
    function traced outside the context keeps Flax's computation when called inside it, and
    one traced inside keeps jaxbn's when called outside.

    Args:
      **overrides: field values to set on every intercepted BatchNorm.

    Returns:
      A context manager that can also decorate a function.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxbn
      >>> class Net(nn.Module):  # code you cannot edit
      ...     @nn.compact
      ...     def __call__(self, x, train):
      ...         return nn.BatchNorm(use_running_average=not train)(nn.Dense(3)(x))
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> @jax.jit
      ... def train_step(variables, x):
      ...     with jaxbn.linen.intercept(momentum=0.5):
      ...         return Net().apply(variables, x, train=True, mutable=["batch_stats"])
      >>> variables = Net().init(jax.random.key(0), x, train=False)
      >>> y, updates = train_step(variables, x)
      >>> sorted(updates["batch_stats"]["BatchNorm_0"])
      ['mean', 'var']
    """
    fixed = sorted(set(overrides) & set(_FIXED))
    if fixed:
        raise TypeError(f"jaxbn.linen.intercept() cannot override {fixed}: these fields decide "
                        f"which variables a layer has, and intercept() keeps the model's "
                        f"variables (and checkpoints) as they are; the fields it can set are "
                        f"{_OVERRIDABLE}")
    unknown = sorted(set(overrides) - set(_OVERRIDABLE))
    if unknown:
        raise TypeError(f"jaxbn.linen.intercept() got unknown field(s) {unknown}; the fields of "
                        f"jaxbn.linen.BatchNorm it can set are {_OVERRIDABLE}")
    return _Intercept(dict(overrides))
