"""The BatchNorm implementations compared, each as ``make(x) -> (apply(params, x), params)``.

``apply`` runs training mode and returns the normalized output only (the running-statistic
update is computed too where the library does it in the same call). Every implementation
normalizes over all axes but the last (Equinox, which wants channels first, gets an NCHW
input of the same size).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jaxbn


def make_jaxbn(x, axis_name=None):
    params, state = jaxbn.bn_init(x.shape[-1])

    def apply(p, x):
        y, new = jaxbn.bn_apply(p, state, x, True, axis_name=axis_name)
        return y, new
    return apply, params


def _make_flax(x, axis_name=None, fast=True):
    import flax.linen as nn

    mod = nn.BatchNorm(use_running_average=False, axis_name=axis_name, use_fast_variance=fast)
    v = mod.init(jax.random.key(0), x[:2])

    def apply(p, x):
        return mod.apply({"params": p, "batch_stats": v["batch_stats"]}, x,
                         mutable=["batch_stats"])
    return apply, v["params"]


def make_flax(x, axis_name=None):
    return _make_flax(x, axis_name, fast=True)


def make_flax_stable(x, axis_name=None):
    return _make_flax(x, axis_name, fast=False)


def make_nnx(x, axis_name=None):
    from flax import nnx

    bn = nnx.BatchNorm(x.shape[-1], axis_name=axis_name, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(bn, nnx.Param, ...)

    def apply(p, x):
        m = nnx.merge(graphdef, p, rest, copy=True)
        y = m(x)
        return y, nnx.state(m, nnx.BatchStat)
    return apply, params


def make_haiku(x, axis_name=None):
    import haiku as hk

    def f(x, axis=axis_name):
        return hk.BatchNorm(True, True, 0.99, cross_replica_axis=axis)(x, is_training=True)

    t = hk.transform_with_state(f)
    # Haiku's init would issue the collective: initialize the same layer unsynchronized.
    params, state = hk.transform_with_state(lambda x: f(x, None)).init(jax.random.key(0), x[:2])

    def apply(p, x):
        return t.apply(p, state, None, x)
    return apply, params


def make_equinox(x, axis_name=None):
    import equinox as eqx

    c = x.shape[1]  # x is channels first
    names = "batch" if axis_name is None else (axis_name, "batch")
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(c, axis_name=names, mode="batch")
    params, static = eqx.partition(bn, eqx.is_inexact_array)

    def apply(p, x):  # x: channels-first per example, vmapped over the batch
        model = eqx.combine(p, static)
        # Equinox forbids reusing a State; traced copies also carry the same (manual-mesh)
        # sharding as the values Equinox computes under pmap/shard_map, which its State.set
        # compares against (a closed-over concrete array has none, hence a failed check).
        fresh = jax.tree.map(lambda a: a + jnp.zeros((), a.dtype), state)
        return jax.vmap(lambda xi: model(xi, fresh), axis_name="batch",
                        out_axes=(0, None))(x)
    return apply, params


def make_two_pass(x, axis_name=None):
    """A plain jnp two-pass BatchNorm (autodiff backward): the naive baseline."""
    c = x.shape[-1]
    params = {"scale": jnp.ones(c), "bias": jnp.zeros(c)}
    axes = tuple(range(x.ndim - 1))

    def apply(p, x):
        xf = x.astype(jnp.float32)
        mean = xf.mean(axes)
        var = jnp.square(xf - mean).mean(axes)
        y = (xf - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]
        return y.astype(x.dtype), (mean, var)
    return apply, params


ANCHORS = {
    "jaxbn": make_jaxbn,
    "flax": make_flax,
    "flax_stable": make_flax_stable,
    "nnx": make_nnx,
    "haiku": make_haiku,
    "equinox": make_equinox,
    "two_pass": make_two_pass,
}


def channels_first(x):
    """NHWC -> NCHW (what Equinox's per-example BatchNorm expects)."""
    return jnp.moveaxis(x, -1, 1)
