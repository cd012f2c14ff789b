"""An ensemble of BN networks trained at once: ``vmap`` over parameters and BatchNorm state.

Each member has its own initialization, parameters and running statistics; one jitted step
trains them all. Prints each member's test accuracy and the ensemble's (averaged logits).

  python examples/vmap_ensemble.py --members 8 --epochs 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The command line; built without importing JAX so that ``--help`` is instant."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0].replace("``", ""),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--members", type=int, default=8, help="networks trained at once")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    return p


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad arguments end here, before JAX loads

from dataclasses import replace  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: E402
from none_vs_batch import Config, forward, init_model, make_fns  # noqa: E402


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    x_tr, y_tr, x_te, y_te = datasets.load_digits()
    cfg = replace(Config(), norm="batch", epochs=args.epochs)
    keys = jax.random.split(jax.random.key(0), args.members)
    params, states = jax.vmap(lambda k: init_model(k, cfg, x_tr.shape[1], 10))(keys)
    fns = make_fns(cfg)  # the same step as none_vs_batch's training
    opt = jax.vmap(fns.tx.init)(params)
    step = jax.jit(jax.vmap(fns.step, in_axes=((0, 0, 0), (None, None, None))))
    logits_fn = jax.jit(jax.vmap(lambda p, s: forward(p, s, x_te, False, cfg)[0]))
    rng = np.random.default_rng(0)
    n = len(x_tr) // cfg.batch_size
    for epoch in range(args.epochs):
        perm = rng.permutation(len(x_tr))
        for i in range(n):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            (params, states, opt), _ = step((params, states, opt), (x_tr[idx], y_tr[idx], None))
        logits = logits_fn(params, states)
        member_acc = jnp.mean(jnp.argmax(logits, -1) == y_te, axis=1)
        ens_acc = jnp.mean(jnp.argmax(logits.mean(0), -1) == y_te)
        print(f"epoch {epoch + 1}: members {[f'{a:.3f}' for a in np.asarray(member_acc)]} "
              f"ensemble {float(ens_acc):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
