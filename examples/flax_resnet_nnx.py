"""The flax.nnx twin of flax_resnet.py: a small ResNet with ``jaxbn.nnx.BatchNorm``.

The same model, data, optimizer, devices, checkpoint and folding as ``flax_resnet.py``, written
the NNX way: the model holds its own state, ``nnx.Optimizer`` updates it in place,
``model.train()`` / ``model.eval()`` switch BatchNorm between batch and running statistics,
and ``nnx.shard_map`` splits the batch over 8 (fake CPU) devices with the statistics
synchronized over ``"data"``. ``--bn flax`` runs it with ``flax.nnx.BatchNorm``.

  python examples/flax_resnet_nnx.py
  python examples/flax_resnet_nnx.py --bn flax
"""

from __future__ import annotations

import sys

from resnet_cli import parse_args

if __name__ == "__main__":
    ARGS = parse_args(None, __doc__.splitlines()[0], "out/flax_resnet_nnx")
    import jax

    jax.config.update("jax_num_cpu_devices", ARGS.devices)  # before the first JAX operation

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from flax_resnet import (
    AXIS,
    fit,
    main,
    make_optimizer,
    save_and_restore,
    summarize,
    total_steps,
    trees_equal,
)
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn


def batchnorm_class(name: str) -> Callable[..., nnx.Module]:
    """The one line a Flax user changes: where ``BatchNorm`` is imported from."""
    if name == "flax":
        from flax.nnx import BatchNorm
    else:
        from jaxbn.nnx import BatchNorm
    return BatchNorm


class Identity(nnx.Module):
    """What a BatchNorm becomes once folded into its convolution."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class ResBlock(nnx.Module):
    """conv-BN-relu-conv-BN, plus the input, then relu."""

    def __init__(self, width: int, norm: Callable[..., nnx.Module], axis_name: str | None, *,
                 rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(width, width, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = norm(width, momentum=0.9, axis_name=axis_name, rngs=rngs)
        self.conv2 = nnx.Conv(width, width, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = norm(width, momentum=0.9, axis_name=axis_name, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.relu(self.bn1(self.conv1(x)))
        return nnx.relu(x + self.bn2(self.conv2(h)))


class ResNet(nnx.Module):
    """A stem (conv-BN-relu), ``blocks`` residual blocks, global average pooling, Linear."""

    def __init__(self, norm: Callable[..., nnx.Module], width: int = 16, blocks: int = 2,
                 num_classes: int = 10, in_channels: int = 1, axis_name: str | None = None, *,
                 rngs: nnx.Rngs):
        self.stem_conv = nnx.Conv(in_channels, width, (3, 3), use_bias=False, rngs=rngs)
        self.stem_bn = norm(width, momentum=0.9, axis_name=axis_name, rngs=rngs)
        self.blocks = nnx.List([ResBlock(width, norm, axis_name, rngs=rngs)
                                for _ in range(blocks)])
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.stem_bn(self.stem_conv(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(axis=(1, 2)))

    def conv_bn_pairs(self) -> list[tuple[nnx.Module, str, nnx.Conv]]:
        """``(owner, BatchNorm attribute name, the Conv before it)`` for every BatchNorm."""
        pairs = [(self, "stem_bn", self.stem_conv)]
        for b in self.blocks:
            pairs += [(b, "bn1", b.conv1), (b, "bn2", b.conv2)]
        return pairs


def fold_batchnorms(model: ResNet) -> ResNet:
    """A copy of ``model`` (in eval mode) with every BatchNorm folded into its convolution."""
    folded = nnx.clone(model)
    for owner, name, conv in folded.conv_bn_pairs():
        bn = getattr(owner, name)
        params = {k: getattr(bn, k)[...] for k in ("scale", "bias") if getattr(bn, k) is not None}
        state = {"mean": bn.mean[...], "var": bn.var[...]}
        kernel, bias = jaxbn.fold_conv(conv.kernel[...], None, params, state,
                                       epsilon=bn.epsilon)
        conv.kernel[...] = kernel
        conv.bias, conv.use_bias = nnx.Param(bias), True
        setattr(owner, name, Identity())
    folded.eval()
    return folded


def make_train_step(mesh: jax.sharding.Mesh) -> Callable:
    """One SGD step, the batch split over ``mesh``'s ``AXIS``, model and optimizer replicated.

    Every device computes its share of the loss; BatchNorm uses the global batch's statistics
    (``axis_name=AXIS``); the loss is averaged over the devices, so the gradient of the
    replicated parameters is the full-batch gradient.
    """

    @nnx.jit
    @nnx.shard_map(mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS)), out_specs=P())
    def step(model: ResNet, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
        def loss_fn(m: ResNet) -> jax.Array:
            loss = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
            return jax.lax.pmean(loss, AXIS)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    return step


@nnx.jit
def _logits(model: ResNet, x: jax.Array) -> jax.Array:
    return model(x)


def predict(model: ResNet, x: np.ndarray, chunk: int = 500) -> np.ndarray:
    """Logits in evaluation mode (running statistics), on one device, in chunks."""
    graphdef, state = nnx.split(model)
    local = nnx.merge(graphdef, jax.device_get(state))
    local.eval()
    return np.concatenate([np.asarray(_logits(local, x[i:i + chunk]))
                           for i in range(0, len(x), chunk)])


def pure_state(*nodes: Any) -> Any:
    """The arrays of the given modules/optimizers as plain nested dicts (for orbax)."""
    return [nnx.to_pure_dict(nnx.state(n)) for n in nodes]


def train(args: argparse.Namespace, data, devices) -> dict:
    """Trains, checkpoints, restores and folds; returns the results as a dict."""
    x_tr, _, x_te, y_te = data
    n_dev = len(devices)
    if args.batch_size % n_dev:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the "
                         f"{n_dev} devices")
    mesh = jax.make_mesh((n_dev,), (AXIS,), devices=devices)
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))

    def build(seed: int) -> tuple[ResNet, nnx.Optimizer]:
        model = ResNet(batchnorm_class(args.bn), args.width, args.blocks,
                       in_channels=x_tr.shape[-1], axis_name=AXIS, rngs=nnx.Rngs(seed))
        optimizer = nnx.Optimizer(model, make_optimizer(args.lr, total_steps(args, len(x_tr))),
                                  wrt=nnx.Param)
        for node in (model, optimizer):
            nnx.update(node, jax.device_put(nnx.state(node), replicated))
        return model, optimizer

    model, optimizer = build(args.seed)
    step = make_train_step(mesh)

    model.train()  # batch statistics; running statistics updated

    def train_on(xb: jax.Array, yb: jax.Array) -> jax.Array:
        return step(model, optimizer, xb, yb)

    done, train_time, history = fit(args, data, split, train_on,
                                    lambda: predict(model, x_te), "nnx")
    model.eval()  # running statistics from now on

    # Checkpoint: save model and optimizer state, restore into a freshly built pair.
    t1 = time.perf_counter()
    trained = pure_state(model, optimizer)
    restored = save_and_restore(Path(args.out) / "checkpoint", trained)
    model2, optimizer2 = build(args.seed + 1)
    for node, pure in zip((model2, optimizer2), restored, strict=True):
        state = nnx.state(node)
        nnx.replace_by_pure_dict(state, pure)
        nnx.update(node, state)
    restored_ok = trees_equal(trained, pure_state(model2, optimizer2))
    checkpoint_time = time.perf_counter() - t1
    model2.eval()
    logits = predict(model2, x_te)

    # Inference: every BatchNorm folded into its convolution.
    folded_logits = predict(fold_batchnorms(model2), x_te)
    return summarize(args, n_dev, done, (train_time, checkpoint_time), history, y_te, logits,
                     folded_logits, restored_ok)


if __name__ == "__main__":
    sys.exit(main(ARGS, train, "nnx.BatchNorm"))
