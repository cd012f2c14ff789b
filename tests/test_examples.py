"""Smoke tests of the examples with tiny settings, and the idx loader on files made here."""

import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import datasets  # noqa: E402


def _write_idx(path, arr, gz=True):
    codes = {np.dtype(np.uint8): 0x08}
    header = struct.pack(">BBBB", 0, 0, codes[arr.dtype], arr.ndim)
    header += struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


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


def test_none_vs_batch_smoke(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "none_vs_batch.py"), "--epochs", "2",
           "--out", str(tmp_path), "--no-progress", "--sweep", "batch_size"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "none_vs_batch.json").read_text())
    for norm in ("none", "batch"):
        assert len(out[norm]["test_accuracy"]) == 2
        assert all(0.0 <= a <= 1.0 for a in out[norm]["test_accuracy"])
    assert "batchnorm_0" in proc.stdout  # the model summary lists the BN layers
    assert (tmp_path / "none_vs_batch.png").stat().st_size > 0
    assert "claims" in (tmp_path / "report.md").read_text()


def test_vmap_ensemble_smoke():
    cmd = [sys.executable, str(ROOT / "examples" / "vmap_ensemble.py"), "--members", "2",
           "--epochs", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ensemble" in proc.stdout


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


def test_sync_bn_cnn_smoke():
    cmd = [sys.executable, str(ROOT / "examples" / "sync_bn_cnn.py"), "--epochs", "1",
           "--max-steps", "2", "--variants", "single,shard_map"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shard_map: loss" in proc.stdout and "8 devices" in proc.stdout
    # traced: per BN layer 1 all-gather + 1 backward all-reduce (2 layers), the loss's pmean,
    # and one gradient all-reduce per non-BN parameter (conv1, conv2, dense w, b): BN's own
    # parameter gradients reuse the backward's all-reduce
    assert "shard_map: 9 /" in proc.stdout
