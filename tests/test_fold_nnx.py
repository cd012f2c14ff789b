"""Model-level BatchNorm folding for Flax NNX (issue 22, item 5): ``jaxbn.fold.fold_nnx``.

Each folded (Linear or Conv, BatchNorm) pair is checked against a float64 NumPy evaluation of
the unfolded pair, within the rounding bound of the folded float32 layer; a whole ResNet (the
layout of tests/test_convert.py), folded and unfolded in float64, within a bound propagated
through the network by running the folded model on |x| with |parameters|.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn.fold
import jaxbn.nnx
from jaxbn.fold import fold_nnx
from tests import reference as ref
from tests.test_convert import nnx_models


def _randomize(model, seed=0):
    """Every Param and BatchStat drawn afresh (variances and scales positive)."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    leaves, tree = jax.tree.flatten_with_path(state)
    new = []
    for path, v in leaves:
        name = jax.tree_util.keystr(path)
        r = (rng.uniform(0.5, 2.0, v.shape) if ("var" in name or "scale" in name)
             else rng.normal(0.0, 1.0, v.shape))
        new.append(jnp.asarray(r, v.dtype))
    nnx.update(model, jax.tree.unflatten(tree, new))


def _conv_np(x, k, groups=1):
    """Stride-1 'SAME' convolution, channels last, in float64 (kernel ``(*K, Cin/g, Cout)``)."""
    x, k = np.asarray(x, np.float64), np.asarray(k, np.float64)
    ks = k.shape[:-2]
    pads = [((s - 1) // 2, s - 1 - (s - 1) // 2) for s in ks]
    xp = np.pad(x, [(0, 0), *pads, (0, 0)])
    spatial = x.shape[1:-1]
    cin_g, cout = k.shape[-2], k.shape[-1]
    cout_g = cout // groups
    out = np.zeros((x.shape[0], *spatial, cout))
    for offset in np.ndindex(*ks):
        window = xp[(slice(None), *(slice(o, o + s) for o, s in zip(offset, spatial,
                                                                     strict=True)))]
        for g in range(groups):
            out[..., g * cout_g:(g + 1) * cout_g] += (
                window[..., g * cin_g:(g + 1) * cin_g] @ k[offset][:, g * cout_g:(g + 1) * cout_g])
    return out


def _layer_np(layer, x, kernel=None):
    """The layer's output without its bias in float64, and the number of terms per sum."""
    kernel = np.asarray(layer.kernel[...]) if kernel is None else kernel
    n_terms = int(np.prod(kernel.shape[:-1]))
    if isinstance(layer, nnx.Conv):
        return _conv_np(x, kernel, layer.feature_group_count), n_terms
    return np.asarray(x, np.float64) @ np.asarray(kernel, np.float64), n_terms


PAIRS = {
    "linear+flax": lambda r: (nnx.Linear(3, 4, rngs=r), nnx.BatchNorm(4, rngs=r), (5, 3)),
    "linear-no-bias+jaxbn-no-scale": lambda r: (
        nnx.Linear(3, 4, use_bias=False, rngs=r),
        jaxbn.nnx.BatchNorm(4, use_scale=False, rngs=r), (5, 3)),
    "conv-no-bias+flax": lambda r: (nnx.Conv(2, 4, (3, 3), use_bias=False, rngs=r),
                                    nnx.BatchNorm(4, epsilon=1e-3, rngs=r), (2, 5, 5, 2)),
    "grouped-conv+jaxbn-no-bias": lambda r: (
        nnx.Conv(4, 6, (3, 3), feature_group_count=2, rngs=r),
        jaxbn.nnx.BatchNorm(6, use_bias=False, rngs=r), (2, 4, 4, 4)),
    "conv1d+flax": lambda r: (nnx.Conv(2, 3, (3,), use_bias=False, rngs=r),
                              nnx.BatchNorm(3, rngs=r), (2, 7, 2)),
}


@pytest.mark.parametrize("case", PAIRS)
def test_folded_pair_within_rounding_of_float64_unfolded(case):
    layer, bn, shape = PAIRS[case](nnx.Rngs(0))
    model = nnx.Sequential(layer, bn)
    _randomize(model)
    model.eval()
    before = nnx.state(model)
    x = jnp.asarray(np.random.default_rng(1).normal(0.0, 2.0, shape), jnp.float32)
    y_model = model(x)
    folded = fold_nnx(model, {"layers/0": "layers/1"})

    # float64 reference of the unfolded pair, from the stored float32 values
    z, n_terms = _layer_np(layer, x)
    b = np.asarray(layer.bias[...], np.float64) if layer.bias is not None else 0.0
    mean, var = (np.asarray(getattr(bn, k)[...], np.float64) for k in ("mean", "var"))
    scale = np.asarray(bn.scale[...], np.float64) if bn.scale is not None else 1.0
    beta = np.asarray(bn.bias[...], np.float64) if bn.bias is not None else 0.0
    a = scale / np.sqrt(var + bn.epsilon)
    want = (z + b - mean) * a + beta
    magnitude = _layer_np(layer, np.abs(np.asarray(x, np.float64)),
                          np.abs(np.asarray(layer.kernel[...], np.float64)) * np.abs(a))[0]
    magnitude = magnitude + np.abs(b - mean) * np.abs(a) + np.abs(beta)
    bound = ref.sum_error_bound(magnitude, n_terms + 1, np.float32, ulps=8)
    ref.assert_within(folded(x), want, bound, f"{case}: folded vs float64 unfolded")
    ref.assert_within(y_model, want, 2 * bound, f"{case}: unfolded model vs float64")

    # the structure: Folded in place of the BatchNorm, a bias on the layer, eval mode
    assert type(folded.layers[1]) is jaxbn.nnx.Folded
    assert folded.layers[0].bias is not None and folded.layers[0].use_bias
    assert folded.layers[0].bias[...].dtype == layer.kernel[...].dtype
    # the original model is untouched and still computes what it did
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)
    assert type(model.layers[1]) is type(bn)
    np.testing.assert_array_equal(model(x), y_model)
    folded.train()
    with pytest.raises(ValueError, match="inference only.*training mode"):
        folded(x)


def _pairs(model):
    pairs = {"stem": "stem_bn"}
    for i, block in enumerate(model.blocks):
        pairs.update({f"blocks/{i}/conv1": f"blocks/{i}/bn1", f"blocks/{i}/conv2":
                      f"blocks/{i}/bn2"})
        if block.proj is not None:
            pairs[("blocks", i, "proj")] = ("blocks", i, "proj_bn")  # tuples work too
    return pairs


@pytest.mark.slow
@pytest.mark.parametrize("convert", [False, True], ids=["flax", "jaxbn"])
def test_folded_resnet_within_propagated_bound_of_unfolded_model(convert):
    """In float64 (the per-pair tests cover float32), where the bound below, although it
    grows with depth like |W1| |W2| ... instead of |W1 W2 ...|, stays far below the effect of
    any mistake (an epsilon left out changes the output by about 1e-5 relative)."""
    model = nnx_models(nnx.BatchNorm)["resnet"](nnx.Rngs(0))
    _randomize(model, seed=2)
    if convert:
        jaxbn.nnx.convert(model)
    model.eval()
    x = np.random.default_rng(3).normal(0.0, 1.0, (2, 6, 6, 3))
    with jax.enable_x64(True):
        nnx.update(model, jax.tree.map(lambda v: v.astype(jnp.float64), nnx.state(model)))
        folded = fold_nnx(model, _pairs(model))
        assert not any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(folded))
        got = np.asarray(folded(jnp.asarray(x)))
        want = np.asarray(model(jnp.asarray(x)))  # the unfolded model
        # |x| through the folded model with |parameters|: every partial sum's magnitude, and
        # (nonnegative, so relu is the identity) the amplification of any error downstream.
        magnitude_model = nnx.clone(folded)
        nnx.update(magnitude_model, jax.tree.map(jnp.abs, nnx.state(magnitude_model,
                                                                     nnx.Param)))
        magnitude = np.asarray(magnitude_model(jnp.asarray(np.abs(x))))
    assert got.dtype == want.dtype == np.float64
    layers = [m for _, m in nnx.iter_modules(folded) if isinstance(m, nnx.Conv | nnx.Linear)]
    longest = max(int(np.prod(m.kernel[...].shape[:-1])) for m in layers)
    rounding_steps = 2 * len(layers) + len(model.blocks) + 1  # unfolded and folded layers,
    #                                                           residual adds, the pooling
    bound = rounding_steps * ref.sum_error_bound(magnitude, longest, np.float64, ulps=8)
    ref.assert_within(got, want, bound, "folded ResNet vs unfolded")
    assert bound.max() < 1e-7 * np.abs(want).max()  # not vacuous


def test_fold_nnx_delegates_the_arithmetic(monkeypatch):
    calls = []
    for name in ("fold_dense", "fold_conv"):
        original = getattr(jaxbn.fold, name)
        monkeypatch.setattr(jaxbn.fold, name, lambda *a, _f=original, _n=name, **k: (
            calls.append(_n), _f(*a, **k))[1])
    r = nnx.Rngs(0)
    model = nnx.Sequential(nnx.Conv(2, 3, (3, 3), rngs=r), nnx.BatchNorm(3, rngs=r),
                           nnx.Linear(3, 2, rngs=r), nnx.BatchNorm(2, rngs=r))
    fold_nnx(model, {"layers/0": "layers/1", "layers/2": "layers/3"})
    assert sorted(calls) == ["fold_conv", "fold_dense"]


def test_fold_nnx_errors_name_what_was_expected():
    r = nnx.Rngs(0)
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=r), nnx.BatchNorm(4, rngs=r),
                           nnx.LinearGeneral(4, 4, rngs=r), nnx.BatchNorm(4, axis=0, rngs=r),
                           nnx.Linear(4, 5, rngs=r), nnx.BatchNorm(4, rngs=r))
    before = nnx.state(model)
    with pytest.raises(KeyError, match=r"no '9' under layers \(available there: \['0', '1'"):
        fold_nnx(model, {"layers/9": "layers/1"})
    with pytest.raises(TypeError, match="nnx.Linear and nnx.Conv layers; 'layers/2' is a "
                                        "flax.nnx.nn.linear.LinearGeneral"):
        fold_nnx(model, {"layers/2": "layers/1"})
    with pytest.raises(TypeError, match="'layers/0' should be a BatchNorm"):
        fold_nnx(model, {"layers/4": "layers/0"})
    with pytest.raises(ValueError, match="normalizes axis 0; folding needs the last axis"):
        fold_nnx(model, {"layers/0": "layers/3"})
    with pytest.raises(ValueError, match=r"features \(4,\) but the kernel's last .* has 5"):
        fold_nnx(model, {"layers/4": "layers/5"})
    with pytest.raises(ValueError, match="'layers/1' is in two pairs"):
        fold_nnx(model, {"layers/0": "layers/1", "layers/4": "layers/1"})
    with pytest.raises(TypeError, match="non-empty mapping"):
        fold_nnx(model, {})
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)  # left as it was
    with pytest.raises(TypeError, match="'layers/1' is already folded"):
        fold_nnx(fold_nnx(model, {"layers/0": "layers/1"}), {"layers/0": "layers/1"})


def test_fold_nnx_refuses_shared_layers_and_immutable_containers():
    class Twice(nnx.Module):  # one BatchNorm after two layers
        def __init__(self, r):
            self.a, self.b = nnx.Linear(2, 3, rngs=r), nnx.Linear(2, 3, rngs=r)
            self.bn = nnx.BatchNorm(3, rngs=r)
            self.bn_again = self.bn

    with pytest.raises(ValueError, match=r"'bn' is referenced from 2 places .*\['bn', "
                                         r"'bn_again'\]"):
        fold_nnx(Twice(nnx.Rngs(0)), {"a": "bn"})

    class InTuple(nnx.Module):
        def __init__(self, r):
            self.lin = nnx.Linear(2, 3, rngs=r)
            self.norms = nnx.data((nnx.BatchNorm(3, rngs=r),))

    with pytest.raises(TypeError, match="held in a tuple, which cannot be changed in place"):
        fold_nnx(InTuple(nnx.Rngs(0)), {"lin": "norms/0"})
