"""Counting the collectives a function performs: as traced, and as XLA compiled them.

XLA's combiner passes may merge several all-reduces into one tuple-shaped all-reduce, so the
compiled count can be lower than the traced one (and differs between backends). Both matter:
the traced count is what a layer asks for; the compiled count is what runs on this backend.

Example:
  >>> import jax, jax.numpy as jnp, jaxbn
  >>> from jaxbn.counting import count_collectives
  >>> params, state = jaxbn.bn_init(4)
  >>> f = jax.pmap(lambda x: jaxbn.bn_apply(params, state, x, True, axis_name="d")[0],
  ...              axis_name="d")
  >>> count_collectives(f, jnp.ones((jax.device_count(), 2, 4)))
  CollectiveCount(traced=1, compiled=1)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.extend as jex

# Primitive names of JAX collectives (the vma-typed variants share these prefixes).
_PRIMITIVES = ("psum", "pmax", "pmin", "all_gather", "all_to_all", "ppermute", "psum_scatter",
               "reduce_scatter")
# An HLO instruction whose opcode is a collective; its result shape may be a tuple.
_HLO = re.compile(r"\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|"
                  r"collective-broadcast)(?:-start)?\(")


class CollectiveCount(NamedTuple):
    traced: int  # collective primitives in the jaxpr, including those inside nested jaxprs
    compiled: int  # collective instructions in the optimized HLO of this backend


def count_traced(jaxpr: jex.core.Jaxpr) -> int:
    """Collective primitives in ``jaxpr`` and every jaxpr nested in its equations."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name.startswith(_PRIMITIVES)
        n += sum(count_traced(sub) for sub in jex.core.jaxprs_in_params(eqn.params))
    return n


def count_compiled(hlo_text: str) -> int:
    """Collective instructions in optimized HLO text (async pairs count once)."""
    return len(_HLO.findall(hlo_text))


def count_collectives(fn: Callable, *args: Any) -> CollectiveCount:
    """Counts the collectives of ``fn(*args)``; ``fn`` may be jitted, pmapped or plain (it is
    then jitted). Run under ``jax.set_mesh`` when ``fn`` is a shard_map over explicit axes."""
    closed = jax.make_jaxpr(fn)(*args)
    lowerable = fn if hasattr(fn, "lower") else jax.jit(fn)
    text = lowerable.lower(*args).compile().as_text()
    return CollectiveCount(count_traced(closed.jaxpr), count_compiled(text))
