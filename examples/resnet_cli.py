"""The command line shared by ``flax_resnet.py`` and ``flax_resnet_nnx.py``.

It imports nothing from JAX, so the scripts parse their arguments (and answer ``--help``)
before JAX loads.
"""

from __future__ import annotations

import argparse


def parse_args(argv: list[str] | None, description: str,
               default_out: str) -> argparse.Namespace:
    """Parses the options of the ResNet examples."""
    p = argparse.ArgumentParser(description=description.replace("``", ""),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bn", choices=("jaxbn", "flax"), default="jaxbn",
                   help="which BatchNorm class the model uses: jaxbn's or Flax's own")
    p.add_argument("--dataset", choices=("digits", "mnist"), default="digits",
                   help="scikit-learn's bundled 8x8 digits, or MNIST read from --data-dir")
    p.add_argument("--data-dir", default=None,
                   help="folder holding the four MNIST idx files (for --dataset mnist)")
    p.add_argument("--epochs", type=int, default=5, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=64,
                   help="global batch size, split evenly over the devices")
    p.add_argument("--lr", type=float, default=0.05,
                   help="initial SGD learning rate (momentum 0.9, cosine decay to 0)")
    p.add_argument("--width", type=int, default=16, help="channels of every convolution")
    p.add_argument("--blocks", type=int, default=2, help="residual blocks after the stem")
    p.add_argument("--devices", type=int, default=8,
                   help="number of (fake CPU) devices the batch is split over")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialization and shuffle")
    p.add_argument("--max-steps", type=int, default=0,
                   help="stop after this many training steps (0: no limit; for smoke tests)")
    p.add_argument("--out", default=default_out,
                   help="folder for results.json and checkpoint/ (created if needed)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)
