"""Data for the examples: scikit-learn's bundled digits (no network) and MNIST idx files.

``load_mnist(DIR)`` reads the four canonical files (``train-images-idx3-ubyte.gz``, ...) from
a directory the user names; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Reads one idx file (gzip-compressed or not) into a NumPy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    dtype, ndim = data[2], data[3]
    if dtype not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown idx element type 0x{dtype:02x}")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=_IDX_DTYPES[dtype], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {arr.size} elements")
    return arr.reshape(shape)


def load_mnist(data_dir: str | Path):
    """``(x_train, y_train, x_test, y_test)``: images flattened to 784 floats in [0, 1]."""
    data_dir = Path(data_dir)
    missing = [name for name in MNIST_FILES.values() if not (data_dir / name).exists()]
    if missing:
        raise FileNotFoundError(f"MNIST file(s) missing from {data_dir}: {', '.join(missing)}")
    arrays = {k: read_idx(data_dir / v) for k, v in MNIST_FILES.items()}

    def images(a):
        return a.reshape(a.shape[0], -1).astype(np.float32) / 255.0

    return (images(arrays["train_images"]), arrays["train_labels"].astype(np.int32),
            images(arrays["test_images"]), arrays["test_labels"].astype(np.int32))


def load_digits(test_size: int = 397, seed: int = 0):
    """scikit-learn's 1797 8x8 digits, scaled to [0, 1], split into train and test."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], y[perm]
    return x[test_size:], y[test_size:], x[:test_size], y[:test_size]


def load(name: str, data_dir: str | None = None):
    if name == "digits":
        return load_digits()
    if name == "mnist":
        if data_dir is None:
            raise ValueError("--dataset mnist needs --data-dir DIR with the MNIST idx files")
        return load_mnist(data_dir)
    raise ValueError(f"unknown dataset {name!r} (choose digits or mnist)")
