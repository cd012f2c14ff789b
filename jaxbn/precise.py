"""Precise BN (recalibration): exact population statistics over N batches, not an EMA.

After training, or after changing weights (e.g. folding, pruning, weight averaging), the
running statistics no longer match the network. Recompute them exactly:

1. ``tree = reset_stats(tree)`` gives every BatchNorm state (any mapping with ``mean`` and
   ``var``, anywhere in a pytree of dicts, lists, tuples or FrozenDicts) zero statistics and a
   ``seen`` counter. A state holding ``seen`` is in precise mode: ``bn_apply(train=True)``
   accumulates the count-weighted mean and variance of every element it sees (Chan's parallel
   rule), whatever the momentum.
2. Run the model in training mode over N batches, keeping the returned states.
3. ``tree = finish_stats(tree)`` drops the ``seen`` counters: the states are ordinary again.

The statistics equal those of the concatenated data (per layer, given the earlier layers'
batch-normalized outputs). With ``axis_name`` the counts are global. The practice comes from
Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021) and fvcore's PreciseBN.

Example:
  >>> import jax.numpy as jnp, jaxbn
  >>> params, state = jaxbn.bn_init(1)
  >>> state = jaxbn.reset_stats(state)
  >>> for batch in (jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [6.0]])):
  ...     _, state = jaxbn.bn_apply(params, state, batch, train=True)
  >>> state = jaxbn.finish_stats(state)
  >>> state["mean"].tolist(), state["var"].tolist()   # of [0, 2, 4, 6]
  ([3.0], [5.0])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

from jaxbn._src.state import same_container

Tree = TypeVar("Tree")  # any pytree: reset_stats/finish_stats return the same type
Variables = TypeVar("Variables", bound=Mapping[str, Any])


def _is_bn_state(node) -> bool:
    return isinstance(node, Mapping) and "mean" in node and "var" in node


def _map_states(tree, fn):
    """Applies ``fn`` to every BatchNorm state (a mapping with ``mean`` and ``var``) in ``tree``:
    any pytree of dicts, lists, tuples, NamedTuples, FrozenDicts... Other leaves are kept."""
    def visit(node):
        return same_container(node, fn(dict(node))) if _is_bn_state(node) else node
    return jax.tree.map(visit, tree, is_leaf=_is_bn_state)


def reset_stats(tree: Tree) -> Tree:
    """Zeroes every BatchNorm state in ``tree`` (any pytree) and switches it to precise
    accumulation."""
    def reset(s):
        out = dict(s)
        out["mean"] = jnp.zeros_like(s["mean"])
        out["var"] = jnp.zeros_like(s["var"])
        out["seen"] = jnp.zeros(jnp.shape(s["mean"]),
                                jnp.promote_types(jnp.result_type(s["mean"]), jnp.float32))
        if "count" in s:
            out["count"] = jnp.zeros_like(s["count"])
        return out
    return _map_states(tree, reset)


def finish_stats(tree: Tree) -> Tree:
    """Ends precise accumulation: removes the ``seen`` counters from every BatchNorm state in
    ``tree`` (any pytree)."""
    return _map_states(tree, lambda s: {k: v for k, v in s.items() if k != "seen"})


def precise_linen_stats(apply_fn: Callable[..., Any], variables: Variables,
                        batches: Iterable[Any], **apply_kwargs: Any) -> Variables:
    """Recomputes the ``batch_stats`` of a Flax linen model built with ``jaxbn.linen``.

    ``apply_fn`` is ``model.apply`` (jit it for speed); each batch is passed as the first
    input, with ``apply_kwargs`` selecting training mode (e.g. ``train=True``). Returns new
    variables (a dict, or a FrozenDict if given one) with exact population statistics.

    Raises:
      KeyError: ``variables`` has no ``batch_stats`` collection.

    Example:
      >>> import jax, jax.numpy as jnp, jaxbn
      >>> bn = jaxbn.linen.BatchNorm(use_running_average=False)
      >>> v = bn.init(jax.random.key(0), jnp.ones((2, 1)))
      >>> data = [jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [6.0]])]
      >>> v = jaxbn.precise_linen_stats(bn.apply, v, data)
      >>> v["batch_stats"]["mean"].tolist(), v["batch_stats"]["var"].tolist()
      ([3.0], [5.0])
    """
    if not isinstance(variables, Mapping) or "batch_stats" not in variables:
        keys = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise KeyError(f"precise_linen_stats needs the model's variables with a 'batch_stats' "
                       f"collection, got {keys}")
    stats = reset_stats(variables["batch_stats"])
    for batch in batches:
        _, upd = apply_fn({**variables, "batch_stats": stats}, batch, mutable=("batch_stats",),
                          **apply_kwargs)
        stats = upd["batch_stats"]
    return same_container(variables, {**variables, "batch_stats": finish_stats(stats)})
