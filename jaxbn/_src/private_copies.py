"""Private copies of arrays, so that XLA:CPU reads a low-precision input once per pass.

XLA:CPU fuses an elementwise producer (a bfloat16->float32 convert, ``x - m0``, a product) into
the library reduction that consumes it only when the producer has that one consumer; a producer
shared by two reductions, or by a reduction and the output, is written out in full, in float32
(for a bfloat16 input: twice the input's bytes of temporary memory, written and read back).
This module gives each pass its own copy, which costs no data movement:

* ``fresh`` for values of the computation itself (``x`` and per-feature statistics);
* ``cast_sum`` for the one place reverse mode shares a producer that ``fresh`` cannot reach:
  the conversion of the output's cotangent, which JAX's transpose of ``astype`` makes once
  and fans out to every consumer. ``cast_sum`` is a linear primitive whose transpose hands
  each term its own copy of the cotangent, converted separately.

Other backends get the arrays unchanged: a GPU's sibling multi-output fusion reads ``x`` once
for several sums, which the copies would prevent.

Example:
  >>> import jax.numpy as jnp
  >>> from jaxbn._src.private_copies import cast_sum, fresh
  >>> a, b = fresh(jnp.ones(2), jnp.zeros(2))
  >>> cast_sum([jnp.ones((2, 3)), jnp.arange(3.0)[None]], jnp.bfloat16).tolist()
  [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxbn._src import collectives


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def fresh(*arrays):
    """Copies of ``arrays`` that XLA:CPU cannot merge with the originals (no data moves).

    ``lax.optimization_barrier`` defeats common-subexpression elimination. The barrier is joint
    (one around a lone parameter is simplified away and the copy merged again), and the
    per-feature operands of a pass must go through it with ``x`` (else XLA broadcasts them to
    the full shape, in float32, as inputs of the library kernel). XLA merges two barriers of
    the same operands: take a second copy from the first copy's outputs. Under ``shard_map``
    the outputs vary over the axes any input varies over: use them for local work.

    Example:
      >>> import jax.numpy as jnp
      >>> a, b = fresh(jnp.ones(2), jnp.zeros(2))
      >>> a.tolist(), b.tolist()
      ([1.0, 1.0], [0.0, 0.0])
    """
    if not _on_cpu():
        return arrays
    return lax.optimization_barrier(arrays)


cast_sum_p = Primitive("jaxbn_cast_sum")


def cast_sum(terms: Sequence[jax.Array], dtype) -> jax.Array:
    """``(terms[0] + terms[1] + ...).astype(dtype)``, whose transpose gives every term a private
    copy of the cotangent (on a CPU; elsewhere the plain transpose).

    ``terms[0]`` has the result's shape; the others have the same rank and size-1 axes where
    they broadcast. All terms have one dtype, and under ``shard_map`` they vary over the same
    axes. Linear in every term: ``jvp``, ``vmap``, ``linear_transpose`` and higher derivatives
    go through it.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> f = lambda u, v: cast_sum([u, v], jnp.bfloat16)
      >>> u, v = jnp.ones((2, 2)), jnp.ones((1, 2))
      >>> [g.tolist() for g in jax.grad(lambda u, v: f(u, v).sum(), (0, 1))(u, v)]
      [[[1.0, 1.0], [1.0, 1.0]], [[2.0, 2.0]]]
    """
    _cast_sum_abstract_eval(*(jax.typeof(t) for t in terms), dtype=jnp.dtype(dtype))
    return cast_sum_p.bind(*terms, dtype=jnp.dtype(dtype))


def _cast_sum_impl(*terms, dtype):
    return functools.reduce(operator.add, terms).astype(dtype)


def _cast_sum_abstract_eval(*avals, dtype):
    first = avals[0]
    for a in avals[1:]:
        if (a.ndim != first.ndim or a.dtype != first.dtype
                or any(s not in (1, f) for s, f in zip(a.shape, first.shape, strict=True))):
            raise TypeError(f"cast_sum: every term must broadcast to the first term's shape "
                            f"and dtype {first.str_short()}; got {a.str_short()}")
        if collectives.varying_axes_of_aval(a) != collectives.varying_axes_of_aval(first):
            raise TypeError(f"cast_sum: the terms must vary over the same shard_map axes; "
                            f"got {first.str_short()} and {a.str_short()}")
    return first.update(dtype=dtype, weak_type=False)


def _cast_sum_transpose(ct, *terms, dtype):
    del dtype
    linear = [isinstance(t, ad.UndefinedPrimal) for t in terms]
    copies = [ct] * sum(linear)
    if _on_cpu() and len(copies) > 1:
        copies = list(lax.optimization_barrier(tuple(copies)))
    out = []
    for term, is_linear in zip(terms, linear, strict=True):
        if not is_linear:
            out.append(None)
            continue
        c = copies.pop().astype(term.aval.dtype)
        pairs = zip(term.aval.shape, c.shape, strict=True)
        summed = tuple(a for a, (s, f) in enumerate(pairs) if s != f)
        out.append(jnp.sum(c, axis=summed, keepdims=True) if summed else c)
    return out


def _cast_sum_batch(axis_data, args, dims, *, dtype):
    if all(d is None for d in dims):
        return cast_sum_p.bind(*args, dtype=dtype), None
    moved = [batching.bdim_at_front(a, d, axis_data.size,
                                    mesh_axis=axis_data.explicit_mesh_axis)
             for a, d in zip(args, dims, strict=True)]
    return cast_sum_p.bind(*moved, dtype=dtype), 0


cast_sum_p.def_impl(_cast_sum_impl)
cast_sum_p.def_abstract_eval(_cast_sum_abstract_eval)
ad.deflinear2(cast_sum_p, _cast_sum_transpose)
batching.fancy_primitive_batchers[cast_sum_p] = _cast_sum_batch
mlir.register_lowering(cast_sum_p, mlir.lower_fun(_cast_sum_impl, multiple_results=False))
