"""``jaxbn.linen.intercept``: every ``flax.linen.BatchNorm`` call computed by jaxbn, in model
code that is not edited, through Flax's ``nn.intercept_methods``.

It needs Flax: only ``jaxbn.linen`` imports it.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax.linen as nn

from jaxbn._src.flax_common import check_overrides

if TYPE_CHECKING:
    from jaxbn.linen import BatchNorm

# Fields that decide which variables exist and how they are created: not overridable.
FIXED = ("use_bias", "use_scale", "param_dtype", "bias_init", "scale_init",
         "force_float32_reductions")
# The body of Flax's __call__ (linen wraps each method with functools.wraps): intercept()
# replaces exactly it and jaxbn's (:func:`_jaxbn_call`), so a subclass's own __call__ still
# runs (and a super().__call__ in it is intercepted).
_FLAX_CALL = nn.BatchNorm.__dict__["__call__"].__wrapped__
_ACTIVE = threading.local()  # .stack: this thread's open intercept() overrides, outermost first


@functools.cache
def _jaxbn() -> tuple[type[BatchNorm], Callable[..., Any]]:
    """``jaxbn.linen.BatchNorm`` and the call it runs (``normalize``, of
    ``jaxbn._src.linen_layer``), from ``jaxbn.linen`` (imported here: it imports this module)."""
    from jaxbn.linen import BatchNorm, normalize

    return BatchNorm, normalize


def _fields() -> tuple[str, ...]:
    """The settings of ``jaxbn.linen.BatchNorm``: its fields but ``parent`` and ``name``."""
    return tuple(f for f in _jaxbn()[0].__dataclass_fields__ if f not in ("parent", "name"))


def _jaxbn_call() -> Any:
    """The body of ``jaxbn.linen.BatchNorm.__call__``."""
    return _jaxbn()[0].__dict__["__call__"].__wrapped__


def _active_overrides() -> list[dict[str, Any]]:
    if not hasattr(_ACTIVE, "stack"):
        _ACTIVE.stack = []
    return _ACTIVE.stack


def _settings(module: nn.BatchNorm, overrides: dict[str, Any]) -> BatchNorm:
    """An unbound ``BatchNorm`` with ``module``'s settings (jaxbn's own fields at their defaults
    for a Flax layer), then ``overrides``."""
    fields = {f: getattr(module, f) for f in _fields() if hasattr(module, f)}
    return _jaxbn()[0](**{**fields, **overrides, "parent": None})


def _interceptor(next_fun, args, kwargs, context):
    """The ``nn.intercept_methods`` hook: runs jaxbn's BatchNorm where Flax's would run."""
    body = getattr(context.orig_method, "func", None)
    stack = _active_overrides()
    if context.method_name == "__call__" and stack:
        overrides = {k: v for layer in stack for k, v in layer.items()}  # inner ones win
        if body is _FLAX_CALL or (body is _jaxbn_call() and overrides):
            module = context.module
            normalize = _jaxbn()[1]
            return normalize(module, _settings(module, overrides), *args, **kwargs)
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
    check_overrides(overrides, FIXED, sorted(set(_fields()) - set(FIXED)),
                    who="jaxbn.linen.intercept()", kind="field", owner="jaxbn.linen.BatchNorm",
                    kept="which variables a layer has, and intercept() keeps the model's "
                         "variables (and checkpoints) as they are")
    return _Intercept(dict(overrides))
