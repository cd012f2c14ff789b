"""Smoke tests of the examples with tiny settings, and the idx loader on files made here."""

import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import reference as ref

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import datasets  # noqa: E402

U = ref.unit_roundoff(np.float32)


def _write_idx(path, arr, gz=True):
    codes = {np.dtype(np.uint8): 0x08}
    header = struct.pack(">BBBB", 0, 0, codes[arr.dtype], arr.ndim)
    header += struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)


def test_idx_roundtrip_and_mnist_loader(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 5, dtype=np.uint8)
    _write_idx(tmp_path / "raw-idx3-ubyte", imgs, gz=False)
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "raw-idx3-ubyte"), imgs)
    for key, name in datasets.MNIST_FILES.items():
        _write_idx(tmp_path / name, imgs if "images" in key else labels)
    x_tr, y_tr, x_te, y_te = datasets.load_mnist(tmp_path)
    assert x_tr.shape == (5, 784) and x_tr.dtype == np.float32
    # x / 255 in float32: correctly rounded (IEEE division), within 2**-24 relative < 1e-7
    np.testing.assert_allclose(x_tr[0], imgs[0].ravel() / 255.0)
    np.testing.assert_array_equal(y_te, labels)


def test_mnist_loader_names_the_missing_file(tmp_path):
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        datasets.load_mnist(tmp_path)


def test_bad_idx_file(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an idx file"):
        datasets.read_idx(tmp_path / "bad")


@pytest.mark.slow
def test_none_vs_batch_smoke(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "none_vs_batch.py"), "--epochs", "2",
           "--out", str(tmp_path), "--no-progress", "--sweep", "batch_size", "--sweep-epochs", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "none_vs_batch.json").read_text())
    for norm in ("none", "batch"):
        assert len(out[norm]["test_accuracy"]) == 2
        assert all(0.0 <= a <= 1.0 for a in out[norm]["test_accuracy"])
    assert "batchnorm_0" in proc.stdout  # the model summary lists the BN layers
    for norm in ("none", "batch"):  # at init and after each epoch; one norm per weight matrix
        assert np.asarray(out[norm]["layer_grad_norms"]).shape == (3, 4)
    assert (tmp_path / "none_vs_batch.png").stat().st_size > 0
    assert (tmp_path / "grad_norms.png").stat().st_size > 0
    report = (tmp_path / "report.md").read_text()
    assert "claims" in report and "Dataset: scikit-learn digits" in report
    assert '"norm"' not in report  # the setting line is the runs' common setting
    assert "| test accuracy | none | batch |" in report  # epochs needed, as a table
    assert "Overfitting with small batches" in report and "none train - test" in report


@pytest.mark.slow
def test_vmap_ensemble_smoke():
    cmd = [sys.executable, str(ROOT / "examples" / "vmap_ensemble.py"), "--members", "2",
           "--epochs", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ensemble" in proc.stdout


@pytest.mark.slow
def test_sync_bn_cnn_matches_single_device(devices):
    """One step of the example's synchronized runs equals the single-device full-batch step;
    the unsynchronized run does not, and its running statistics differ across devices."""
    import sync_bn_cnn

    x_tr, y_tr, x_te, y_te = datasets.load_digits()
    data = (x_tr[:64].reshape(-1, 8, 8, 1), y_tr[:64], x_te[:32].reshape(-1, 8, 8, 1), y_te[:32])
    runs = {v: sync_bn_cnn.train(v, data, epochs=1, batch_size=64, lr=0.1, seed=0,
                                 devices=devices, max_steps=1) for v in sync_bn_cnn.VARIANTS}
    ref = runs["single"]
    for v in ("shard_map", "jit", "pmap"):
        assert sync_bn_cnn.max_difference(runs[v]["params"], ref["params"]) < 1e-5
        assert sync_bn_cnn.max_difference(runs[v]["state"], ref["state"]) < 1e-5
        assert sync_bn_cnn.spread_across_devices(runs[v]["state"]) == 0.0
        assert runs[v]["state"]["bn1"]["mean"].shape[0] == 8  # one copy per device was compared
    assert sync_bn_cnn.max_difference(runs["unsync"]["params"], ref["params"]) > 1e-4
    assert sync_bn_cnn.spread_across_devices(runs["unsync"]["state"]) > 1e-3


@pytest.mark.slow
def test_sync_bn_cnn_smoke(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "sync_bn_cnn.py"), "--epochs", "1",
           "--max-steps", "2", "--variants", "single,shard_map", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shard_map: loss" in proc.stdout and "8 devices" in proc.stdout
    assert "2/2" in proc.stdout  # a progress bar per variant
    record = json.loads((tmp_path / "sync_bn_cnn.json").read_text())
    assert len(record["variants"]["shard_map"]["test_accuracy"]) == 1
    assert "shard_map: loss" in (tmp_path / "output.txt").read_text()
    # traced: per BN layer 1 all-gather + 1 backward all-reduce (2 layers), the loss's pmean,
    # and one gradient all-reduce per non-BN parameter (conv1, conv2, dense w, b): BN's own
    # parameter gradients reuse the backward's all-reduce
    assert "shard_map: 9 /" in proc.stdout


@pytest.mark.parametrize("script", ["none_vs_batch.py", "sync_bn_cnn.py", "vmap_ensemble.py",
                                    "multi_process.py", "flax_resnet.py", "flax_resnet_nnx.py"])
def test_help_does_not_import_jax(script):
    path = str(ROOT / "examples" / script)
    code = ("import runpy, sys\n"
            f"sys.path.insert(0, {str(ROOT / 'examples')!r})\n"
            f"sys.argv = [{path!r}, '--help']\n"
            "try:\n"
            f"    runpy.run_path({path!r}, run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "print('JAX LOADED' if 'jax' in sys.modules else 'NO JAX')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert "NO JAX" in proc.stdout and "(default:" in proc.stdout, proc.stdout + proc.stderr
    assert "``" not in proc.stdout, proc.stdout


def _tiny_digits(n_train=120, n_test=60):
    x_tr, y_tr, x_te, y_te = datasets.load_digits()
    return x_tr[:n_train], y_tr[:n_train], x_te[:n_test], y_te[:n_test]


@pytest.mark.slow
def test_layer_grad_norms_match_closed_form():
    """The output layer's weight-gradient norm of a 1-hidden-layer sigmoid net at
    initialization equals the float64 closed form ||h^T (softmax(z) - onehot(y))|| / n."""
    import jax
    import none_vs_batch as nvb

    data = _tiny_digits()
    cfg = nvb.Config(norm="none", depth=1, width=16, epochs=1, batch_size=20)
    hist = nvb.train(cfg, data, progress=False, verbose=False)
    params, _ = nvb.init_model(jax.random.key(cfg.seed), cfg, 64, 10)
    w0, b0, w1, b1 = (np.asarray(params[i][k], np.float64) for i in (0, 1) for k in ("w", "b"))
    norms, bounds = [], []
    for i in range(6):  # the 6 probe batches of 20 (the 120 training examples)
        x = np.asarray(data[0][i * 20:(i + 1) * 20], np.float64)
        y = data[1][i * 20:(i + 1) * 20]
        h = 1.0 / (1.0 + np.exp(-(x @ w0 + b0)))
        z = h @ w1 + b1
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(20), y] -= 1.0
        g = h.T @ p / 20
        norms.append(np.linalg.norm(g))
        # float32 error bound, layer by layer: the 64-term pre-activation and the sigmoid (a
        # few ulps), the 16-term logits, the softmax (a perturbation dz moves p_i by at most
        # p_i (dz_i + sum_j p_j dz_j); exp, a 10-term sum and a division), the 20-term sum of
        # h^T (p - onehot), then the norm (a 160-term sum of squares and a square root)
        e_h = h * (1 - h) * 65 * U * (np.abs(x) @ np.abs(w0) + np.abs(b0)) + 8 * U * h
        e_z = e_h @ np.abs(w1) + 17 * U * (h @ np.abs(w1) + np.abs(b1))
        prob = p + np.eye(10)[y]
        e_p = prob * (e_z + (prob * e_z).sum(1, keepdims=True) + 20 * U) + U * np.abs(p)
        e_g = (h.T @ e_p + e_h.T @ np.abs(p)) / 20 + 22 * U * (h.T @ np.abs(p)) / 20
        bounds.append(np.linalg.norm(e_g) + 82 * U * norms[-1])
    ref.assert_within(hist["layer_grad_norms"][0][-1], np.mean(norms),
                      np.mean(bounds) + 7 * U * np.mean(norms), "output layer's gradient norm")
    assert len(hist["layer_grad_norms"]) == 2 and len(hist["layer_grad_norms"][0]) == 2


@pytest.mark.slow
def test_adabn_reestimates_first_layer_statistics():
    """``adapt`` (reset_stats + training passes + finish_stats) sets the first BN layer's
    statistics to the float64 mean and population variance of x @ W over all the data."""
    import jax
    import none_vs_batch as nvb

    cfg = nvb.Config(norm="batch", depth=2, width=8)
    params, states = nvb.init_model(jax.random.key(0), cfg, 64, 10)
    x = _tiny_digits()[0] * 0.5 + 0.3
    adapted = nvb.make_fns(cfg).adapt(params, states, x.reshape(4, 30, 64))
    w = np.asarray(params[0]["w"], np.float64)
    pre = x.astype(np.float64) @ w
    # float32 x @ W: a 64-term sum per value; its error moves the mean by its average and the
    # variance by twice the average of |pre - mean| times it; then Chan's pooled update of the
    # 4 batches' statistics (tests.reference.accumulate_bound)
    e_pre = 65 * U * (np.abs(x.astype(np.float64)) @ np.abs(w))
    acc = (0.0, 0.0, 0.0, 0.0, 0.0)
    for batch in pre.reshape(4, 30, -1):
        acc = ref.accumulate_bound(acc, ref.stats_with_bounds(batch))
    mean_bound = acc[3] + e_pre.mean(0)
    var_bound = acc[4] + 2 * (np.abs(pre - pre.mean(0)) * e_pre).mean(0) + e_pre.mean(0) ** 2
    ref.assert_within(adapted[0]["mean"], pre.mean(0), mean_bound, "adapted mean")
    ref.assert_within(adapted[0]["var"], pre.var(0), var_bound, "adapted var")
    assert set(adapted[0]) == set(states[0])  # back to an ordinary state


@pytest.mark.slow
def test_dropout_only_in_training():
    import jax
    import jax.numpy as jnp
    import none_vs_batch as nvb

    cfg = nvb.Config(norm="none", depth=1, width=1000, dropout=0.5, activation="relu",
                     init_std=1.0)
    params, states = nvb.init_model(jax.random.key(0), cfg, 64, 10)
    x = jnp.asarray(_tiny_digits()[0][:4])
    eval_out = nvb.forward(params, states, x, False, cfg, jax.random.key(1))[0]
    plain = nvb.forward(params, states, x, False, nvb.Config(norm="none", depth=1,
                                                             width=1000, activation="relu"))[0]
    np.testing.assert_array_equal(eval_out, plain)
    # in training, the hidden units reaching the output are zeroed with probability 0.5
    params[1]["w"] = jnp.eye(1000, 10)
    x_tr = jnp.asarray(_tiny_digits()[0][:40])
    h = np.asarray(jax.nn.relu(x_tr @ params[0]["w"]))[:, :10]
    out = np.asarray(nvb.forward(params, states, x_tr, True, cfg, jax.random.key(1))[0])
    kept = out != 0
    # h and the example's own x @ W (64-term float32 sums, in whatever order each program
    # takes), then exact steps: / (1 - 0.5), a sum with 999 zeros, + 0
    e_h = 65 * U * (np.abs(np.asarray(x_tr, np.float64))
                    @ np.abs(np.asarray(params[0]["w"], np.float64)))[:, :10]
    ref.assert_within(out[kept], 2 * h[kept], 2 * 2 * e_h[kept], "kept units")
    assert 0.35 < kept[h > 0].mean() < 0.65


@pytest.mark.slow
def test_cnn_bn_state_per_channel():
    import jax
    import none_vs_batch as nvb

    cfg = nvb.Config(norm="batch", arch="cnn", activation="relu")
    params, states = nvb.init_model(jax.random.key(0), cfg, 64, 10)
    assert [s["mean"].shape for s in states] == [(16,), (32,)]
    x = _tiny_digits()[0][:5]
    logits, new, _ = nvb.forward(params, states, x, True, cfg)
    assert logits.shape == (5, 10)
    # first BN layer: mean over batch and space of a 3x3 SAME convolution, in float64
    img = np.pad(x.reshape(5, 8, 8).astype(np.float64), ((0, 0), (1, 1), (1, 1)))
    w = np.asarray(params[0]["w"], np.float64)[:, :, 0, :]
    conv = sum(img[:, i:i + 8, j:j + 8, None] * w[i, j] for i in range(3) for j in range(3))
    # the convolution's 9-term float32 sums, averaged, plus the mean's own bound and the EMA's
    e_conv = 10 * U * sum(np.abs(img[:, i:i + 8, j:j + 8, None]) * np.abs(w[i, j])
                          for i in range(3) for j in range(3))
    mo = ref.moments_bound(conv)
    mean = conv.mean((0, 1, 2))
    ref.assert_within(new[0]["mean"], 0.1 * mean, ref.ema_bound(
        0.0, mean, mo["e_mean_stored"].ravel() + e_conv.mean((0, 1, 2)), 0.9), "running mean")


@pytest.fixture(scope="module")
def claim_run(tmp_path_factory):
    """One tiny run of the four claim sweeps (shared by the tests below to compile once)."""
    import none_vs_batch as nvb

    out = tmp_path_factory.mktemp("claims")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nvb, "GRADIENT_SETTINGS", {
            "2-layer tanh": ({"depth": 2, "activation": "tanh", "init_std": 0.5}, "exploding")})
        mp.setattr(nvb.datasets, "load", lambda name, d=None: _tiny_digits(240, 60))
        nvb.main(["--epochs", "1", "--width", "8", "--depth", "2", "--no-progress",
                  "--sweep", "gradients,dropout,shift,cnn", "--cnn-epochs", "1", "--subset",
                  "120", "--dropout-steps", "2", "--seeds", "1", "--out", str(out)])
    report = (out / "report.md").read_text()
    verdicts = [line for line in report.splitlines() if line.startswith("- **")]
    return json.loads((out / "none_vs_batch.json").read_text())["sweeps"], verdicts, out


def _has_verdict(verdicts, words):
    line = next(v for v in verdicts if words in v)
    assert any(w in line for w in ("held", "did not hold", "inconclusive")), line


@pytest.mark.slow
def test_gradients_sweep_smoke(claim_run):
    sweeps, verdicts, out = claim_run
    assert np.asarray(sweeps["gradients"]["2-layer tanh"]["none"]["layer_grad_norms"]).shape \
        == (2, 3)
    _has_verdict(verdicts, "exploding gradients")
    _has_verdict(verdicts, "gradient flow")
    assert (out / "grad_norms.png").stat().st_size > 0


@pytest.mark.slow
def test_dropout_sweep_smoke(claim_run):
    sweeps, verdicts, _ = claim_run
    assert set(sweeps["dropout"]["variants"]) == {"none", "batch", "none + dropout",
                                                  "batch + dropout"}
    _has_verdict(verdicts, "Regularization")
    _has_verdict(verdicts, "need for dropout")


@pytest.mark.slow
def test_shift_sweep_smoke(claim_run):
    import none_vs_batch as nvb

    sweeps, verdicts, _ = claim_run
    assert set(sweeps["shift"]) == {"clean", *nvb.SHIFTS}
    _has_verdict(verdicts, "Non-stationary data: BN assumes")
    _has_verdict(verdicts, "AdaBN")


@pytest.mark.slow
def test_cnn_sweep_smoke(claim_run):
    sweeps, verdicts, out = claim_run
    assert len(sweeps["cnn"]["batch"]["test_accuracy"]) == 1
    assert sweeps["cnn"]["costs"]["batch"]["step_time_s"] > 0
    _has_verdict(verdicts, "CNN")
    assert (out / "cnn.png").stat().st_size > 0
