"""The same MLP without normalization (``none``) and with BatchNorm (``batch``), compared.

Reproduces the setting of Ioffe & Szegedy (2015), Sec. 4.1: fully connected sigmoid layers
with small Gaussian initial weights, batches of 60, SGD; BN added to each hidden layer. The
default runs on scikit-learn's bundled digits in about 10 seconds on 2 CPU cores; ``--dataset
mnist --data-dir DIR`` reads the canonical MNIST idx files and ``--paper`` selects the paper's
3x100 sigmoid network and 50,000 steps.

Writes to ``--out``: ``none_vs_batch.json`` (per option and epoch: test accuracy, train loss,
time; the 15/50/85th percentiles of one sigmoid's input; the cost of a step; with ``--sweep``
the sweeps), ``none_vs_batch.png`` and ``report.md``, which states which claims about BN held.

  python examples/none_vs_batch.py
  python examples/none_vs_batch.py --dataset mnist --data-dir ../shared/data/mnist --paper
  python examples/none_vs_batch.py --sweep all --epochs 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: E402

import jaxbn  # noqa: E402

ACTIVATIONS = {"sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh, "relu": jax.nn.relu}


@dataclass(frozen=True)
class Config:
    norm: str = "batch"  # "none" or "batch"
    depth: int = 3
    width: int = 100
    activation: str = "sigmoid"
    init_std: float = 0.1  # "small random Gaussian values"
    lr: float = 0.5
    batch_size: int = 60
    epochs: int = 30
    seed: int = 0


def init_model(key, cfg: Config, n_in: int, n_out: int):
    """Dense layers (+ a jaxbn BatchNorm after each hidden one when norm == 'batch')."""
    sizes = [n_in] + [cfg.width] * cfg.depth + [n_out]
    params, states = [], []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        key, sub = jax.random.split(key)
        layer = {"w": jax.random.normal(sub, (a, b)) * cfg.init_std}
        hidden = i < len(sizes) - 2
        if cfg.norm == "batch" and hidden:
            layer["bn"], bn_state = jaxbn.bn_init(b)  # BN's bias replaces the dense bias
            states.append(bn_state)
        else:
            layer["b"] = jnp.zeros(b)
        params.append(layer)
    return params, states


def forward(params, states, x, train: bool, cfg: Config):
    """Returns ``(logits, new_states, input of the last hidden layer's nonlinearity)``."""
    act = ACTIVATIONS[cfg.activation]
    new_states, it = [], iter(states)
    pre = None
    for layer in params[:-1]:
        pre = x @ layer["w"]
        if "bn" in layer:
            pre, s = jaxbn.bn_apply(layer["bn"], next(it), pre, train, momentum=0.9)
            new_states.append(s)
        else:
            pre = pre + layer["b"]
        x = act(pre)
    out = params[-1]
    return x @ out["w"] + out["b"], new_states, pre


def summary(params, states, cfg: Config) -> str:
    lines = [f"model '{cfg.norm}': {cfg.depth} x {cfg.width} {cfg.activation}"]
    for i, layer in enumerate(params):
        n_in, n_out = layer["w"].shape
        lines.append(f"  dense_{i}: {n_in} -> {n_out}" + ("" if "b" not in layer else " + bias"))
        if "bn" in layer:
            lines.append(f"  batchnorm_{i}: {n_out} features (scale, bias; mean, var)")
        if i < len(params) - 1:
            lines.append(f"  {cfg.activation}")
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    n_state = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(states))
    lines.append(f"  parameters: {n_params:,}   state (running statistics): {n_state:,}")
    return "\n".join(lines)


def make_fns(cfg: Config):
    tx = optax.sgd(cfg.lr)

    def loss_fn(params, states, x, y):
        logits, new_states, _ = forward(params, states, x, True, cfg)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, new_states

    def step(carry, batch):
        params, states, opt = carry
        (loss, states), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, states, *batch)
        updates, opt = tx.update(grads, opt)
        return (optax.apply_updates(params, updates), states, opt), loss

    @jax.jit
    def run_epoch(params, states, opt, xb, yb):
        (params, states, opt), losses = jax.lax.scan(step, (params, states, opt), (xb, yb))
        return params, states, opt, losses.mean()

    @jax.jit
    def evaluate(params, states, x, y):
        logits, _, pre = forward(params, states, x, False, cfg)
        acc = jnp.mean(jnp.argmax(logits, -1) == y)
        pct = jnp.percentile(pre[:, 0], jnp.array([15.0, 50.0, 85.0]))
        return acc, pct

    @jax.jit
    def evaluate_train_mode(params, states, x, y):
        """Accuracy when BN normalizes with batch statistics instead of the running ones:
        ``(whole test set as one batch, test set in training-size batches)``."""

        def accuracy(xb, yb):
            logits, _, _ = forward(params, states, xb, True, cfg)
            return jnp.mean(jnp.argmax(logits, -1) == yb)

        n = (len(x) // cfg.batch_size) * cfg.batch_size
        chunks = (x[:n].reshape(-1, cfg.batch_size, x.shape[-1]), y[:n].reshape(-1, cfg.batch_size))
        return accuracy(x, y), jax.vmap(accuracy)(*chunks).mean()

    return tx, run_epoch, evaluate, evaluate_train_mode, step


def train(cfg: Config, data, *, progress: bool = True, verbose: bool = True) -> dict:
    """Trains one configuration; returns per-epoch metrics."""
    x_tr, y_tr, x_te, y_te = data
    params, states = init_model(jax.random.key(cfg.seed), cfg, x_tr.shape[1], 10)
    if verbose:
        print(summary(params, states, cfg))
    tx, run_epoch, evaluate, evaluate_train_mode, _ = make_fns(cfg)
    opt = tx.init(params)
    rng = np.random.default_rng(cfg.seed)
    steps = len(x_tr) // cfg.batch_size
    hist = {"test_accuracy": [], "train_loss": [], "epoch_time_s": [], "steps": [],
            "sigmoid_input_percentiles": []}
    epochs = range(cfg.epochs)
    if progress:
        from tqdm import tqdm
        epochs = tqdm(epochs, desc=cfg.norm, leave=False, file=sys.stdout)
    for epoch in epochs:
        perm = rng.permutation(len(x_tr))[: steps * cfg.batch_size]
        xb = x_tr[perm].reshape(steps, cfg.batch_size, -1)
        yb = y_tr[perm].reshape(steps, cfg.batch_size)
        t0 = time.perf_counter()
        params, states, opt, loss = run_epoch(params, states, opt, xb, yb)
        loss = float(loss)
        dt = time.perf_counter() - t0
        acc, pct = evaluate(params, states, x_te, y_te)
        hist["test_accuracy"].append(float(acc))
        hist["train_loss"].append(loss)
        hist["epoch_time_s"].append(dt)
        hist["steps"].append((epoch + 1) * steps)
        hist["sigmoid_input_percentiles"].append([float(p) for p in pct])
        if progress:
            epochs.set_postfix(loss=f"{loss:.3f}", acc=f"{float(acc):.3f}")
    if cfg.norm == "batch":
        whole, chunked = evaluate_train_mode(params, states, x_te, y_te)
        hist["test_accuracy_batch_stats"] = float(whole)
        hist["test_accuracy_minibatch_stats"] = float(chunked)
    hist["final_test_accuracy"] = hist["test_accuracy"][-1]
    hist["config"] = asdict(cfg)
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
    batch = (jnp.asarray(x_tr[: base.batch_size]), jnp.asarray(y_tr[: base.batch_size]))
    runs = {}
    for norm in ("none", "batch"):
        cfg = replace(base, norm=norm)
        params, states = init_model(jax.random.key(0), cfg, x_tr.shape[1], 10)
        tx, _, _, _, step = make_fns(cfg)
        carry = (params, states, tx.init(params))
        compiled = jax.jit(step).lower(carry, batch).compile()
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


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, hist in results.items():
        axes[0].plot(hist["steps"], hist["test_accuracy"], label=name)
        pct = np.asarray(hist["sigmoid_input_percentiles"])
        for j, style in enumerate((":", "-", ":")):
            axes[1].plot(hist["steps"], pct[:, j], style, color="C0" if name == "none" else "C1",
                         label=f"{name}" if j == 1 else None)
    axes[0].set(xlabel="training steps", ylabel="test accuracy", title=title)
    axes[1].set(xlabel="training steps", ylabel="input to one sigmoid",
                title="15th, 50th, 85th percentiles")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SWEEPS = {
    "lr": ("lr", [0.5, 2.0, 8.0, 32.0]),
    "depth": ("depth", [3, 10, 20]),
    "init": ("init_std", [0.01, 0.1, 1.0, 3.0]),
    "activation": ("activation", ["sigmoid", "tanh", "relu"]),
    "batch_size": ("batch_size", [2, 8, 60]),
}


def run_sweeps(names, base: Config, data, progress: bool, done: dict | None = None) -> dict:
    """Trains none and batch for every value of each named sweep. ``done`` maps configs
    already trained (e.g. the base run) to their histories, so they are not trained again."""
    done = dict(done or {})
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
                if cfg not in done:
                    done[cfg] = train(cfg, data, progress=progress, verbose=False)
                h = done[cfg]
                acc = h["final_test_accuracy"]
                row[norm] = acc if np.isfinite(h["train_loss"][-1]) else float("nan")
                if norm == "batch":
                    row["batch_eval_with_minibatch_stats"] = h["test_accuracy_minibatch_stats"]
            rows.append(row)
            print(f"  sweep {name}: {row}")
        out[name] = rows
    return out


def _range(values) -> float:
    return float(np.ptp(np.asarray(values, dtype=float)))


def write_report(path: Path, results: dict, sweeps: dict, costs: dict, target: float) -> None:
    none, batch = results["none"], results["batch"]
    lines = ["# none vs batch: which claims about BatchNorm held", "",
             f"Setting: {json.dumps(batch['config'])}", "",
             "Test accuracy during training (Fig. 1(a) of the paper):", "",
             "| steps | none | batch |", "|---:|---:|---:|"]
    n = len(none["test_accuracy"])
    for i in sorted({0, 1, 2, n // 5, n // 2, n - 1} & set(range(n))):
        lines.append(f"| {batch['steps'][i]} | {none['test_accuracy'][i]:.4f} | "
                     f"{batch['test_accuracy'][i]:.4f} |")
    lines.append("")

    def claim(text, held, evidence):
        lines.append(f"- **{text}**: {'held' if held else 'did not hold'}. {evidence}")

    early = min(3, n) - 1
    ahead = sum(b > o for b, o in zip(batch["test_accuracy"], none["test_accuracy"], strict=True))
    claim("Higher accuracy early in training",
          batch["test_accuracy"][early] > none["test_accuracy"][early],
          f"after epoch {early + 1}: batch {batch['test_accuracy'][early]:.3f} vs none "
          f"{none['test_accuracy'][early]:.3f}; final: batch {batch['final_test_accuracy']:.3f} "
          f"vs none {none['final_test_accuracy']:.3f}; batch ahead after {ahead} of {n} epochs.")
    targets = sorted({target, 0.95, 0.97})
    reach = {t: (epochs_to_reach(batch, t), epochs_to_reach(none, t)) for t in targets}
    never = float("inf")
    claim("Fewer epochs to reach a test accuracy (speed of convergence)",
          all((b or never) <= (o or never) for b, o in reach.values())
          and any((b or never) < (o or never) for b, o in reach.values()),
          "epochs needed (batch, none; None = not within the run): "
          + ", ".join(f"{t:.0%}: {b}, {o}" for t, (b, o) in reach.items()) + ".")
    pct = {k: np.asarray(h["sigmoid_input_percentiles"]) for k, h in results.items()}
    drift = {k: (_range(p[:, 1]), _range(p[:, 2] - p[:, 0])) for k, p in pct.items()}
    claim("Steadier distribution of a sigmoid's input (Fig. 1(b, c))",
          drift["batch"][0] < drift["none"][0],
          "range over training of the median: batch "
          f"{drift['batch'][0]:.2f}, none {drift['none'][0]:.2f}; of the 15-85th percentile "
          f"spread: batch {drift['batch'][1]:.2f}, none {drift['none'][1]:.2f} (the learned "
          "scale lets BN's spread grow on purpose).")
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
        claim("Depends on batch size (degrades with tiny batches)",
              rows[0]["batch"] < rows[-1]["batch"] - 0.02 or rows[0]["batch"] < rows[0]["none"],
              f"batch {rows[0]['batch_size']}: {rows[0]['batch']:.3f} (none "
              f"{rows[0]['none']:.3f}); batch {rows[-1]['batch_size']}: {rows[-1]['batch']:.3f} "
              f"(none {rows[-1]['none']:.3f}); same examples seen, lr scaled with the batch "
              f"(table 'batch_size').")
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
    for name, rows in sweeps.items():
        field = SWEEPS[name][0]
        lines += ["", f"Sweep '{name}' (final test accuracy; the last column normalizes the "
                  "test set in training-size batches with their own statistics):", "",
                  f"| {field} | none | batch | batch, batch statistics |", "|---|---:|---:|---:|"]
        lines += [f"| {r[field]} | {r['none']:.4f} | {r['batch']:.4f} | "
                  f"{r['batch_eval_with_minibatch_stats']:.4f} |" for r in rows]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=["digits", "mnist"], default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--activation", choices=sorted(ACTIVATIONS), default=None)
    p.add_argument("--init-std", type=float, default=None)
    p.add_argument("--paper", action="store_true", help="3x100 sigmoid, batch 60, 50k steps")
    p.add_argument("--steps", type=int, default=50_000, help="with --paper: training steps")
    p.add_argument("--sweep", default="", help="comma list of " + ",".join(SWEEPS) + " or all")
    p.add_argument("--target", type=float, default=0.9, help="accuracy for 'epochs to reach'")
    p.add_argument("--out", default="out")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    data = datasets.load(args.dataset, args.data_dir)
    base = Config(epochs=30 if args.dataset == "digits" else 10)
    if args.paper:
        steps_per_epoch = len(data[0]) // 60
        base = replace(base, depth=3, width=100, activation="sigmoid", batch_size=60,
                       epochs=max(1, round(args.steps / steps_per_epoch)))
    overrides = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                 "depth": args.depth, "activation": args.activation, "init_std": args.init_std}
    base = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress

    results = {norm: train(replace(base, norm=norm), data, progress=progress)
               for norm in ("none", "batch")}
    print(f"{'epoch':>5} {'none':>8} {'batch':>8}")
    for i in range(base.epochs):
        print(f"{i + 1:>5} {results['none']['test_accuracy'][i]:>8.4f} "
              f"{results['batch']['test_accuracy'][i]:>8.4f}")
    costs = step_costs(base, data)
    names = list(SWEEPS) if args.sweep == "all" else [s for s in args.sweep.split(",") if s]
    done = {replace(base, norm=norm): hist for norm, hist in results.items()}
    sweeps = run_sweeps(names, base, data, progress, done) if names else {}
    summary_json = {**results, "costs": costs, "sweeps": sweeps, "dataset": args.dataset}
    (out / "none_vs_batch.json").write_text(json.dumps(summary_json, indent=1))
    plot(results, out / "none_vs_batch.png", f"{args.dataset}: none vs batch")
    write_report(out / "report.md", results, sweeps, costs, args.target)
    print(f"wrote {out / 'none_vs_batch.json'}, {out / 'none_vs_batch.png'}, {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
