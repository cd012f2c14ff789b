"""Swapping BatchNorm in model code that is not edited (issue 22, item 4).

``jaxbn.linen.intercept()`` and ``jaxbn.nnx.convert()`` on model code written in the layout of
Flax's ImageNet ResNet (``functools.partial(nn.BatchNorm, use_running_average=...,
momentum=0.9, epsilon=1e-5)``, BasicBlock/Bottleneck with projection shortcuts) and of the NNX
examples (an MLP with Dropout, a ResNet in ``nnx.List``), each compared with the same code
built on ``jaxbn.linen.BatchNorm``/``jaxbn.nnx.BatchNorm`` (the import swap: bit for bit, the
code path being the same), and, for single layers, with Flax's own BatchNorm and a float64
NumPy reference within rounding bounds (``tests.reference``).
"""

import contextlib
import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn.linen
import jaxbn.nnx
from tests import reference as ref

U32 = float(np.finfo(np.float32).eps) / 2


def _x(shape, seed=0, loc=1.0, scale=2.0):
    return jnp.asarray(np.random.default_rng(seed).normal(loc, scale, shape), jnp.float32)


def _identical(a, b, what=""):
    """Same tree, shapes, dtypes and bits (random keys compared by their key data)."""
    assert jax.tree.structure(a) == jax.tree.structure(b), what
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert u.shape == v.shape and u.dtype == v.dtype, (what, u.shape, v.shape, u.dtype,
                                                           v.dtype)
        if jnp.issubdtype(u.dtype, jax.dtypes.prng_key):
            u, v = jax.random.key_data(u), jax.random.key_data(v)
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=what)


def _randomized(variables, seed=3):
    """Parameters and running statistics away from their initial values (var > 0)."""
    leaves, tree = jax.tree.flatten_with_path(variables)
    rng = np.random.default_rng(seed)
    out = []
    for path, v in leaves:
        name = jax.tree_util.keystr(path)
        r = rng.uniform(0.5, 1.5, v.shape) if "var" in name or "scale" in name else (
            rng.normal(0.0, 0.5, v.shape))
        out.append(jnp.asarray(r, v.dtype))
    return jax.tree.unflatten(tree, out)


def _bn_bound(x, scale, bias, axes, eps=1e-5, extra_terms=8):
    """Rounding bound of a float32 training-mode BatchNorm output against float64.

    Per feature, over n values: the mean's error is at most (n + k) u sum|x| / n; the biased
    variance's, (n + k) u var + dm**2; y = (x - m) / sqrt(var + eps) * scale + bias then errs by
    |scale| (dm / s + |x - m| / s * (dv / (2 (var + eps)) + k u)) plus a rounding of |y|.
    """
    x = np.asarray(x, np.float64)
    n = np.prod([x.shape[a] for a in axes])
    k = extra_terms
    dm = (n + k) * U32 * np.abs(x).sum(axes, keepdims=True) / n
    mean = x.mean(axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axes, keepdims=True)
    dv = (n + k) * U32 * var + dm ** 2
    s = np.sqrt(var + eps)
    sc = np.abs(np.asarray(scale, np.float64))
    dy = sc * (dm / s + np.abs(x - mean) / s * (dv / (2 * (var + eps)) + k * U32))
    return dy + k * U32 * (sc * np.abs(x - mean) / s + np.abs(bias)), dm, dv


# ---------------------------------------------------------------- linen: test model code
# Written in the layout of Flax's examples/imagenet/models.py. ``linen_models(BatchNorm)``
# plays the part of the model file with ``BatchNorm`` bound at import: called with
# flax.linen.BatchNorm it is the code users cannot edit; with jaxbn.linen.BatchNorm it is the
# import-swapped version that intercept() must reproduce exactly.

ModuleDef = Any


@functools.cache
def linen_models(BatchNorm: Any) -> dict[str, Any]:
    norm_at_import = functools.partial(BatchNorm, momentum=0.9, epsilon=1e-5)

    class ResNetBlock(nn.Module):
        filters: int
        conv: ModuleDef
        norm: ModuleDef
        act: Callable
        strides: tuple[int, int] = (1, 1)

        @nn.compact
        def __call__(self, x):
            residual = x
            y = self.conv(self.filters, (3, 3), self.strides)(x)
            y = self.act(self.norm()(y))
            y = self.conv(self.filters, (3, 3))(y)
            y = self.norm(scale_init=nn.initializers.zeros_init())(y)
            if residual.shape != y.shape:
                residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(
                    residual)
                residual = self.norm(name="norm_proj")(residual)
            return self.act(residual + y)

    class BottleneckResNetBlock(nn.Module):
        filters: int
        conv: ModuleDef
        norm: ModuleDef
        act: Callable
        strides: tuple[int, int] = (1, 1)

        @nn.compact
        def __call__(self, x):
            residual = x
            y = self.act(self.norm()(self.conv(self.filters, (1, 1))(x)))
            y = self.act(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
            y = self.conv(self.filters * 4, (1, 1))(y)
            y = self.norm(scale_init=nn.initializers.zeros_init())(y)
            if residual.shape != y.shape:
                residual = self.conv(self.filters * 4, (1, 1), self.strides,
                                     name="conv_proj")(residual)
                residual = self.norm(name="norm_proj")(residual)
            return self.act(residual + y)

    class ResNet(nn.Module):
        stage_sizes: Sequence[int]
        block_cls: ModuleDef
        num_classes: int = 3
        num_filters: int = 4
        act: Callable = nn.relu

        @nn.compact
        def __call__(self, x, train: bool = True):
            conv = functools.partial(nn.Conv, use_bias=False)
            norm = functools.partial(BatchNorm, use_running_average=not train, momentum=0.9,
                                     epsilon=1e-5)
            x = conv(self.num_filters, (3, 3), name="conv_init")(x)
            x = nn.relu(norm(name="bn_init")(x))
            for i, block_size in enumerate(self.stage_sizes):
                for j in range(block_size):
                    strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                    x = self.block_cls(self.num_filters * 2 ** i, strides=strides, conv=conv,
                                       norm=norm, act=self.act)(x)
            x = jnp.mean(x, axis=(1, 2))
            return nn.Dense(self.num_classes)(x)

    class Head(nn.Module):  # setup style, a partial bound at import, nested in Net
        def setup(self):
            self.dense = nn.Dense(5)
            self.bn = norm_at_import()

        def __call__(self, x, train):
            return self.bn(self.dense(x), use_running_average=not train)

    class Net(nn.Module):  # compact around the setup-style child
        @nn.compact
        def __call__(self, x, train):
            h = Head()(x, train)
            return norm_at_import(use_running_average=not train, name="out_bn")(nn.relu(h))

    class OneLayer(nn.Module):  # a single BatchNorm bound at import, for the rounding bounds
        @nn.compact
        def __call__(self, x, train):
            return norm_at_import(use_running_average=not train)(x)

    return {"basic": functools.partial(ResNet, stage_sizes=[1, 1], block_cls=ResNetBlock),
            "bottleneck": functools.partial(ResNet, stage_sizes=[1, 1],
                                            block_cls=BottleneckResNetBlock),
            "net": Net, "one": OneLayer}


def _run(model, x, variables=None, intercept=None):
    """init (train and eval mode) and apply (train with updates, eval) of a linen model, under
    ``jaxbn.linen.intercept(**intercept)`` unless that is None. Eager: for these small models
    compiling costs more than it saves."""
    key = jax.random.key(0)
    with contextlib.nullcontext() if intercept is None else jaxbn.linen.intercept(**intercept):
        v_train = model.init(key, x, train=True)
        v_eval = model.init(key, x, train=False)
        v = _randomized(v_eval) if variables is None else variables
        y, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
        y_eval = model.apply({**v, **upd}, x, train=False)
    return {"init_train": v_train, "init_eval": v_eval, "y": y, "updates": upd,
            "y_eval": y_eval}, v


@pytest.mark.parametrize("name", ["net", "basic", "bottleneck"])  # the cheapest first
def test_intercept_equals_import_swap_bit_for_bit(name):
    x = _x((4, 8, 8, 3) if name != "net" else (6, 3))
    flax_model = linen_models(nn.BatchNorm)[name]()
    swapped = linen_models(jaxbn.linen.BatchNorm)[name]()
    want, v = _run(swapped, x)
    got, _ = _run(flax_model, x, v, intercept={})
    for key in want:
        _identical(got[key], want[key], key)
    # The variable tree, and its initial values, are Flax's own: checkpoints load unchanged.
    plain, _ = _run(flax_model, x, v)
    _identical(got["init_eval"], plain["init_eval"], "init vs flax")
    assert jax.tree.structure(got["updates"]) == jax.tree.structure(plain["updates"])
    # Outside the context Flax's code runs again (its fast variance differs from jaxbn's).
    assert not np.array_equal(np.asarray(plain["y"]), np.asarray(got["y"]))


def test_intercept_matches_flax_and_float64_within_rounding():
    x = _x((16, 2, 3), loc=1e4)  # an offset: Flax's default (fast) variance loses digits
    one = linen_models(nn.BatchNorm)["one"]()
    v = _randomized(one.init(jax.random.key(0), x, train=False))
    with jaxbn.linen.intercept():
        y, upd = jax.jit(lambda v, x: one.apply(v, x, train=True, mutable=["batch_stats"]))(
            v, x)
    stable = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5,
                          use_fast_variance=False)
    yf, updf = stable.apply({"params": v["params"]["BatchNorm_0"],
                             "batch_stats": v["batch_stats"]["BatchNorm_0"]}, x,
                            mutable=["batch_stats"])
    scale, bias = (np.asarray(v["params"]["BatchNorm_0"][k]) for k in ("scale", "bias"))
    want = ref.bn_forward(x, scale, bias, axis=-1)
    bound, dm, dv = _bn_bound(x, scale, bias, (0, 1))
    ref.assert_within(y, want, bound, "intercepted vs float64")
    ref.assert_within(yf, want, bound, "flax (stable) vs float64")
    ref.assert_within(y, yf, 2 * bound, "intercepted vs flax")
    mean, var, _ = ref.batch_stats(x, -1)
    old = v["batch_stats"]["BatchNorm_0"]
    for k, batch, err in (("mean", mean, dm), ("var", var, dv)):
        want_k = ref.ema(np.asarray(old[k], np.float64), batch.reshape(-1), 0.9)
        b = 0.1 * err.reshape(-1) + 3 * U32 * np.abs(want_k)
        ref.assert_within(upd["batch_stats"]["BatchNorm_0"][k], want_k, b, k)
        ref.assert_within(updf["batch_stats"][k], want_k, b, "flax " + k)
    # Flax's default variance is far off here: the intercepted model did not run Flax's code.
    y_default, _ = one.apply(v, x, train=True, mutable=["batch_stats"])
    assert np.max(np.abs(np.asarray(y_default, np.float64) - want)) > 10 * bound.max()


def _mesh():
    return jax.make_mesh((8,), ("batch",))


@pytest.mark.slow
def test_intercept_axis_name_under_shard_map_and_pmap():
    """The ImageNet layout has no axis_name; intercept(axis_name=...) synchronizes it."""
    x = _x((16, 4, 4, 3), seed=4)
    flax_model = linen_models(nn.BatchNorm)["basic"]()
    synced = linen_models(functools.partial(jaxbn.linen.BatchNorm, axis_name="batch"))["basic"]()
    v = _randomized(flax_model.init(jax.random.key(0), x[:2], train=False))

    def step(model, intercepted):
        def f(v, x):
            if intercepted:
                with jaxbn.linen.intercept(axis_name="batch"):
                    return model.apply(v, x, train=True, mutable=["batch_stats"])
            return model.apply(v, x, train=True, mutable=["batch_stats"])
        return f

    mesh = _mesh()
    xs = jax.device_put(x, NamedSharding(mesh, P("batch")))
    vs = jax.device_put(v, NamedSharding(mesh, P()))
    sm = {name: jax.jit(jax.shard_map(step(m, i), mesh=mesh, in_specs=(P(), P("batch")),
                                      out_specs=(P("batch"), P())))(vs, xs)
          for name, m, i in (("intercepted", flax_model, True), ("swapped", synced, False))}
    _identical(sm["intercepted"], sm["swapped"], "shard_map")
    xp = x.reshape(8, 2, *x.shape[1:])
    pm = {name: jax.pmap(step(m, i), axis_name="batch", in_axes=(None, 0))(v, xp)
          for name, m, i in (("intercepted", flax_model, True), ("swapped", synced, False))}
    _identical(pm["intercepted"], pm["swapped"], "pmap")
    # Synchronized: every device holds the same running statistics (its own batch's differ).
    stats = pm["intercepted"][1]["batch_stats"]
    _identical(jax.tree.map(lambda s: s[0], stats), jax.tree.map(lambda s: s[-1], stats))


def test_intercept_axis_name_matches_flax_sync_within_rounding():
    x = _x((16, 3), seed=5, loc=3.0)
    one = linen_models(nn.BatchNorm)["one"]()
    v = _randomized(one.init(jax.random.key(0), x, train=False))
    flax_sync = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5,
                             use_fast_variance=False, axis_name="batch")
    mesh = _mesh()

    def ours(v, x):
        with jaxbn.linen.intercept(axis_name="batch"):
            return one.apply(v, x, train=True, mutable=["batch_stats"])

    def theirs(v, x):
        return flax_sync.apply({k: t["BatchNorm_0"] for k, t in v.items()}, x,
                               mutable=["batch_stats"])

    run = lambda f: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(), P("batch")),  # noqa: E731
                                          out_specs=(P("batch"), P())))(
        jax.device_put(v, NamedSharding(mesh, P())),
        jax.device_put(x, NamedSharding(mesh, P("batch"))))
    (y, upd), (yf, updf) = run(ours), run(theirs)
    scale, bias = (np.asarray(v["params"]["BatchNorm_0"][k]) for k in ("scale", "bias"))
    bound, dm, _ = _bn_bound(x, scale, bias, (0,))
    want = ref.bn_forward(x, scale, bias)
    ref.assert_within(y, want, bound, "intercepted, synchronized, vs float64")
    ref.assert_within(yf, want, bound, "flax, synchronized, vs float64")
    mean = ref.ema(np.asarray(v["batch_stats"]["BatchNorm_0"]["mean"], np.float64),
                   np.asarray(x, np.float64).mean(0), 0.9)
    ref.assert_within(upd["batch_stats"]["BatchNorm_0"]["mean"], mean,
                      0.1 * dm.reshape(-1) + 3 * U32 * np.abs(mean), "running mean")
    ref.assert_within(updf["batch_stats"]["mean"], mean,
                      0.1 * dm.reshape(-1) + 3 * U32 * np.abs(mean), "flax running mean")


EXTRAS = dict(momentum=0.5, unbiased_running_var=True, virtual_batch_size=2,
              renorm=(2.0, 1.0), skip_nonfinite=True)


def _forcing(**fields):
    """``jaxbn.linen.BatchNorm`` with ``fields`` set over whatever the model code passes: what
    an overriding intercept() computes."""
    def make(*args, **kwargs):
        return jaxbn.linen.BatchNorm(*args, **{**kwargs, **fields})
    return make


def test_intercept_overrides_reach_every_layer_including_jaxbn_ones():
    x = _x((6, 3), seed=6)
    flax_model = linen_models(nn.BatchNorm)["net"]()
    jaxbn_model = linen_models(jaxbn.linen.BatchNorm)["net"]()
    with_extras = linen_models(_forcing(**EXTRAS))["net"]()
    want, v = _run(with_extras, x)
    plain, _ = _run(jaxbn_model, x, v)
    assert not np.array_equal(np.asarray(want["y"]), np.asarray(plain["y"]))  # they matter
    for model in (flax_model, jaxbn_model):
        got, _ = _run(model, x, v, intercept=EXTRAS)
        for key in want:
            _identical(got[key], want[key], key)
    got, _ = _run(jaxbn_model, x, v, intercept={})  # no overrides: jaxbn layers run as they are
    _identical(got["y"], plain["y"])


def test_nested_intercepts_merge_overrides_inner_wins():
    x = _x((8, 3), seed=7)
    one = {"flax": linen_models(nn.BatchNorm)["one"]()}
    for label, kw in (("outer", dict(momentum=0.5)),
                      ("both", dict(momentum=0.8, unbiased_running_var=True))):
        one[label] = linen_models(_forcing(**kw))["one"]()
    v = _randomized(one["flax"].init(jax.random.key(0), x, train=False))

    def upd(model):
        return model.apply(v, x, train=True, mutable=["batch_stats"])[1]

    with jaxbn.linen.intercept(momentum=0.5):
        first = upd(one["flax"])
        with jaxbn.linen.intercept(momentum=0.8, unbiased_running_var=True):
            inner = upd(one["flax"])
        after = upd(one["flax"])
    _identical(first, upd(one["outer"]))
    _identical(inner, upd(one["both"]))
    _identical(after, upd(one["outer"]))
    outside = upd(one["flax"])
    assert not np.array_equal(np.asarray(outside["batch_stats"]["BatchNorm_0"]["mean"]),
                              np.asarray(first["batch_stats"]["BatchNorm_0"]["mean"]))


def test_intercept_is_per_thread_and_decorates():
    x = _x((8, 3), seed=8, loc=100.0)
    one = linen_models(nn.BatchNorm)["one"]()
    v = _randomized(one.init(jax.random.key(0), x, train=False))
    swapped = linen_models(jaxbn.linen.BatchNorm)["one"]()

    def y(model):
        return np.asarray(model.apply(v, x, train=True, mutable=["batch_stats"])[0])

    flax_y, jaxbn_y = y(one), y(swapped)
    assert not np.array_equal(flax_y, jaxbn_y)
    other = {}
    with jaxbn.linen.intercept():
        worker = threading.Thread(target=lambda: other.update(y=y(one)))
        worker.start()
        worker.join()
        here = y(one)
    np.testing.assert_array_equal(here, jaxbn_y)
    np.testing.assert_array_equal(other["y"], flax_y)  # the other thread was not intercepted
    decorated = jaxbn.linen.intercept()(y)
    np.testing.assert_array_equal(decorated(one), jaxbn_y)
    np.testing.assert_array_equal(y(one), flax_y)


def test_intercept_subclasses_run_their_own_code():
    x = _x((8, 3), seed=9)

    class Defaults(nn.BatchNorm):  # new defaults only: Flax's __call__, intercepted
        momentum: float = 0.5

    class Doubling(nn.BatchNorm):  # its own __call__; the super() call is intercepted
        @nn.compact
        def __call__(self, x, use_running_average=None, *, mask=None):
            return 2.0 * super().__call__(x, use_running_average, mask=mask)

    for cls, factor, momentum in ((Defaults, 1.0, 0.5), (Doubling, 2.0, 0.99)):
        layer = cls(use_running_average=False)
        v = layer.init(jax.random.key(0), x)
        with jaxbn.linen.intercept():
            y, upd = layer.apply(v, x, mutable=["batch_stats"])
        want, want_upd = jaxbn.linen.BatchNorm(use_running_average=False, momentum=momentum
                                               ).apply(v, x, mutable=["batch_stats"])
        _identical(y, factor * want)
        _identical(upd, want_upd)


def test_intercept_rejects_unknown_and_variable_defining_fields():
    with pytest.raises(TypeError, match=r"unknown field\(s\) \['axis_nme'\].*axis_name"):
        jaxbn.linen.intercept(axis_nme="batch")
    with pytest.raises(TypeError, match=r"cannot override \['use_bias'\].*variables"):
        jaxbn.linen.intercept(use_bias=False)
    with pytest.raises(TypeError, match="cannot override"):
        jaxbn.linen.intercept(param_dtype=jnp.bfloat16)
    a, b = jaxbn.linen.intercept(), jaxbn.linen.intercept()
    a.__enter__()
    b.__enter__()
    with pytest.raises(RuntimeError, match="reverse order"):
        a.__exit__(None, None, None)
    b.__exit__(None, None, None)
    a.__exit__(None, None, None)


# ----------------------------------------------------------------- nnx: test model code
# The NNX examples' layouts: an MLP (Linear, BatchNorm, Dropout) and a ResNet whose blocks sit
# in an nnx.List, with projection shortcuts. ``nnx_models(BatchNorm)`` is the model file.

@functools.cache
def nnx_models(BatchNorm: Any) -> dict[str, Any]:
    class MLP(nnx.Module):
        def __init__(self, din, dmid, dout, *, rngs):
            self.linear1 = nnx.Linear(din, dmid, rngs=rngs)
            self.dropout = nnx.Dropout(rate=0.1, rngs=rngs)
            self.bn = BatchNorm(dmid, rngs=rngs)
            self.linear2 = nnx.Linear(dmid, dout, rngs=rngs)

        def __call__(self, x):
            return self.linear2(nnx.gelu(self.dropout(self.bn(self.linear1(x)))))

    class Block(nnx.Module):
        def __init__(self, cin, cout, strides, *, rngs):
            self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=strides, use_bias=False, rngs=rngs)
            self.bn1 = BatchNorm(cout, momentum=0.9, epsilon=1e-5, rngs=rngs)
            self.conv2 = nnx.Conv(cout, cout, (3, 3), use_bias=False, rngs=rngs)
            self.bn2 = BatchNorm(cout, momentum=0.9, epsilon=1e-5, rngs=rngs)
            if strides != 1 or cin != cout:
                self.proj = nnx.Conv(cin, cout, (1, 1), strides=strides, use_bias=False,
                                     rngs=rngs)
                self.proj_bn = BatchNorm(cout, momentum=0.9, epsilon=1e-5, rngs=rngs)
            else:
                self.proj = None

        def __call__(self, x):
            y = self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x)))))
            if self.proj is not None:
                x = self.proj_bn(self.proj(x))
            return nnx.relu(x + y)

    class ResNet(nnx.Module):
        def __init__(self, cin=3, width=4, num_classes=3, *, rngs):
            self.stem = nnx.Conv(cin, width, (3, 3), use_bias=False, rngs=rngs)
            self.stem_bn = BatchNorm(width, momentum=0.9, epsilon=1e-5, rngs=rngs)
            self.blocks = nnx.List([Block(width, width, 1, rngs=rngs),
                                    Block(width, 2 * width, 2, rngs=rngs)])
            self.head = nnx.Linear(2 * width, num_classes, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.stem_bn(self.stem(x)))
            for block in self.blocks:
                x = block(x)
            return self.head(x.mean(axis=(1, 2)))

    return {"mlp": lambda rngs: MLP(3, 6, 2, rngs=rngs), "resnet": lambda rngs: ResNet(rngs=rngs),
            "sequential": lambda rngs: nnx.Sequential(
                nnx.Linear(3, 4, rngs=rngs), BatchNorm(4, rngs=rngs), nnx.relu,
                nnx.Linear(4, 4, use_bias=False, rngs=rngs), BatchNorm(4, use_scale=False,
                                                                       rngs=rngs))}


NNX_INPUTS = {"mlp": (8, 3), "resnet": (4, 8, 8, 3), "sequential": (8, 3)}


def _nnx_randomize(model, seed=3):
    """Running statistics away from zeros/ones (one Flax training step would too)."""
    state = nnx.state(model, nnx.BatchStat)
    nnx.update(model, _randomized(state, seed))


def _same_batchnorms(converted, swapped):
    """Every BatchNorm is jaxbn's, at the same path, with the same settings (graphdef)."""
    def layers(model):
        return {p: m for p, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)}
    got, want = layers(converted), layers(swapped)
    assert got.keys() == want.keys() and got
    for path, layer in got.items():
        assert type(layer) is jaxbn.nnx.BatchNorm, path
        assert nnx.graphdef(layer) == nnx.graphdef(want[path]), path


def _nnx_steps(model, x):
    """Two training steps and an eval call: outputs and the state after each."""
    @nnx.jit
    def train(m, x):
        return m(x)

    out = []
    model.train()
    for i in range(2):
        out.append((train(model, x + i), nnx.state(model)))
    model.eval()
    out.append((model(x), nnx.state(model)))
    return out


@pytest.mark.parametrize("name", ["sequential", "resnet", "mlp"])  # the cheapest first
def test_convert_equals_import_swap_bit_for_bit(name):
    x = _x(NNX_INPUTS[name])
    flax_model = nnx_models(nnx.BatchNorm)[name](nnx.Rngs(0, dropout=1))
    swapped = nnx_models(jaxbn.nnx.BatchNorm)[name](nnx.Rngs(0, dropout=1))
    _nnx_randomize(flax_model)
    nnx.update(swapped, nnx.state(flax_model))
    before = nnx.state(flax_model)
    converted = jaxbn.nnx.convert(flax_model)
    assert converted is flax_model  # in place, and returned
    _identical(nnx.state(converted), before, "state kept")
    _same_batchnorms(converted, swapped)
    for (y, s), (y2, s2) in zip(_nnx_steps(converted, x), _nnx_steps(swapped, x), strict=True):
        _identical(y, y2, "output")
        _identical(s, s2, "state")


def test_convert_keeps_variables_dtypes_shardings_and_metadata():
    mesh = _mesh()
    bn = nnx.BatchNorm(8, param_dtype=jnp.bfloat16, momentum=0.8, epsilon=1e-3,
                       use_running_average=True, scale_metadata={"note": "kept"},
                       rngs=nnx.Rngs(0))
    feature_sharded = NamedSharding(mesh, P("batch"))
    nnx.update(bn, jax.device_put(nnx.state(bn), feature_sharded))
    old = {k: getattr(bn, k) for k in ("scale", "bias", "mean", "var")}
    new = jaxbn.nnx.convert(bn)
    assert type(new) is jaxbn.nnx.BatchNorm and new is not bn  # a BatchNorm is replaced
    for k, variable in old.items():
        assert getattr(new, k) is variable
        assert variable[...].sharding == feature_sharded
    assert new.scale.get_metadata()["note"] == "kept"
    assert new.scale[...].dtype == jnp.bfloat16 and new.mean[...].dtype == jnp.float32
    assert (new.momentum, new.epsilon, new.use_running_average, new.param_dtype) == (
        0.8, 1e-3, True, jnp.bfloat16)


def test_convert_in_lists_dicts_tuples_and_shared_references():
    class Holder(nnx.Module):
        def __init__(self):
            bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
            self.a = bn
            self.listed = nnx.List([bn, nnx.Linear(3, 3, rngs=nnx.Rngs(0))])
            self.named = nnx.Dict(x=bn)
            self.pair = nnx.data((bn, 1))
            self.plain = nnx.data([bn, {"k": nnx.BatchNorm(3, rngs=nnx.Rngs(1))}])

    model = Holder()
    old, other = model.a, model.plain[1]["k"]
    jaxbn.nnx.convert(model)
    new = model.a
    assert type(new) is jaxbn.nnx.BatchNorm
    assert new is model.listed[0] is model.named["x"] is model.pair[0] is model.plain[0]
    assert type(model.plain[1]["k"]) is jaxbn.nnx.BatchNorm and model.plain[1]["k"] is not new
    assert new.mean is old.mean and model.plain[1]["k"].mean is other.mean
    # The replaced Flax layer still works on its own (it shares the Variables).
    x = _x((5, 3))
    new.eval(), old.eval()
    ref.assert_within(old(x), new(x), 8 * U32 * (np.abs(np.asarray(x)) + 1), "old layer")


@pytest.mark.slow
def test_convert_overrides_under_shard_map_equal_import_swap():
    x = _x((16, 8, 8, 3), seed=11)
    mesh = _mesh()
    flax_model = nnx_models(nnx.BatchNorm)["resnet"](nnx.Rngs(0))
    synced = nnx_models(functools.partial(jaxbn.nnx.BatchNorm, axis_name="batch",
                                          unbiased_running_var=True))["resnet"](nnx.Rngs(0))
    _nnx_randomize(flax_model)
    nnx.update(synced, nnx.state(flax_model))
    jaxbn.nnx.convert(flax_model, axis_name="batch", unbiased_running_var=True)
    _same_batchnorms(flax_model, synced)

    @nnx.jit
    @nnx.shard_map(mesh=mesh, in_specs=(P(), P("batch")), out_specs=P("batch"))
    def step(model, x):
        return model(x)

    outs = []
    for model in (flax_model, synced):
        nnx.update(model, jax.device_put(nnx.state(model), NamedSharding(mesh, P())))
        model.train()
        outs.append((step(model, jax.device_put(x, NamedSharding(mesh, P("batch")))),
                     nnx.state(model)))
    _identical(outs[0], outs[1])


def test_convert_axis_name_matches_flax_sync_within_rounding():
    x = _x((16, 3), seed=12, loc=3.0)
    mesh = _mesh()
    ours = jaxbn.nnx.convert(nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0)),
                             axis_name="batch")
    theirs = nnx.BatchNorm(3, momentum=0.9, axis_name="batch", use_fast_variance=False,
                           rngs=nnx.Rngs(0))

    @nnx.jit
    @nnx.shard_map(mesh=mesh, in_specs=(P(), P("batch")), out_specs=P("batch"))
    def step(model, x):
        return model(x)

    xs = jax.device_put(x, NamedSharding(mesh, P("batch")))
    for m in (ours, theirs):
        nnx.update(m, jax.device_put(nnx.state(m), NamedSharding(mesh, P())))
    y, yf = step(ours, xs), step(theirs, xs)
    bound, dm, _ = _bn_bound(x, np.ones(3), np.zeros(3), (0,))
    want = ref.bn_forward(x, None, None)
    ref.assert_within(y, want, bound, "converted, synchronized, vs float64")
    ref.assert_within(yf, want, bound, "flax, synchronized, vs float64")
    mean = 0.1 * np.asarray(x, np.float64).mean(0)
    for m, what in ((ours, "converted"), (theirs, "flax")):
        ref.assert_within(m.mean[...], mean, 0.1 * dm.reshape(-1) + 3 * U32 * np.abs(mean),
                          what + " running mean")


def test_convert_rebuilds_jaxbn_layers_only_with_overrides():
    layer = jaxbn.nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    assert jaxbn.nnx.convert(layer) is layer
    rebuilt = jaxbn.nnx.convert(layer, momentum=None, renorm=[3.0, 5.0])
    assert rebuilt is not layer and rebuilt.mean is layer.mean
    assert rebuilt.momentum is None and rebuilt.renorm == (3.0, 5.0)
    assert int(rebuilt.count[...]) == 0  # the cumulative average's counter, added
    x = _x((6, 3))
    want = jaxbn.nnx.BatchNorm(3, momentum=None, renorm=(3.0, 5.0), rngs=nnx.Rngs(0))
    _identical(rebuilt(x), want(x))
    _identical(nnx.state(rebuilt), nnx.state(want))


@pytest.mark.slow
def test_convert_keeps_an_optimizer_working():
    x, labels = _x((8, 3)), jnp.arange(8) % 2
    models = [nnx_models(nnx.BatchNorm)["mlp"](nnx.Rngs(0, dropout=1)),
              nnx_models(jaxbn.nnx.BatchNorm)["mlp"](nnx.Rngs(0, dropout=1))]
    opts = [nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.Param) for m in models]
    jaxbn.nnx.convert(models[0])  # after the optimizer was built

    @nnx.jit
    def step(model, opt):
        def loss(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()
        value, grads = nnx.value_and_grad(loss)(model)
        opt.update(model, grads)
        return value

    for _ in range(2):
        _identical(step(models[0], opts[0]), step(models[1], opts[1]))
    _identical(nnx.state(models[0]), nnx.state(models[1]))


def test_convert_errors():
    class MyBN(nnx.BatchNorm):
        pass

    class MyJaxbnBN(jaxbn.nnx.BatchNorm):
        pass

    model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['axis_nme'\].*axis_name"):
        jaxbn.nnx.convert(model, axis_nme="batch")
    with pytest.raises(TypeError, match=r"cannot override \['use_scale'\].*parameters"):
        jaxbn.nnx.convert(model, use_scale=False)
    assert type(model.layers[1]) is nnx.BatchNorm  # nothing changed
    with pytest.raises(TypeError, match=r"layers/0 is a .*MyBN, a subclass of flax.nnx"):
        jaxbn.nnx.convert(nnx.Sequential(MyBN(3, rngs=nnx.Rngs(0))))
    mine = MyJaxbnBN(3, rngs=nnx.Rngs(0))
    assert jaxbn.nnx.convert(mine) is mine
    with pytest.raises(TypeError, match="subclass of jaxbn.nnx.BatchNorm"):
        jaxbn.nnx.convert(mine, axis_name="batch")


def test_convert_override_names_cover_the_constructor():
    import inspect

    from jaxbn import nnx as jnnx
    from jaxbn._src import nnx_convert

    params = set(inspect.signature(jnnx.BatchNorm.__init__).parameters) - {"self"}
    assert set(nnx_convert.OVERRIDABLE) | set(nnx_convert.FIXED) == params
    assert not set(nnx_convert.OVERRIDABLE) & set(nnx_convert.FIXED)


@pytest.mark.slow
def test_intercept_under_lifted_transforms_and_intermediates():
    """nn.remat and nn.vmap (an ensemble axis with its own variables), and what
    capture_intermediates records, as with the import swap; interceptors registered inside
    intercept() do not see the BatchNorm calls it computes."""
    x = _x((3, 8, 2), seed=13)

    def make(BatchNorm):
        class Inner(nn.Module):
            @nn.compact
            def __call__(self, x):
                return BatchNorm(use_running_average=False, momentum=0.8)(nn.Dense(2)(x))

        class Outer(nn.Module):
            @nn.compact
            def __call__(self, x):
                ensemble = nn.vmap(nn.remat(Inner), in_axes=0, out_axes=0,
                                   variable_axes={"params": 0, "batch_stats": 0},
                                   split_rngs={"params": True})
                return ensemble(name="members")(x)
        return Outer()

    def run(model):
        v = model.init(jax.random.key(0), x)
        return v, model.apply(v, x, mutable=["batch_stats", "intermediates"],
                              capture_intermediates=True)

    want = run(make(jaxbn.linen.BatchNorm))
    seen = []

    def spy(next_fun, args, kwargs, context):
        seen.append(type(context.module).__name__)
        return next_fun(*args, **kwargs)

    with jaxbn.linen.intercept(), nn.intercept_methods(spy):
        got = run(make(nn.BatchNorm))
    _identical(got, want)
    assert "BatchNorm" not in seen and "Dense" in seen
