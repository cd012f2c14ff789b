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

A private copy is a primitive of its own, ``private_copy_p`` (the identity: same values, same
types), and the choice of platform is made when it is lowered, not when it is traced: its CPU
lowering is ``lax.optimization_barrier``, every other platform's lowering is the identity (a
GPU's sibling multi-output fusion reads ``x`` once for several sums, which a barrier would
prevent). So one traced function lowers right for each platform: ``jax.jit`` on any backend,
and ``jax.export`` for platforms other than the host's, or for several at once
(``platforms=("cpu", "cuda", "tpu")``: each platform gets its own lowering).

The off switch: the environment variable ``JAXBN_CPU_PRIVATE_COPIES=0`` (also ``false``,
``off``, ``no``; ``1``, ``true``, ``on``, ``yes`` or unset keep them) makes the CPU lowering the
identity as well. It is read each time a private copy is lowered, so set it before a function
is first compiled or exported: a function already compiled keeps its compiled form until
``jax.clear_caches()``.

All of this module's dependence on JAX internals (the primitives' abstract evaluation,
derivative, transpose and batching rules, and lowerings) is in the "JAX internals" section at
the end. ``tests/test_private_copies.py`` (every transformation) and ``tests/test_lowering.py``
(per-platform lowerings, exports) cover it: run them on the oldest and the newest supported
JAX after changing that section or the JAX requirement.

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
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxbn._src import collectives

ENV_VAR = "JAXBN_CPU_PRIVATE_COPIES"
_ON = ("", "1", "true", "on", "yes")
_OFF = ("0", "false", "off", "no")


def cpu_copies_enabled() -> bool:
    """Whether the CPU lowering makes private copies (``JAXBN_CPU_PRIVATE_COPIES``, default on).

    Raises:
      ValueError: the variable holds something else than the values listed in the module
        docstring.

    Example:
      >>> from jaxbn._src.private_copies import cpu_copies_enabled
      >>> cpu_copies_enabled()  # JAXBN_CPU_PRIVATE_COPIES unset
      True
    """
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ValueError(f"{ENV_VAR} must be one of {_ON[1:] + _OFF} (or unset); "
                     f"got {os.environ[ENV_VAR]!r}")


def fresh(*arrays):
    """Copies of ``arrays`` that XLA:CPU cannot merge with the originals (no data moves).

    On a CPU the copy is ``lax.optimization_barrier``, which defeats common-subexpression
    elimination; on other platforms it is the identity (see the module docstring). The barrier
    is joint (one around a lone parameter is simplified away and the copy merged again), and
    the per-feature operands of a pass must go through it with ``x`` (else XLA broadcasts them
    to the full shape, in float32, as inputs of the library kernel). XLA merges two barriers of
    the same operands: take a second copy from the first copy's outputs. Under ``shard_map``
    the outputs vary over the axes any input varies over: use them for local work.

    Example:
      >>> import jax.numpy as jnp
      >>> a, b = fresh(jnp.ones(2), jnp.zeros(2))
      >>> a.tolist(), b.tolist()
      ([1.0, 1.0], [0.0, 0.0])
    """
    if not arrays:
        return ()
    arrays = tuple(a if isinstance(a, jax.Array) else jnp.asarray(a) for a in arrays)
    union = frozenset().union(*(collectives.varying_axes(a) for a in arrays))
    arrays = tuple(_vary_over(a, union) for a in arrays)
    return tuple(private_copy_p.bind(*arrays))


def _vary_over(a: jax.Array, names: frozenset) -> jax.Array:
    missing = tuple(sorted(names - collectives.varying_axes(a), key=str))
    return lax.pcast(a, missing, to="varying") if missing else a


def cast_sum(terms: Sequence[jax.Array], dtype) -> jax.Array:
    """``(terms[0] + terms[1] + ...).astype(dtype)``, whose transpose gives every term a private
    copy of the cotangent (``fresh``: a copy on a CPU, the plain transpose elsewhere).

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


# ---------------------------------------------------------------------------------------------
# JAX internals: everything below registers rules with JAX's interpreters. These interfaces
# change between JAX releases; keep them here, minimal, and covered by the tests named in the
# module docstring.

private_copy_p = Primitive("jaxbn_private_copy")
private_copy_p.multiple_results = True
cast_sum_p = Primitive("jaxbn_cast_sum")


def _private_copy_impl(*arrays):
    return arrays


def _private_copy_abstract_eval(*avals):
    vmas = {collectives.varying_axes_of_aval(a) for a in avals}
    if len(vmas) > 1:
        raise TypeError(f"private copy: the operands must vary over the same shard_map axes "
                        f"(fresh casts them); got {[a.str_short() for a in avals]}")
    return avals


def _bind_nonzero(values, keep):
    """``values`` with those where ``keep`` is true replaced by one joint private copy."""
    chosen = [v for v, k in zip(values, keep, strict=True) if k]
    copies = iter(private_copy_p.bind(*chosen) if chosen else ())
    return [next(copies) if k else v for v, k in zip(values, keep, strict=True)]


def _private_copy_jvp(primals, tangents):
    # the identity is linear: tangents get their own copy; symbolic zeros stay zeros
    keep = [type(t) is not ad.Zero for t in tangents]
    return private_copy_p.bind(*primals), _bind_nonzero(list(tangents), keep)


def _private_copy_transpose(cts, *args):
    keep = [isinstance(a, ad.UndefinedPrimal) and type(ct) is not ad.Zero
            for ct, a in zip(cts, args, strict=True)]
    out = _bind_nonzero(list(cts), keep)
    return [ct if isinstance(a, ad.UndefinedPrimal) else None
            for ct, a in zip(out, args, strict=True)]


def _private_copy_batch(args, dims):
    return private_copy_p.bind(*args), dims


def _identity_lowering(ctx, *args):
    del ctx
    return list(args)


_barrier_lowering = mlir.lower_fun(lambda *a: lax.optimization_barrier(a),
                                   multiple_results=True)


def _cpu_lowering(ctx, *args):
    if not cpu_copies_enabled():
        return _identity_lowering(ctx, *args)
    return _barrier_lowering(ctx, *args)


private_copy_p.def_impl(_private_copy_impl)
private_copy_p.def_abstract_eval(_private_copy_abstract_eval)
ad.primitive_jvps[private_copy_p] = _private_copy_jvp
ad.primitive_transposes[private_copy_p] = _private_copy_transpose
batching.primitive_batchers[private_copy_p] = _private_copy_batch
mlir.register_lowering(private_copy_p, _identity_lowering)
mlir.register_lowering(private_copy_p, _cpu_lowering, platform="cpu")


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
    if len(copies) > 1:
        copies = list(fresh(*copies))
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
