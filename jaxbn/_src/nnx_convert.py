"""``jaxbn.nnx.convert``: every ``flax.nnx.BatchNorm`` of a model swapped for a
``jaxbn.nnx.BatchNorm`` that holds its very Variables, for model code that is not edited.

It needs Flax: only ``jaxbn.nnx`` imports it.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
from flax.nnx import graphlib

from jaxbn._src.checks import STATE_KEYS
from jaxbn._src.flax_common import JAXBN_OPTIONS, check_overrides

# Constructor arguments of jaxbn.nnx.BatchNorm that convert() may override, and those it may
# not: the latter decide which parameters exist and how they were created, and the layer's own
# parameters are kept.
OVERRIDABLE = ("use_running_average", "axis", "momentum", "epsilon", "dtype", "axis_name",
               "axis_index_groups", "use_fast_variance", "promote_dtype", *JAXBN_OPTIONS)
FIXED = ("num_features", "param_dtype", "use_bias", "use_scale", "bias_init", "scale_init",
         "bias_metadata", "scale_metadata", "rngs")
_FLAX_SETTINGS = ("use_running_average", "axis", "momentum", "epsilon", "dtype", "param_dtype",
                  "use_bias", "use_scale", "axis_name", "axis_index_groups",
                  "use_fast_variance", "promote_dtype")


def _where(path: tuple) -> str:
    return "/".join(map(str, path)) or "the model itself"


def _converted(old: nnx.BatchNorm, overrides: dict[str, Any], path: tuple) -> nnx.BatchNorm:
    """The layer that takes ``old``'s place: ``old`` itself, or a ``BatchNorm`` with its
    settings (then ``overrides``) holding its very Variable objects."""
    from jaxbn.nnx import BatchNorm  # here: jaxbn.nnx imports this module

    if isinstance(old, BatchNorm):
        if type(old) is BatchNorm and overrides:
            settings = {k: getattr(old, k) for k in (*_FLAX_SETTINGS, *JAXBN_OPTIONS)}
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
    for name in ("scale", "bias", *STATE_KEYS):  # the same Variables: values, dtypes, metadata
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
    check_overrides(overrides, FIXED, OVERRIDABLE, who="jaxbn.nnx.convert", kind="option",
                    owner="jaxbn.nnx.BatchNorm",
                    kept="which parameters a layer has, and convert() keeps the layer's own")
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
