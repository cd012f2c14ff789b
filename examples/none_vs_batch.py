"""The same network without normalization (``none``) and with BatchNorm (``batch``), compared.

Reproduces the setting of Ioffe & Szegedy (2015), Sec. 4.1: fully connected sigmoid layers
with small Gaussian initial weights, batches of 60, SGD; BN added to each hidden layer. The
default runs on scikit-learn's bundled digits in about 15 seconds on 2 CPU cores; ``--dataset
mnist --data-dir DIR`` reads the canonical MNIST idx files and ``--paper`` selects the paper's
3x100 sigmoid network and 50,000 steps. Every run records the gradient norm of each layer's
weights at initialization and over training (``layer_grad_norms``).

Writes to ``--out``: ``none_vs_batch.json`` (per option and epoch: test accuracy and loss, train
loss, time, per-layer gradient norms; the 15/50/85th percentiles of one sigmoid's input; the
cost of a step; with ``--sweep`` the sweeps), ``none_vs_batch.png``, ``grad_norms.png`` (and
``cnn.png`` with ``--sweep cnn``) and ``report.md``, which states which claims about BN held.

  python examples/none_vs_batch.py
  python examples/none_vs_batch.py --dataset mnist --data-dir ../shared/data/mnist --paper
  python examples/none_vs_batch.py --sweep gradients,dropout,shift,cnn
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import cache, partial
from pathlib import Path
from typing import Any, NamedTuple

# One-field sweeps: (Config field, values); none and batch are trained at every value.
SWEEPS = {
    "lr": ("lr", [0.5, 2.0, 8.0, 32.0]),
    "depth": ("depth", [3, 10, 20]),
    "init": ("init_std", [0.01, 0.1, 1.0, 3.0]),
    "activation": ("activation", ["sigmoid", "tanh", "relu"]),
    "batch_size": ("batch_size", [2, 8, 60]),
}
# Sweeps for claims that need more than one field changed.
CLAIM_SWEEPS = {
    "gradients": "vanishing/exploding gradients: per-layer gradient norms of a 20-layer sigmoid "
                 "net and a 20-layer tanh net with N(0, 0.5) weights",
    "dropout": "regularization: train-test gap of none, batch, none+dropout, batch+dropout on a "
               "small training subset (--subset), several seeds (--seeds)",
    "shift": "non-stationary data: the base models on shifted test sets; BN's statistics "
             "re-estimated on unlabeled shifted training images (AdaBN)",
    "cnn": "a small CNN (2 convolutions, BN after each), none vs batch",
}
ACTIVATION_NAMES = ("relu", "sigmoid", "tanh")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    """The command line; built without importing JAX so that ``--help`` is instant."""
    sweeps = "\n".join(f"  {k:<11} one-field sweep of {f}: {v}" for k, (f, v) in SWEEPS.items())
    sweeps += "\n" + "\n".join(f"  {k:<11} {v}" for k, v in CLAIM_SWEEPS.items())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=_Formatter,
                                epilog="sweeps (--sweep NAME,NAME or all):\n" + sweeps)
    p.add_argument("--dataset", choices=["digits", "mnist"], default="digits",
                   help="digits: scikit-learn's bundled 8x8 digits; mnist: needs --data-dir")
    p.add_argument("--data-dir", default=None, help="folder with the four MNIST idx .gz files")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: 30 on digits, 10 on MNIST)")
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate (default: 0.5)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (default: 60)")
    p.add_argument("--depth", type=int, default=None, help="hidden layers (default: 3)")
    p.add_argument("--width", type=int, default=None, help="units per hidden layer (default: 100)")
    p.add_argument("--activation", choices=ACTIVATION_NAMES, default=None,
                   help="hidden nonlinearity (default: sigmoid)")
    p.add_argument("--init-std", type=float, default=None,
                   help="std of the Gaussian initial weights (default: 0.1)")
    p.add_argument("--paper", action="store_true",
                   help="the paper's setting: 3x100 sigmoid, batch 60, --steps steps")
    p.add_argument("--steps", type=int, default=50_000, help="with --paper: training steps")
    p.add_argument("--sweep", default="",
                   help="comma list of sweep names (listed below) or 'all'")
    p.add_argument("--sweep-epochs", type=int, default=None,
                   help="epochs of the one-field and 'gradients' sweeps' runs (default: as the "
                        "base run)")
    p.add_argument("--cnn-epochs", type=int, default=None,
                   help="epochs of the 'cnn' sweep (default: 30 on digits, 3 on MNIST)")
    p.add_argument("--cnn-subset", type=int, default=None,
                   help="training examples of the 'cnn' sweep (default: all on digits, 10000 "
                        "on MNIST)")
    p.add_argument("--subset", type=int, default=None,
                   help="training examples of the 'dropout' sweep (default: 300 digits, 2000 "
                        "MNIST)")
    p.add_argument("--dropout-steps", type=int, default=3000,
                   help="training steps of each 'dropout' sweep run")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the 'dropout' sweep")
    p.add_argument("--dropout", type=float, default=0.2,
                   help="drop probability in the 'dropout' sweep")
    p.add_argument("--target", type=float, default=0.9, help="accuracy for 'epochs to reach'")
    p.add_argument("--out", default="out/none_vs_batch", help="folder for JSON, plots, report")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rewrite the plots and report.md from --out's JSON")
    return p


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad arguments end here, before JAX loads

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: E402

import jaxbn  # noqa: E402

ACTIVATIONS = {"sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh, "relu": jax.nn.relu}
CNN_CHANNELS = (16, 32)


@dataclass(frozen=True)
class Config:
    norm: str = "batch"  # "none" or "batch"
    arch: str = "mlp"  # "mlp": depth x width dense layers; "cnn": conv3x3, conv3x3/2, pool, dense
    depth: int = 3
    width: int = 100
    activation: str = "sigmoid"
    init_std: float = 0.1  # MLP: "small random Gaussian values"; the CNN uses He-normal
    lr: float = 0.5
    batch_size: int = 60
    epochs: int = 30
    dropout: float = 0.0  # drop probability after each hidden nonlinearity (training only)
    train_subset: int = 0  # train on the first N training examples (0: all)
    seed: int = 0


def init_model(key, cfg: Config, n_in: int, n_out: int):
    """Layers ``{"w", "b"}`` (``{"w", "bn"}`` with a jaxbn BatchNorm after each hidden one when
    norm == 'batch'; BN's bias replaces the layer's bias) and the BN states."""
    if cfg.arch == "cnn":
        chans = (1,) + CNN_CHANNELS
        he = jax.nn.initializers.he_normal()
        shapes = [(3, 3, a, b) for a, b in zip(chans[:-1], chans[1:], strict=True)]
        shapes.append((chans[-1], n_out))
        inits = [lambda k, s: he(k, s)] * len(shapes)
    else:
        sizes = [n_in] + [cfg.width] * cfg.depth + [n_out]
        shapes = list(zip(sizes[:-1], sizes[1:], strict=True))
        inits = [lambda k, s: jax.random.normal(k, s) * cfg.init_std] * len(shapes)
    params, states = [], []
    for i, (shape, init) in enumerate(zip(shapes, inits, strict=True)):
        key, sub = jax.random.split(key)
        layer = {"w": init(sub, shape)}
        if cfg.norm == "batch" and i < len(shapes) - 1:
            layer["bn"], bn_state = jaxbn.bn_init(shape[-1])
            states.append(bn_state)
        else:
            layer["b"] = jnp.zeros(shape[-1])
        params.append(layer)
    return params, states


def forward(params, states, x, train: bool, cfg: Config, key=None):
    """Returns ``(logits, new_states, input of the last hidden layer's nonlinearity)``.
    ``key`` (training only) draws the dropout masks when ``cfg.dropout > 0``."""
    act = ACTIVATIONS[cfg.activation]
    new_states, it = [], iter(states)
    pre = None
    if cfg.arch == "cnn":
        side = math.isqrt(x.shape[-1])
        x = x.reshape(-1, side, side, 1)
    for i, layer in enumerate(params[:-1]):
        if cfg.arch == "cnn":
            stride = 1 if i == 0 else 2
            pre = jax.lax.conv_general_dilated(x, layer["w"], (stride, stride), "SAME",
                                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
        else:
            pre = x @ layer["w"]
        if "bn" in layer:  # BN over every axis but the last (batch, and space in the CNN)
            pre, s = jaxbn.bn_apply(layer["bn"], next(it), pre, train, momentum=0.9)
            new_states.append(s)
        else:
            pre = pre + layer["b"]
        x = act(pre)
        if train and cfg.dropout > 0 and key is not None:
            key, sub = jax.random.split(key)
            keep = jax.random.bernoulli(sub, 1.0 - cfg.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - cfg.dropout), 0.0)
    if cfg.arch == "cnn":
        x = x.mean(axis=(1, 2))
    out = params[-1]
    return x @ out["w"] + out["b"], new_states, pre.reshape(-1, pre.shape[-1])


def summary(params, states, cfg: Config) -> str:
    desc = (f"conv3x3 x{CNN_CHANNELS[0]}, conv3x3/2 x{CNN_CHANNELS[1]}, mean pool, "
            f"{cfg.activation}" if cfg.arch == "cnn"
            else f"{cfg.depth} x {cfg.width} {cfg.activation}")
    lines = [f"model '{cfg.norm}': {desc}"]
    kind = "conv" if cfg.arch == "cnn" else "dense"
    for i, layer in enumerate(params):
        shape = layer["w"].shape
        name = "dense" if i == len(params) - 1 else kind
        lines.append(f"  {name}_{i}: {shape[-2]} -> {shape[-1]}"
                     + ("" if "b" not in layer else " + bias"))
        if "bn" in layer:
            lines.append(f"  batchnorm_{i}: {shape[-1]} features (scale, bias; mean, var)")
        if i < len(params) - 1:
            lines.append(f"  {cfg.activation}" + (f", dropout {cfg.dropout}" if cfg.dropout
                                                  else ""))
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    n_state = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(states))
    lines.append(f"  parameters: {n_params:,}   state (running statistics): {n_state:,}")
    return "\n".join(lines)


class Fns(NamedTuple):
    """The jitted pieces of one configuration's training and evaluation."""

    tx: Any  # the optax optimizer
    run_epoch: Any  # (params, states, opt, xb, yb, keys or None) -> (..., mean loss)
    evaluate: Any  # (params, states, x, y) -> (accuracy, loss, 15/50/85th pct of one input)
    evaluate_train_mode: Any  # (params, states, x, y, batch) -> accuracy, batch statistics
    step: Any  # one training step: ((params, states, opt), (x, y, key or None)) -> (carry, loss)
    grad_norms: Any  # (params, states, xb, yb) -> norm of each layer's weight gradient
    adapt: Any  # (params, states, xb) -> BN states re-estimated on the batches xb (AdaBN)


EVAL_CHUNK = 2000  # examples per evaluation call (bounds the CNN's activation memory)


def make_fns(cfg: Config) -> Fns:
    """The jitted functions of ``cfg``, shared by configurations that differ only in seed,
    epochs or training subset (so that they compile once)."""
    return _make_fns(replace(cfg, seed=0, epochs=0, train_subset=0))


@cache
def _make_fns(cfg: Config) -> Fns:
    tx = optax.sgd(cfg.lr)

    def loss_fn(params, states, x, y, key=None):
        logits, new_states, _ = forward(params, states, x, True, cfg, key)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, new_states

    def step(carry, batch):
        params, states, opt = carry
        x, y, key = batch
        (loss, states), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, states, x, y,
                                                                          key)
        updates, opt = tx.update(grads, opt)
        return (optax.apply_updates(params, updates), states, opt), loss

    @jax.jit
    def run_epoch(params, states, opt, xb, yb, keys):
        (params, states, opt), losses = jax.lax.scan(step, (params, states, opt), (xb, yb, keys))
        return params, states, opt, losses.mean()

    @jax.jit
    def eval_chunk(params, states, x, y):
        logits, _, pre = forward(params, states, x, False, cfg)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
        return jnp.sum(jnp.argmax(logits, -1) == y), loss, pre[:, 0]

    def evaluate(params, states, x, y):
        parts = [eval_chunk(params, states, x[i:i + EVAL_CHUNK], y[i:i + EVAL_CHUNK])
                 for i in range(0, len(x), EVAL_CHUNK)]
        correct, loss, pre = (np.concatenate([np.atleast_1d(np.asarray(p[j])) for p in parts])
                              for j in range(3))
        return (float(correct.sum() / len(x)), float(loss.sum() / len(x)),
                np.percentile(pre, [15.0, 50.0, 85.0]))

    @partial(jax.jit, static_argnames="batch")
    def evaluate_train_mode(params, states, x, y, batch):
        """Accuracy when BN normalizes each ``batch`` examples of ``x`` with their own
        statistics instead of the running ones."""

        def accuracy(xy):
            logits, _, _ = forward(params, states, xy[0], True, cfg)
            return jnp.mean(jnp.argmax(logits, -1) == xy[1])

        n = (len(x) // batch) * batch
        return jax.lax.map(accuracy, (x[:n].reshape(-1, batch, x.shape[-1]),
                                      y[:n].reshape(-1, batch))).mean()

    def layer_norms(params, states, x, y):
        grads, _ = jax.grad(loss_fn, has_aux=True)(params, states, x, y)
        return jnp.stack([jnp.linalg.norm(g["w"]) for g in grads])

    @jax.jit
    def grad_norms(params, states, xb, yb):
        """Per layer, the norm of the weight gradient, averaged over the batches ``xb``."""
        return jax.vmap(layer_norms, in_axes=(None, None, 0, 0))(params, states, xb, yb).mean(0)

    @jax.jit
    def adapt(params, states, xb):
        """Test-time adaptation (AdaBN): the BN statistics of the unlabeled batches ``xb``,
        accumulated exactly with ``jaxbn.reset_stats`` / ``jaxbn.finish_stats``."""

        def body(s, x):
            return forward(params, s, x, True, cfg)[1], None

        fresh = [jaxbn.reset_stats(s) for s in states]
        new, _ = jax.lax.scan(body, fresh, xb)
        return [jaxbn.finish_stats(s) for s in new]

    return Fns(tx, run_epoch, evaluate, evaluate_train_mode, step, grad_norms, adapt)


def _record_epochs(epochs: int, most: int = 50) -> set[int]:
    """Epochs after which gradient norms are recorded: all, or ``most`` evenly spaced."""
    every = max(1, math.ceil(epochs / most))
    return {e for e in range(1, epochs + 1) if e % every == 0 or e == epochs}


def train(cfg: Config, data, *, progress: bool = True, verbose: bool = True,
          keep_model: bool = False) -> dict:
    """Trains one configuration; returns per-epoch metrics (and ``model`` = (params, states)
    when ``keep_model``)."""
    x_tr, y_tr, x_te, y_te = data
    if cfg.train_subset:
        x_tr, y_tr = x_tr[: cfg.train_subset], y_tr[: cfg.train_subset]
    params, states = init_model(jax.random.key(cfg.seed), cfg, x_tr.shape[1], 10)
    if verbose:
        print(summary(params, states, cfg))
    fns = make_fns(cfg)
    opt = fns.tx.init(params)
    rng = np.random.default_rng(cfg.seed)
    drop_key = jax.random.key(cfg.seed + 10_000)
    steps = len(x_tr) // cfg.batch_size
    k = min(10, steps)  # gradient norms: the mean over the same k training batches every time
    probe = (x_tr[: k * cfg.batch_size].reshape(k, cfg.batch_size, -1),
             y_tr[: k * cfg.batch_size].reshape(k, cfg.batch_size))
    hist: dict = {"test_accuracy": [], "test_loss": [], "train_loss": [], "epoch_time_s": [],
                  "steps": [], "sigmoid_input_percentiles": [],
                  "layer_grad_norms": [np.asarray(fns.grad_norms(params, states, *probe)).tolist()],
                  "layer_grad_norm_steps": [0]}
    record = _record_epochs(cfg.epochs)
    epochs = range(cfg.epochs)
    if progress:
        from tqdm import tqdm
        epochs = tqdm(epochs, desc=cfg.norm, leave=False, file=sys.stdout)
    for epoch in epochs:
        perm = rng.permutation(len(x_tr))[: steps * cfg.batch_size]
        xb = x_tr[perm].reshape(steps, cfg.batch_size, -1)
        yb = y_tr[perm].reshape(steps, cfg.batch_size)
        keys = (jax.random.split(jax.random.fold_in(drop_key, epoch), steps) if cfg.dropout
                else None)
        t0 = time.perf_counter()
        params, states, opt, loss = fns.run_epoch(params, states, opt, xb, yb, keys)
        loss = float(loss)
        dt = time.perf_counter() - t0
        hist["epoch_time_s"].append(dt)
        if cfg.epochs > 100 and epoch + 1 not in record:  # long runs: evaluate 50 times
            continue
        acc, test_loss, pct = fns.evaluate(params, states, x_te, y_te)
        hist["test_accuracy"].append(acc)
        hist["test_loss"].append(test_loss)
        hist["train_loss"].append(loss)
        hist["steps"].append((epoch + 1) * steps)
        hist["sigmoid_input_percentiles"].append([float(p) for p in pct])
        if epoch + 1 in record:
            norms = fns.grad_norms(params, states, *probe)
            hist["layer_grad_norms"].append(np.asarray(norms).tolist())
            hist["layer_grad_norm_steps"].append((epoch + 1) * steps)
        if progress:
            epochs.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}")
    if cfg.norm == "batch":
        if cfg.arch == "mlp":  # the whole test set as one batch (too large for the CNN)
            hist["test_accuracy_batch_stats"] = float(
                fns.evaluate_train_mode(params, states, x_te, y_te, len(x_te)))
        hist["test_accuracy_minibatch_stats"] = float(
            fns.evaluate_train_mode(params, states, x_te, y_te, cfg.batch_size))
    hist["final_test_accuracy"] = hist["test_accuracy"][-1]
    hist["final_test_loss"] = hist["test_loss"][-1]
    tr_acc, tr_loss, _ = fns.evaluate(params, states, x_tr, y_tr)
    hist["final_train_accuracy"], hist["final_train_loss_eval"] = tr_acc, tr_loss
    hist["config"] = asdict(cfg)
    if keep_model:
        hist["model"] = (params, states)
    return hist


def epochs_to_reach(hist: dict, target: float):
    for i, a in enumerate(hist["test_accuracy"]):
        if a >= target:
            return i + 1
    return None


def step_costs(base: Config, data, repeats: int = 50) -> dict:
    """Time of one jitted training step and its compiled temp memory, for ``none`` and
    ``batch``, timed in alternation (this machine is noisy): medians, and the median of the
    per-repetition time ratio batch / none."""
    x_tr, y_tr, _, _ = data
    batch = (jnp.asarray(x_tr[: base.batch_size]), jnp.asarray(y_tr[: base.batch_size]), None)
    runs = {}
    for norm in ("none", "batch"):
        cfg = replace(base, norm=norm)
        params, states = init_model(jax.random.key(0), cfg, x_tr.shape[1], 10)
        fns = make_fns(cfg)
        carry = (params, states, fns.tx.init(params))
        compiled = jax.jit(fns.step).lower(carry, batch).compile()
        jax.block_until_ready(compiled(carry, batch))
        mem = compiled.memory_analysis()
        runs[norm] = (compiled, carry, int(getattr(mem, "temp_size_in_bytes", 0) or 0))
    times = {norm: [] for norm in runs}
    for _ in range(repeats):
        for norm, (compiled, carry, _) in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(carry, batch))
            times[norm].append(time.perf_counter() - t0)
    out = {norm: {"step_time_s": float(np.median(times[norm])), "temp_bytes": runs[norm][2]}
           for norm in runs}
    out["time_ratio"] = float(np.median(np.asarray(times["batch"]) / np.asarray(times["none"])))
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLORS = {"none": "C0", "batch": "C1"}


def plot(results: dict, path: Path, title: str) -> None:
    """Test accuracy, and the paper's Fig. 1(b, c): percentiles of one sigmoid's input."""
    from matplotlib.lines import Line2D

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, hist in results.items():
        axes[0].plot(hist["steps"], hist["test_accuracy"], color=COLORS[name], label=name)
        pct = np.asarray(hist["sigmoid_input_percentiles"])
        for j, style in enumerate((":", "-", ":")):
            axes[1].plot(hist["steps"], pct[:, j], style, color=COLORS[name])
    cfg = results["batch"]["config"]
    axes[0].set(xlabel="training steps", ylabel="test accuracy", title=title)
    axes[1].set(xlabel="training steps", ylabel="input to the nonlinearity (test set)",
                title=f"unit 0 of hidden layer {cfg['depth']} (the last), {cfg['activation']}")
    handles = [Line2D([], [], color=COLORS[n], label=n) for n in results]
    handles += [Line2D([], [], color="k", ls="-", label="median"),
                Line2D([], [], color="k", ls=":", label="15th / 85th percentile")]
    axes[0].legend()
    axes[1].legend(handles=handles, fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grad_norms(panels: dict, path: Path) -> None:
    """One panel per setting: each layer's weight-gradient norm (log scale) at initialization,
    mid-training and at the end, none vs batch."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (label, runs) in zip(axes[0], panels.items(), strict=True):
        for name, hist in runs.items():
            g = np.asarray(hist["layer_grad_norms"], float)
            at = hist["layer_grad_norm_steps"]
            layers = np.arange(1, g.shape[1] + 1)
            for i, style in ((0, ":"), (len(g) // 2, "--"), (len(g) - 1, "-")):
                ax.plot(layers, g[i], style, marker=".", color=COLORS[name],
                        label=f"{name}, step {at[i]}")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="layer (1 = input side; last = output layer)",
               ylabel="norm of the weight gradient", title=label)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cnn(runs: dict, path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, hist in runs.items():
        ax.plot(np.arange(1, len(hist["test_accuracy"]) + 1), hist["test_accuracy"],
                marker=".", color=COLORS[name], label=name)
    ax.set(xlabel="epoch", ylabel="test accuracy", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Trainer:
    """Trains configurations once each (a sweep reuses the runs another already made)."""

    def __init__(self, data, progress: bool, done: dict | None = None):
        self.data, self.progress, self.done = data, progress, dict(done or {})

    def __call__(self, cfg: Config) -> dict:
        if cfg not in self.done:
            self.done[cfg] = train(cfg, self.data, progress=self.progress, verbose=False)
        return self.done[cfg]


def run_sweeps(names, base: Config, trainer: Trainer) -> dict:
    """Trains none and batch for every value of each named one-field sweep (``base.epochs``
    epochs; the caller may shorten them)."""
    out = {}
    for name in names:
        field, values = SWEEPS[name]
        rows = []
        for v in values:
            row = {field: v}
            for norm in ("none", "batch"):
                cfg = replace(base, norm=norm, **{field: v})
                if field == "batch_size":  # same number of examples seen, small lr for tiny batches
                    cfg = replace(cfg, lr=base.lr * v / 60)
                h = trainer(cfg)
                ok = np.isfinite(h["train_loss"][-1])
                row[norm] = h["final_test_accuracy"] if ok else float("nan")
                row[f"{norm}_train_accuracy"] = h["final_train_accuracy"] if ok else float("nan")
                row[f"{norm}_train_loss"] = h["train_loss"][-1]
                row[f"{norm}_test_loss"] = h["final_test_loss"]
                if norm == "batch":
                    row["batch_eval_with_minibatch_stats"] = h["test_accuracy_minibatch_stats"]
            rows.append(row)
            print(f"  sweep {name}: {row}")
        out[name] = rows
    return out


# label -> (the Config fields changed from the base, the problem expected without BN)
GRADIENT_SETTINGS = {
    "20-layer sigmoid, N(0, 0.1) weights": ({"depth": 20}, "vanishing"),
    "20-layer tanh, N(0, 0.5) weights": ({"depth": 20, "activation": "tanh", "init_std": 0.5},
                                         "exploding"),
}


def sweep_gradients(base: Config, trainer: Trainer) -> dict:
    """none and batch in each of GRADIENT_SETTINGS; the runs' ``layer_grad_norms``."""
    out = {}
    for label, (fields, problem) in GRADIENT_SETTINGS.items():
        runs = {}
        for norm in ("none", "batch"):
            cfg = replace(base, norm=norm, **fields)
            h = trainer(cfg)
            runs[norm] = {k: h[k] for k in ("layer_grad_norms", "layer_grad_norm_steps",
                                            "final_test_accuracy", "config")}
        out[label] = {"problem": problem, **runs}
        print(f"  sweep gradients: {label}: " + ", ".join(
            f"{n} first/last {_ratios(runs[n])[0]:.3g} at init" for n in ("none", "batch")))
    return out


def sweep_dropout(base: Config, trainer: Trainer, subset: int, steps: int, seeds: int,
                  rate: float = 0.5) -> dict:
    """none, batch, none + dropout, batch + dropout on the first ``subset`` training examples
    for about ``steps`` steps, each with ``seeds`` seeds: final train/test accuracy and loss."""
    epochs = max(1, math.ceil(steps / max(1, subset // base.batch_size)))
    out = {"subset": subset, "epochs": epochs, "dropout": rate, "variants": {}}
    for norm in ("none", "batch"):
        for p in (0.0, rate):
            name = norm + (" + dropout" if p else "")
            runs = [trainer(replace(base, norm=norm, dropout=p, train_subset=subset,
                                    epochs=epochs, seed=s)) for s in range(seeds)]
            rec = {k: [r[k] for r in runs] for k in ("final_train_accuracy", "final_test_accuracy",
                                                     "final_train_loss_eval", "final_test_loss")}
            rec["gap"] = [a - b for a, b in zip(rec["final_train_accuracy"],
                                                rec["final_test_accuracy"], strict=True)]
            out["variants"][name] = rec
            print(f"  sweep dropout: {name}: test {np.mean(rec['final_test_accuracy']):.4f}, "
                  f"gap {np.mean(rec['gap']):.4f}")
    return out


SHIFTS = {
    "contrast x0.5, brightness +0.3": lambda x, rng: x * 0.5 + 0.3,
    "Gaussian noise, sd 0.3": lambda x, rng: x + rng.normal(0.0, 0.3, x.shape).astype(x.dtype),
    "inverted (1 - x)": lambda x, rng: 1.0 - x,
}


def sweep_shift(models: dict, base: Config, data, chunk: int = 500) -> dict:
    """The trained base models on shifted test sets: none; batch with its running statistics;
    batch with statistics re-estimated on the shifted (unlabeled) training images (AdaBN);
    batch normalizing the shifted test set in training-size batches with their own statistics.
    The row 'clean' re-estimates on the clean training images (a control: ~ running)."""
    x_tr, _, x_te, y_te = data
    fns = {norm: make_fns(replace(base, norm=norm)) for norm in models}
    rng = np.random.default_rng(0)
    n = (len(x_tr) // chunk) * chunk
    out = {}
    for label, shift in {"clean": lambda x, rng: x, **SHIFTS}.items():
        xs_tr, xs_te = shift(x_tr, rng), shift(x_te, rng)
        row = {"none": fns["none"].evaluate(*models["none"], xs_te, y_te)[0]}
        params, states = models["batch"]
        f = fns["batch"]
        row["batch_running"] = f.evaluate(params, states, xs_te, y_te)[0]
        adapted = f.adapt(params, states, xs_tr[:n].reshape(-1, chunk, x_tr.shape[1]))
        row["batch_adapted"] = f.evaluate(params, adapted, xs_te, y_te)[0]
        row["batch_test_batches"] = float(f.evaluate_train_mode(params, states, xs_te, y_te,
                                                                base.batch_size))
        out[label] = row
        print(f"  sweep shift: {label}: {row}")
    return out


def sweep_cnn(base: Config, trainer: Trainer, data, epochs: int, subset: int) -> dict:
    """A small CNN (BN after each convolution), none vs batch: accuracy per epoch, step cost.
    ``subset``: train on the first that many training examples (0: all)."""
    cfg = replace(base, arch="cnn", activation="relu", lr=0.1, depth=2, epochs=epochs,
                  train_subset=subset)
    runs = {norm: trainer(replace(cfg, norm=norm)) for norm in ("none", "batch")}
    out = {norm: {k: h[k] for k in ("test_accuracy", "train_loss", "epoch_time_s", "steps",
                                    "final_test_accuracy", "final_train_accuracy",
                                    "layer_grad_norms", "layer_grad_norm_steps", "config")}
           for norm, h in runs.items()}
    out["costs"] = step_costs(cfg, data)
    print("  sweep cnn: " + ", ".join(f"{n} {out[n]['test_accuracy']}" for n in runs))
    return out


def _range(values) -> float:
    return float(np.ptp(np.asarray(values, dtype=float)))


def _ratios(hist: dict) -> np.ndarray:
    """Per record: first layer's weight-gradient norm / the output layer's."""
    g = np.asarray(hist["layer_grad_norms"], float)
    return g[:, 0] / g[:, -1]


def _median_ratio(hist: dict) -> float:
    r = _ratios(hist)
    return float(np.median(r)) if np.all(np.isfinite(r)) else float("nan")


def _mean_sd(values) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}"


def _verdict(v) -> str:
    return v if isinstance(v, str) else ("held" if v else "did not hold")


def write_report(path: Path, results: dict, sweeps: dict, costs: dict, target: float,
                 dataset: str, sweep_epochs: int | None = None) -> None:
    none, batch = results["none"], results["batch"]
    setting = {k: v for k, v in batch["config"].items() if k not in ("norm", "arch", "dropout",
                                                                       "train_subset")}
    lines = ["# none vs batch: which claims about BatchNorm held", "",
             f"Dataset: {dataset}.", "",
             f"Setting of both runs ('none': no normalization; 'batch': BN after each hidden "
             f"layer): {json.dumps(setting)}", "",
             *([f"The sweeps' runs (one-field sweeps and 'gradients') are shortened to "
                f"{sweep_epochs} epochs ({sweep_epochs * batch['steps'][0]} steps at batch "
                f"{batch['config']['batch_size']}); the base runs above are not.", ""]
               if sweep_epochs and sweep_epochs != batch["config"]["epochs"] else []),
             "Test accuracy during training (Fig. 1(a) of the paper):", "",
             "| steps | none | batch |", "|---:|---:|---:|"]
    n = len(none["test_accuracy"])
    for i in sorted({0, 1, 2, n // 5, n // 2, n - 1} & set(range(n))):
        lines.append(f"| {batch['steps'][i]} | {none['test_accuracy'][i]:.4f} | "
                     f"{batch['test_accuracy'][i]:.4f} |")
    targets = sorted({target, 0.95, 0.97})
    reach = {t: (epochs_to_reach(batch, t), epochs_to_reach(none, t)) for t in targets}
    lines += ["", f"Epochs needed to reach a test accuracy ('-': not within the {n} epochs):", "",
              "| test accuracy | none | batch |", "|---:|---:|---:|"]
    lines += [f"| {t:.0%} | {o or '-'} | {b or '-'} |" for t, (b, o) in reach.items()]
    lines += ["", "## Verdicts", ""]

    def claim(text, verdict, evidence):
        lines.append(f"- **{text}**: {_verdict(verdict)}. {evidence}")

    early = min(3, n) - 1
    ahead = sum(b > o for b, o in zip(batch["test_accuracy"], none["test_accuracy"], strict=True))
    claim("Higher accuracy early in training",
          batch["test_accuracy"][early] > none["test_accuracy"][early],
          f"after epoch {early + 1}: batch {batch['test_accuracy'][early]:.3f} vs none "
          f"{none['test_accuracy'][early]:.3f}; final: batch {batch['final_test_accuracy']:.3f} "
          f"vs none {none['final_test_accuracy']:.3f}; batch ahead after {ahead} of {n} epochs.")
    never = float("inf")
    claim("Fewer epochs to reach a test accuracy (speed of convergence)",
          all((b or never) <= (o or never) for b, o in reach.values())
          and any((b or never) < (o or never) for b, o in reach.values()),
          "see the table above: " + ", ".join(
              f"{t:.0%}: batch {b or '-'}, none {o or '-'}" for t, (b, o) in reach.items()) + ".")
    pct = {k: np.asarray(h["sigmoid_input_percentiles"]) for k, h in results.items()}
    drift = {k: (_range(p[:, 1]), _range(p[:, 2] - p[:, 0])) for k, p in pct.items()}
    claim("Steadier distribution of a sigmoid's input (Fig. 1(b, c))",
          drift["batch"][0] < drift["none"][0],
          "range over training of the median: batch "
          f"{drift['batch'][0]:.2f}, none {drift['none'][0]:.2f}; of the 15-85th percentile "
          f"spread: batch {drift['batch'][1]:.2f}, none {drift['none'][1]:.2f} (the learned "
          "scale lets BN's spread grow on purpose).")
    r = {k: (_ratios(h)[0], _median_ratio(h), _ratios(h)[-1]) for k, h in results.items()}
    claim("Improves gradient flow (first-layer / last-layer weight-gradient norm closer to 1)",
          abs(np.log10(r["batch"][1])) < abs(np.log10(r["none"][1])),
          "ratio at initialization, median over training, at the end: none "
          + ", ".join(f"{v:.3g}" for v in r["none"]) + "; batch "
          + ", ".join(f"{v:.3g}" for v in r["batch"]) + " (`grad_norms.png`, first panel).")
    if "gradients" in sweeps:
        for label, rec in sweeps["gradients"].items():
            problem = rec["problem"]
            rn, rb = _median_ratio(rec["none"]), _median_ratio(rec["batch"])
            r0n, r0b = _ratios(rec["none"])[0], _ratios(rec["batch"])[0]
            present = (r0n < 0.1) if problem == "vanishing" else (r0n > 10)
            if not (np.isfinite(r0n) and np.isfinite(r0b)):
                verdict = "inconclusive"
            elif not present:
                verdict = f"inconclusive (no {problem} gradients without BN here)"
            else:
                verdict = abs(np.log10(r0b)) < abs(np.log10(r0n)) - 1
            claim(f"Manages {problem} gradients ({label})", verdict,
                  f"first-layer / last-layer gradient-norm ratio at initialization: none "
                  f"{r0n:.3g}, batch {r0b:.3g} (held: BN's at least 10x closer to 1); median "
                  f"over training: none {rn:.3g}, batch {rb:.3g}; final test accuracy none "
                  f"{rec['none']['final_test_accuracy']:.3f}, batch "
                  f"{rec['batch']['final_test_accuracy']:.3f}.")
    if "lr" in sweeps:
        rows = sweeps["lr"]
        best_lr = {k: max(rows, key=lambda r, k=k: np.nan_to_num(r[k]))["lr"]
                   for k in ("none", "batch")}
        top = rows[-1]
        claim("Tolerates higher learning rates",
              np.nan_to_num(top["batch"]) > np.nan_to_num(top["none"]),
              f"at lr={top['lr']}: batch {top['batch']:.3f} vs none {top['none']:.3f}; best lr: "
              f"none {best_lr['none']}, batch {best_lr['batch']} (table 'lr').")
    if "depth" in sweeps:
        deep = sweeps["depth"][-1]
        claim("Makes deep networks trainable", deep["batch"] > deep["none"] + 0.1,
              f"depth {deep['depth']}: batch {deep['batch']:.3f} vs none {deep['none']:.3f} "
              f"(table 'depth').")
    if "init" in sweeps:
        rows = sweeps["init"]
        spread = {k: _range([np.nan_to_num(r[k]) for r in rows]) for k in ("none", "batch")}
        claim("Less sensitive to initialization", spread["batch"] < spread["none"],
              f"range of final accuracy over init std {[r['init_std'] for r in rows]}: "
              f"batch {spread['batch']:.3f}, none {spread['none']:.3f} (table 'init').")
    if "activation" in sweeps:
        rows = sweeps["activation"]
        claim("Improves final accuracy with every activation (by > 0.1 point)",
              all(r["batch"] > r["none"] + 0.001 for r in rows),
              "final accuracy, batch vs none: " + ", ".join(
                  f"{r['activation']} {r['batch']:.3f} vs {r['none']:.3f}" for r in rows)
              + " (table 'activation').")
    if "batch_size" in sweeps:
        rows = sweeps["batch_size"]
        small, large = rows[0], rows[-1]
        claim("Depends on batch size (degrades with tiny batches)",
              small["batch"] < large["batch"] - 0.02 or small["batch"] < small["none"],
              f"batch {small['batch_size']}: {small['batch']:.3f} (none {small['none']:.3f}); "
              f"batch {large['batch_size']}: {large['batch']:.3f} (none {large['none']:.3f}); "
              "same examples seen, lr scaled with the batch (table 'batch_size').")

        def gap(norm, row):
            return row[f"{norm}_train_accuracy"] - row[norm]

        g_small, g_large, g_none = gap("batch", small), gap("batch", large), gap("none", small)
        claim("Overfitting with small batches (BN overfits when the batch is too small)",
              g_small > g_large + 0.01 and g_small > g_none + 0.01,
              f"train minus test accuracy (both with the running statistics) for batch: "
              f"{g_small:.4f} at batch size {small['batch_size']}, {g_large:.4f} at "
              f"{large['batch_size']}; none at {small['batch_size']}: {g_none:.4f}. BN's "
              f"accuracy at batch {small['batch_size']} is low on the training set too "
              f"(train {small['batch_train_accuracy']:.4f}, test {small['batch']:.4f}): "
              "held needs a gap larger by > 0.01 than both (table 'batch_size').")
    running = batch["final_test_accuracy"]
    # (label, accuracy with batch statistics, the same model's accuracy with running statistics)
    gaps = [("whole test set", batch["test_accuracy_batch_stats"], running),
            (f"batches of {batch['config']['batch_size']}",
             batch["test_accuracy_minibatch_stats"], running)]
    small_note = ""
    if "batch_size" in sweeps:
        small = sweeps["batch_size"][0]
        gaps.append((f"batches of {small['batch_size']} (sweep)",
                     small["batch_eval_with_minibatch_stats"], small["batch"]))
        small_note = (f" (with running statistics at batch {small['batch_size']}: "
                      f"{small['batch']:.4f})")
    worst = max(abs(with_batch - with_running) for _, with_batch, with_running in gaps)
    claim("Training and inference statistics differ enough to matter", worst > 0.005,
          f"test accuracy with the running statistics {running:.4f}; "
          f"normalizing with batch statistics instead: "
          + ", ".join(f"{label}: {acc:.4f}" for label, acc, _ in gaps)
          + small_note + f". Largest gap {worst:.4f}.")
    if "dropout" in sweeps:
        d = sweeps["dropout"]
        v = d["variants"]
        m = {k: (np.mean(x["gap"]), np.std(x["gap"]), np.mean(x["final_test_accuracy"]),
                 np.std(x["final_test_accuracy"])) for k, x in v.items()}
        noise = max(m["none"][1], m["batch"][1], 0.002)
        diff = m["none"][0] - m["batch"][0]
        verdict = ("inconclusive" if abs(diff) <= noise
                   else diff > 0 and m["batch"][2] > m["none"][2])
        setting = (f"first {d['subset']} training examples, {d['epochs']} epochs, "
                   f"{len(v['none']['gap'])} seeds, dropout {d['dropout']}")
        claim("Regularization: reduces overfitting and improves generalization", verdict,
              f"{setting}: train minus test accuracy, none {m['none'][0]:.4f} ± "
              f"{m['none'][1]:.4f}, "
              f"batch {m['batch'][0]:.4f} ± {m['batch'][1]:.4f}; test accuracy none "
              f"{m['none'][2]:.4f}, batch {m['batch'][2]:.4f}. Held needs a smaller gap (by more "
              "than the seeds' spread) and a higher test accuracy (table 'dropout').")
        gain = {k: m[f"{k} + dropout"][2] - m[k][2] for k in ("none", "batch")}
        noise = max(m[k][3] for k in m)
        if gain["none"] <= noise:
            verdict = "inconclusive (dropout does not help even without BN here)"
        else:
            verdict = gain["batch"] < gain["none"] - noise
        claim("A slight regularizing effect, reducing the need for dropout", verdict,
              f"test accuracy gained by adding dropout: none {gain['none']:+.4f}, batch "
              f"{gain['batch']:+.4f} (seed spread up to {noise:.4f}); held: dropout helps "
              f"batch less than none. Best: {max(m, key=lambda k: m[k][2])}; batch without "
              f"dropout {m['batch'][2]:.4f} vs none with dropout "
              f"{m['none + dropout'][2]:.4f} (table 'dropout').")
    if "shift" in sweeps:
        s = sweeps["shift"]
        clean = s["clean"]
        shifts = [k for k in s if k != "clean"]
        drops = {k: clean["batch_running"] - s[k]["batch_running"] for k in shifts}
        claim("Non-stationary data: BN assumes stationary inputs, shifted inputs hurt it",
              all(v > 0.02 for v in drops.values()),
              "test accuracy of the trained batch model with its running statistics, clean "
              f"{clean['batch_running']:.4f}, shifted: " + ", ".join(
                  f"{k} {s[k]['batch_running']:.4f}" for k in shifts)
              + f"; none: clean {clean['none']:.4f}, " + ", ".join(
                  f"{k} {s[k]['none']:.4f}" for k in shifts) + " (table 'shift').")
        for k in shifts:
            gain = s[k]["batch_adapted"] - s[k]["batch_running"]
            claim(f"Non-stationary data remedy: BN statistics re-estimated on unlabeled shifted "
                  f"data (AdaBN, `reset_stats` + `finish_stats`), {k}", gain > 0.02,
                  f"{s[k]['batch_running']:.4f} with the running statistics, "
                  f"{s[k]['batch_adapted']:.4f} re-estimated ({gain:+.4f}; clean "
                  f"{clean['batch_running']:.4f}, none on this shift {s[k]['none']:.4f}).")
    if "cnn" in sweeps:
        c = sweeps["cnn"]
        a_n, a_b = c["none"]["test_accuracy"], c["batch"]["test_accuracy"]
        claim("BN after each convolution helps a CNN (accuracy after epoch 1 and at the end)",
              a_b[0] > a_n[0] and a_b[-1] >= a_n[-1],
              f"after epoch 1: batch {a_b[0]:.4f} vs none {a_n[0]:.4f}; after {len(a_b)}: "
              f"{a_b[-1]:.4f} vs {a_n[-1]:.4f}; one step {c['costs']['time_ratio']:.2f}x the "
              f"time ({c['costs']['batch']['step_time_s'] * 1e3:.2f} ms vs "
              f"{c['costs']['none']['step_time_s'] * 1e3:.2f} ms) (table 'cnn', `cnn.png`).")
    if costs:
        r_t = costs["time_ratio"]
        r_m = (costs["batch"]["temp_bytes"] + 1) / (costs["none"]["temp_bytes"] + 1)
        epoch_t = {k: float(np.median(h["epoch_time_s"])) for k, h in results.items()}
        claim("Costs extra time and memory", r_t > 1.0 or r_m > 1.0,
              f"one jitted training step: {r_t:.2f}x the time and {r_m:.2f}x the compiled temp "
              f"memory of 'none' (medians, side by side: "
              + ", ".join(f"{k} {costs[k]['step_time_s'] * 1e6:.0f} us, "
                          f"{costs[k]['temp_bytes'] / 1024:.0f} KiB" for k in ("none", "batch"))
              + f"); median epoch time batch {epoch_t['batch']:.3f} s vs none "
              f"{epoch_t['none']:.3f} s.")
    lines += _sweep_tables(sweeps)
    path.write_text("\n".join(lines) + "\n")


def _sweep_tables(sweeps: dict) -> list[str]:
    lines = []
    for name, rows in sweeps.items():
        if name not in SWEEPS:
            continue
        field = SWEEPS[name][0]
        lines += ["", f"## Sweep '{name}'", "",
                  "Final test accuracy; 'batch, batch statistics' normalizes the test set in "
                  "training-size batches with their own statistics; train accuracy is measured "
                  "like the test accuracy (running statistics):", "",
                  f"| {field} | none | batch | batch, batch statistics | none train | "
                  "batch train | none train - test | batch train - test |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r[field]} | {r['none']:.4f} | {r['batch']:.4f} | "
                  f"{r['batch_eval_with_minibatch_stats']:.4f} | {r['none_train_accuracy']:.4f} | "
                  f"{r['batch_train_accuracy']:.4f} | "
                  f"{r['none_train_accuracy'] - r['none']:.4f} | "
                  f"{r['batch_train_accuracy'] - r['batch']:.4f} |" for r in rows]
    if "gradients" in sweeps:
        lines += ["", "## Sweep 'gradients'", "",
                  "Norm of each layer's weight gradient (mean over 10 fixed training batches), "
                  "first layer / output layer, and both, at initialization and at the end "
                  "(`grad_norms.png`):", "",
                  "| setting | run | ratio at init | ratio at end | first, last at init | "
                  "first, last at end | final test accuracy |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for label, rec in sweeps["gradients"].items():
            for norm in ("none", "batch"):
                g = np.asarray(rec[norm]["layer_grad_norms"], float)
                r = _ratios(rec[norm])
                lines.append(f"| {label} | {norm} | {r[0]:.3g} | {r[-1]:.3g} | {g[0, 0]:.3g}, "
                             f"{g[0, -1]:.3g} | {g[-1, 0]:.3g}, {g[-1, -1]:.3g} | "
                             f"{rec[norm]['final_test_accuracy']:.4f} |")
    if "dropout" in sweeps:
        d = sweeps["dropout"]
        lines += ["", "## Sweep 'dropout'", "",
                  f"First {d['subset']} training examples, {d['epochs']} epochs, dropout "
                  f"{d['dropout']} after each hidden nonlinearity; mean ± sd over seeds; "
                  "accuracies and losses with the running statistics:", "",
                  "| run | train accuracy | test accuracy | train - test | train loss | "
                  "test loss |", "|---|---:|---:|---:|---:|---:|"]
        for name, v in d["variants"].items():
            lines.append(f"| {name} | {_mean_sd(v['final_train_accuracy'])} | "
                         f"{_mean_sd(v['final_test_accuracy'])} | {_mean_sd(v['gap'])} | "
                         f"{_mean_sd(v['final_train_loss_eval'])} | "
                         f"{_mean_sd(v['final_test_loss'])} |")
    if "shift" in sweeps:
        lines += ["", "## Sweep 'shift'", "",
                  "Test accuracy of the base models on shifted test sets. 'AdaBN': BN's "
                  "statistics re-estimated (`jaxbn.reset_stats`, training-mode passes, "
                  "`jaxbn.finish_stats`) on the shifted training images, without labels; "
                  "'test batches': the shifted test set normalized in training-size batches "
                  "with their own statistics:", "",
                  "| test set | none | batch, running | batch, AdaBN | batch, test batches |",
                  "|---|---:|---:|---:|---:|"]
        for label, r in sweeps["shift"].items():
            lines.append(f"| {label} | {r['none']:.4f} | {r['batch_running']:.4f} | "
                         f"{r['batch_adapted']:.4f} | {r['batch_test_batches']:.4f} |")
    if "cnn" in sweeps:
        c = sweeps["cnn"]
        cfg = c["batch"]["config"]
        lines += ["", "## Sweep 'cnn'", "",
                  f"conv3x3 x{CNN_CHANNELS[0]}, conv3x3 stride 2 x{CNN_CHANNELS[1]}, global mean "
                  f"pool, dense; BN after each convolution in 'batch'; ReLU, He-normal "
                  f"initialization, SGD lr {cfg['lr']}, batch {cfg['batch_size']}"
                  + (f", first {cfg['train_subset']} training examples" if cfg["train_subset"]
                     else "") + ":", "",
                  "| epoch | none | batch |", "|---:|---:|---:|"]
        lines += [f"| {i + 1} | {a:.4f} | {b:.4f} |" for i, (a, b) in enumerate(
            zip(c["none"]["test_accuracy"], c["batch"]["test_accuracy"], strict=True))]
        lines += ["", "| | none | batch |", "|---|---:|---:|",
                  f"| one training step (median) | {c['costs']['none']['step_time_s'] * 1e3:.2f} "
                  f"ms | {c['costs']['batch']['step_time_s'] * 1e3:.2f} ms |",
                  f"| median epoch time | {np.median(c['none']['epoch_time_s']):.2f} s | "
                  f"{np.median(c['batch']['epoch_time_s']):.2f} s |",
                  f"| final train accuracy | {c['none']['final_train_accuracy']:.4f} | "
                  f"{c['batch']['final_train_accuracy']:.4f} |"]
    return lines


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    out = Path(args.out)
    if args.report_only:
        write_outputs(out, json.loads((out / "none_vs_batch.json").read_text()), args.target)
        print(f"rewrote the plots and report in {out}")
        return 0
    data = datasets.load(args.dataset, args.data_dir)
    is_digits = args.dataset == "digits"
    base = Config(epochs=30 if is_digits else 10)
    if args.paper:
        steps_per_epoch = len(data[0]) // 60
        base = replace(base, depth=3, width=100, activation="sigmoid", batch_size=60,
                       epochs=max(1, round(args.steps / steps_per_epoch)))
    overrides = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                 "depth": args.depth, "width": args.width, "activation": args.activation,
                 "init_std": args.init_std}
    base = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    names = ([*SWEEPS, *CLAIM_SWEEPS] if args.sweep == "all"
             else [s for s in args.sweep.split(",") if s])
    unknown = [s for s in names if s not in SWEEPS and s not in CLAIM_SWEEPS]
    if unknown:
        raise SystemExit(f"unknown sweep(s) {unknown}; choose from {[*SWEEPS, *CLAIM_SWEEPS]}")
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress

    results = {norm: train(replace(base, norm=norm), data, progress=progress, keep_model=True)
               for norm in ("none", "batch")}
    models = {norm: h.pop("model") for norm, h in results.items()}
    print(f"{'epoch':>5} {'none':>8} {'batch':>8}")
    for i in range(base.epochs):
        print(f"{i + 1:>5} {results['none']['test_accuracy'][i]:>8.4f} "
              f"{results['batch']['test_accuracy'][i]:>8.4f}")
    costs = step_costs(base, data)
    trainer = Trainer(data, progress, {replace(base, norm=n): h for n, h in results.items()})
    t0 = time.perf_counter()
    sweep_base = replace(base, epochs=args.sweep_epochs or base.epochs)
    sweeps = run_sweeps([s for s in names if s in SWEEPS], sweep_base, trainer)
    timings = {"one-field sweeps": time.perf_counter() - t0}
    for name in (s for s in names if s in CLAIM_SWEEPS):
        t0 = time.perf_counter()
        if name == "gradients":
            sweeps[name] = sweep_gradients(sweep_base, trainer)
        elif name == "dropout":
            subset = args.subset or (300 if is_digits else 2000)
            sweeps[name] = sweep_dropout(base, trainer, subset, args.dropout_steps, args.seeds,
                                         args.dropout)
        elif name == "shift":
            sweeps[name] = sweep_shift(models, base, data)
        else:
            sweeps[name] = sweep_cnn(base, trainer, data,
                                     args.cnn_epochs or (30 if is_digits else 3),
                                     args.cnn_subset if args.cnn_subset is not None
                                     else (0 if is_digits else 10_000))
        timings[name] = time.perf_counter() - t0
    n_tr, n_te = len(data[0]), len(data[2])
    dataset = (f"{'scikit-learn digits (8x8)' if is_digits else 'MNIST (28x28)'}, "
               f"{n_tr} training and {n_te} test images")
    summary_json = {**results, "costs": costs, "sweeps": sweeps, "dataset": args.dataset,
                    "dataset_description": dataset, "command": sys.argv if argv is None else argv,
                    "claim_sweep_time_s": timings, "sweep_epochs": args.sweep_epochs,
                    "total_time_s": time.perf_counter() - t_start}
    (out / "none_vs_batch.json").write_text(json.dumps(summary_json, indent=1))
    write_outputs(out, summary_json, args.target)
    print(f"wrote {out} in {time.perf_counter() - t_start:.0f} s")
    return 0


def write_outputs(out: Path, summary_json: dict, target: float) -> None:
    """The plots and ``report.md`` from the JSON record of a run."""
    results = {n: summary_json[n] for n in ("none", "batch")}
    sweeps, name = summary_json["sweeps"], summary_json["dataset"]
    plot(results, out / "none_vs_batch.png", f"{name}: none vs batch")
    cfg = results["batch"]["config"]
    panels = {f"base: {cfg['depth']}-layer {cfg['activation']}, N(0, {cfg['init_std']}) "
              "weights": results}
    panels.update({k: {n: v[n] for n in ("none", "batch")}
                   for k, v in sweeps.get("gradients", {}).items()})
    plot_grad_norms(panels, out / "grad_norms.png")
    if "cnn" in sweeps:
        plot_cnn({n: sweeps["cnn"][n] for n in ("none", "batch")}, out / "cnn.png",
                 f"{name}: small CNN, none vs batch")
    write_report(out / "report.md", results, sweeps, summary_json["costs"], target,
                 summary_json["dataset_description"], summary_json.get("sweep_epochs"))


if __name__ == "__main__":
    sys.exit(main())
