"""Float64 plain-``jnp`` BatchNorm from the papers' equations, differentiable in every JAX mode.

Independent of jaxbn (it shares no code with it) and written from:

* Ioffe & Szegedy 2015 (arXiv:1502.03167), Alg. 1: ``y = scale * (x - mean) / sqrt(var + eps)
  + bias`` with the batch's mean and biased variance per feature (every axis but the last is
  reduced). A mask enters as weights: only weighted elements count toward the statistics,
  every element is normalized.
* Ioffe 2017 (Batch Renormalization, arXiv:1702.03275): ``y = scale * ((x - mean) / sigma_B * r
  + d) + bias`` with ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and ``d = clip((mean - mu) /
  sigma, -d_max, d_max)``, both ``stop_gradient``-ed; ``mu``, ``sigma`` are the running ones
  (``sigma = sqrt(running_var + eps)``).
* Ghost batches (Hoffer et al. 2017): consecutive groups of ``virtual_batch_size`` rows along
  axis 0 are normalized with their own statistics; the running update uses the average of the
  groups' means and of their variances.
* Running statistics: Flax's convention ``new = momentum * old + (1 - momentum) * batch``;
  ``momentum=None`` is the plain average of all batch statistics (``state["count"]`` earlier
  updates); a state holding ``seen`` (precise statistics) becomes the exact mean and variance of
  everything seen so far plus this batch (the pooled population formula). Updates carry no
  gradient. A batch with no weighted element leaves the statistics unchanged.

Everything is ``jax.numpy`` so JAX can differentiate it in forward and reverse mode to any
order. Call it inside ``with jax.enable_x64(True):`` (see :func:`in_float64`), so the whole
computation runs in float64 without flipping x64 globally.

Example:
  >>> import numpy as np
  >>> params = {"scale": np.ones(1), "bias": np.zeros(1)}
  >>> state = {"mean": np.zeros(1), "var": np.ones(1), "count": np.zeros((), np.int32)}
  >>> x = np.array([[0.0], [2.0], [4.0]])
  >>> y, new = in_float64(bn_train)(params, state, x, momentum=0.5)
  >>> np.round(y[:, 0], 3).tolist(), new["mean"].tolist(), y.dtype
  ([-1.225, 0.0, 1.225], [1.0], dtype('float64'))
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

f64 = jnp.float64


def _as64(tree: Any) -> Any:
    """Floating leaves to float64 JAX arrays, others (ints, bools) as JAX arrays."""
    def conv(a):
        a = np.asarray(a)
        return jnp.asarray(a, f64) if np.issubdtype(a.dtype, np.floating) else jnp.asarray(a)
    return jax.tree.map(conv, tree)


def in_float64(fn: Callable) -> Callable:
    """Runs ``fn`` under a local ``jax.enable_x64(True)`` with float leaves cast to float64.

    Positional and keyword array arguments are converted; results come back as NumPy arrays.
    The reference is plain NumPy-style code: it may broadcast by rank (CI runs jaxbn with
    ``JAX_NUMPY_RANK_PROMOTION=raise``, which is jaxbn's contract, not the reference's).
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with jax.enable_x64(True), jax.numpy_rank_promotion("allow"):
            args = tuple(None if a is None else _as64(a) for a in args)
            kwargs = {k: v if k not in ("mask", "renorm") or v is None else _as64(v)
                      for k, v in kwargs.items()}
            out = fn(*args, **kwargs)
            return jax.tree.map(np.asarray, out)
    return wrapper


def _moments(x, w, axes):
    """Weighted mean, biased variance and weight total over ``axes`` (kept as size 1)."""
    n = jnp.sum(w, axis=axes, keepdims=True)
    nn = jnp.maximum(n, 1.0)
    mean = jnp.sum(w * x, axis=axes, keepdims=True) / nn
    var = jnp.sum(w * jnp.square(x - mean), axis=axes, keepdims=True) / nn
    return mean, var, n


def batch_stats(x, mask=None, virtual_batch_size=None, pooled=False):
    """The statistics a training step feeds the running update: ``(mean, var, n)`` per feature.

    Ghost batches give the average of the groups' means and of their variances, unless
    ``pooled`` (precise statistics want the whole batch's). ``n`` is the weighted count.
    """
    x = jnp.asarray(x, f64)
    w = _weights(x, mask)
    feat = x.shape[-1:]
    if virtual_batch_size is None or pooled:
        mean, var, n = _moments(x, w, tuple(range(x.ndim - 1)))
        return mean.reshape(feat), var.reshape(feat), n.reshape(feat)
    xg, wg = _groups(x, w, virtual_batch_size)
    mean, var, n = _moments(xg, wg, tuple(range(1, xg.ndim - 1)))
    return (mean.reshape((-1,) + feat).mean(0), var.reshape((-1,) + feat).mean(0),
            n.reshape((-1,) + feat).sum(0))


def _weights(x, mask):
    if mask is None:
        return jnp.ones_like(x)
    return jnp.broadcast_to(jnp.asarray(mask), x.shape).astype(f64)


def _groups(x, w, size):
    shape = (x.shape[0] // size, size) + x.shape[1:]
    return x.reshape(shape), w.reshape(shape)


def normalize(params, state, x, *, epsilon=1e-5, mask=None, renorm=None,
              virtual_batch_size=None):
    """Training-mode output ``y`` (float64), from this batch's (or each ghost batch's) stats."""
    x = jnp.asarray(x, f64)
    w = _weights(x, mask)
    size = x.shape[0] if virtual_batch_size is None else virtual_batch_size
    xg, wg = _groups(x, w, size)
    mean, var, _ = _moments(xg, wg, tuple(range(1, xg.ndim - 1)))
    sigma_b = jnp.sqrt(var + epsilon)
    xhat = (xg - mean) / sigma_b
    if renorm is not None:
        r_max, d_max = renorm
        sigma = jnp.sqrt(jnp.asarray(state["var"], f64) + epsilon)
        r = jax.lax.stop_gradient(jnp.clip(sigma_b / sigma, 1.0 / r_max, r_max))
        d = jax.lax.stop_gradient(jnp.clip((mean - state["mean"]) / sigma, -d_max, d_max))
        xhat = xhat * r + d
    if "scale" in params:
        xhat = xhat * params["scale"]
    if "bias" in params:
        xhat = xhat + params["bias"]
    return xhat.reshape(x.shape)


def update(state, mean, var, n, momentum):
    """The running update given this batch's statistics (no gradient flows into it)."""
    mean, var, n = (jax.lax.stop_gradient(v) for v in (mean, var, n))
    old_m, old_v = state["mean"], state["var"]
    new = dict(state)
    if "seen" in state:  # precise: exact statistics of everything seen so far
        seen = state["seen"]
        total = seen + n
        tt = jnp.maximum(total, 1.0)
        m = (seen * old_m + n * mean) / tt
        v = (seen * (old_v + jnp.square(old_m - m)) + n * (var + jnp.square(mean - m))) / tt
        new["seen"] = total
    elif momentum is None:  # plain average of all batch statistics
        k = state["count"].astype(f64)
        m = (k * old_m + mean) / (k + 1)
        v = (k * old_v + var) / (k + 1)
    else:
        m = momentum * old_m + (1 - momentum) * mean
        v = momentum * old_v + (1 - momentum) * var
    ok = n > 0
    new["mean"], new["var"] = jnp.where(ok, m, old_m), jnp.where(ok, v, old_v)
    if "count" in state:
        new["count"] = state["count"] + jnp.any(ok).astype(state["count"].dtype)
    return new


def bn_train(params, state, x, *, momentum=0.99, epsilon=1e-5, mask=None, renorm=None,
             virtual_batch_size=None):
    """One training step: ``(y, new_state)``, all float64; same options as ``jaxbn.bn_apply``."""
    y = normalize(params, state, x, epsilon=epsilon, mask=mask, renorm=renorm,
                  virtual_batch_size=virtual_batch_size)
    mean, var, n = batch_stats(x, mask, virtual_batch_size, pooled="seen" in state)
    return y, update(state, mean, var, n, momentum)


# ---------------------------------------------------------------------------------------------
# Running error analysis: a bound on how far a float32 evaluation of a function can be from its
# exact value, computed alongside a float64 evaluation (Wilkinson's running error analysis).

# Primitives that move or select values without rounding: their errors move with them.
_STRUCTURAL = {"broadcast_in_dim", "reshape", "squeeze", "expand_dims", "transpose", "slice",
               "dynamic_slice", "concatenate", "split", "stack", "pad", "rev", "copy", "copy_p",
               "stop_gradient", "convert_element_type", "select_n", "gather"}
# Roundings of one elementwise result, in units of u * |result|: 1 for a correctly rounded
# operation; a product or quotient 2 (a float64 constant among its operands is rounded to
# float32 first); square roots and transcendental functions a few (XLA:CPU approximates them).
_ULPS = {"add": 1, "sub": 1, "add_any": 1, "mul": 2, "div": 3, "square": 1, "sqrt": 2,
         "rsqrt": 5, "tanh": 8, "exp": 5, "log": 5, "logistic": 8}
_CALLS = {"jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint"}
_F32_INT = 2.0 ** 24  # integers below this are exact in float32: sums of counts stay exact


def _is_float(a) -> bool:
    return np.issubdtype(np.asarray(a).dtype, np.inexact)


def _small_ints(*arrays) -> bool:
    return all(np.all(np.isfinite(a)) and np.all(np.floor(a) == a)
               and np.all(np.abs(a) < _F32_INT) for a in arrays)


def _propagate(eqn, vals, errs, out, u):
    """Error bound of ``out`` (float64), given its inputs' values and bounds (first order)."""
    name = eqn.primitive.name
    p = eqn.params
    absv = [np.abs(v) if _is_float(v) else None for v in vals]
    zero = [np.zeros(np.shape(v)) for v in vals]
    e = [zero[i] if errs[i] is None else errs[i] for i in range(len(vals))]
    fresh = _ULPS.get(name, 0) * u * np.abs(out)
    if name in ("add", "sub", "add_any", "mul") and _small_ints(out, *vals) and not any(
            np.any(x) for x in e):
        return np.zeros(np.shape(out))  # exact integer arithmetic (counts)
    if name in _STRUCTURAL:
        if name == "convert_element_type" and not _is_float(vals[0]):
            return np.zeros(np.shape(out))  # counts and masks: exact
        if name == "select_n":
            return np.asarray(eqn.primitive.bind(vals[0], *e[1:], **p))
        args = [e[i] if _is_float(vals[i]) else vals[i] for i in range(len(vals))]
        res = eqn.primitive.bind(*args, **p)
        return [np.asarray(r) for r in res] if eqn.primitive.multiple_results else np.asarray(res)
    if name in ("add", "sub", "add_any"):
        return e[0] + e[1] + fresh
    if name == "mul":
        return absv[1] * e[0] + absv[0] * e[1] + e[0] * e[1] + fresh
    if name == "div":
        b = absv[1]
        return (e[0] + absv[0] * e[1] / b) / np.maximum(b - e[1], np.finfo(float).tiny) + fresh
    if name == "square":
        return 2 * absv[0] * e[0] + e[0] ** 2 + fresh
    if name == "integer_pow":
        n = abs(p["y"])
        return n * np.abs(vals[0]) ** (n - 1) * e[0] + n * u * np.abs(out)
    if name == "sqrt":
        return e[0] / (2 * np.maximum(np.abs(out), np.finfo(float).tiny)) + fresh
    if name == "rsqrt":
        return np.abs(out) * e[0] / (2 * absv[0]) + fresh
    if name == "tanh":
        return (1 - out ** 2) * e[0] + fresh + u * np.abs(vals[0]) * (1 - out ** 2)
    if name == "exp":
        return np.abs(out) * e[0] + fresh
    if name == "log":
        return e[0] / absv[0] + fresh + u
    if name in ("max", "min"):
        return np.broadcast_to(np.maximum(e[0], e[1]), np.shape(out))
    if name == "clamp":
        return np.broadcast_to(np.maximum(np.maximum(e[0], e[1]), e[2]), np.shape(out))
    if name in ("abs", "neg"):
        return e[0]
    if name == "reduce_sum":
        n = int(np.prod([np.shape(vals[0])[a] for a in p["axes"]]))
        summed = [np.asarray(eqn.primitive.bind(a, **p)) for a in (e[0], absv[0])]
        if _small_ints(vals[0]) and not np.any(e[0]):
            return np.zeros(np.shape(out))
        return summed[0] + n * u * summed[1]
    if name in ("reduce_max", "reduce_min"):
        return np.asarray(jax.lax.reduce_max_p.bind(e[0], **p))
    if name == "dot_general":
        (ca, _), _ = p["dimension_numbers"]
        k = int(np.prod([np.shape(vals[0])[a] for a in ca]))
        dot = functools.partial(eqn.primitive.bind, **p)
        return (np.asarray(dot(absv[0], e[1])) + np.asarray(dot(e[0], absv[1]))
                + k * u * np.asarray(dot(absv[0], absv[1])))
    raise NotImplementedError(f"running error bound: no rule for {name}")


def _run(jaxpr, consts, vals, errs, u):
    """Evaluates ``jaxpr`` on float64 ``vals`` with error bounds ``errs`` (None: exact)."""
    env: dict = {}

    def read(v):
        if hasattr(v, "val"):  # a literal: a float64 constant rounded once in float32
            val = np.asarray(v.val)
            exact = not _is_float(val) or np.all(val.astype(np.float32) == val)
            return val, None if exact else u * np.abs(val)
        return env[v]

    for v, val in zip(jaxpr.constvars, consts, strict=True):
        val = np.asarray(val)
        env[v] = (val, None if not _is_float(val) or np.all(val.astype(np.float32) == val)
                  else u * np.abs(val))
    for v, val, err in zip(jaxpr.invars, vals, errs, strict=True):
        env[v] = (val, err)
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        iv, ie = [a for a, _ in ins], [b for _, b in ins]
        name = eqn.primitive.name
        if name in _CALLS:
            sub = eqn.params["jaxpr"]
            inner, sub_consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, ())
            outs = _run(inner, sub_consts, iv, ie, u)
        elif name == "scan":
            outs = _run_scan(eqn, iv, ie, u)
        else:
            res = eqn.primitive.bind(*iv, **eqn.params)
            res = [np.asarray(r) for r in res] if eqn.primitive.multiple_results else [
                np.asarray(res)]
            if any(_is_float(r) for r in res):  # comparisons, counts of bools: no error
                err = _propagate(eqn, iv, ie, res[0] if len(res) == 1 else res, u)
                err = err if eqn.primitive.multiple_results else [err]
            else:
                err = [None] * len(res)
            outs = [(r, e if _is_float(r) else None) for r, e in zip(res, err, strict=True)]
        for v, o in zip(eqn.outvars, outs, strict=True):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _run_scan(eqn, vals, errs, u):
    p = eqn.params
    body, nc, ncarry = p["jaxpr"], p["num_consts"], p["num_carry"]
    consts = list(zip(vals[:nc], errs[:nc], strict=True))
    carry = list(zip(vals[nc:nc + ncarry], errs[nc:nc + ncarry], strict=True))
    xs = list(zip(vals[nc + ncarry:], errs[nc + ncarry:], strict=True))
    steps = range(p["length"] - 1, -1, -1) if p["reverse"] else range(p["length"])
    ys: list = []
    for i in steps:
        ins = consts + carry + [(x[i], None if e is None else e[i]) for x, e in xs]
        out = _run(body.jaxpr, body.consts, [a for a, _ in ins], [b for _, b in ins], u)
        carry, y = out[:ncarry], out[ncarry:]
        ys.append(y)
    if p["reverse"]:
        ys.reverse()
    stacked = []
    for k in range(len(eqn.outvars) - ncarry):
        v = np.stack([y[k][0] for y in ys])
        e = None if all(y[k][1] is None for y in ys) else np.stack(
            [np.zeros(np.shape(y[k][0])) if y[k][1] is None else y[k][1] for y in ys])
        stacked.append((v, e))
    return carry + stacked


def rounding_bound(fn: Callable, *args, dtype=np.float32) -> tuple[Any, Any]:
    """``(fn(*args) in float64, a bound on |fn(*args) in dtype - exact|)``, leaf by leaf.

    A first-order running error analysis of ``fn``'s jaxpr (traced in float64, transforms
    included: gradients, Hessian-vector products, scans): every rounded operation adds a few
    units of ``u`` (``dtype``'s unit roundoff) times its result, a sum of ``n`` terms ``n u`` times
    the sum of their magnitudes (any summation order), and the bounds already carried are
    propagated by the absolute values of each operation's partial derivatives. The inputs are
    taken as exact (float32 data); float64 constants are rounded once. Integer-valued sums and
    products below 2**24 (counts) are exact. The bound is of ``fn``'s own algorithm run in
    ``dtype``: for the plain-``jnp`` reference above, of a textbook two-pass BatchNorm.
    """
    u = float(np.finfo(np.dtype(dtype)).eps) / 2
    with jax.enable_x64(True), jax.numpy_rank_promotion("allow"):
        flat, tree = jax.tree.flatten(_as64(args))
        closed = jax.make_jaxpr(lambda *leaves: fn(*jax.tree.unflatten(tree, leaves)))(*flat)
        out_tree = jax.tree.structure(jax.eval_shape(
            lambda *leaves: fn(*jax.tree.unflatten(tree, leaves)), *flat))
        outs = _run(closed.jaxpr, closed.consts, [np.asarray(a) for a in flat],
                    [None] * len(flat), u)
    values = [np.asarray(v) for v, _ in outs]
    bounds = [np.zeros(np.shape(v)) if e is None else np.asarray(e) for v, e in outs]
    return jax.tree.unflatten(out_tree, values), jax.tree.unflatten(out_tree, bounds)
