"""Calls of jaxbn's public API that a type checker must reject.

Each line that must be rejected carries ``# type: ignore[CODE]``; mypy (``--strict``, or
``warn_unused_ignores``) reports an unused ignore wherever the error it names did not occur,
so the check fails when a mistake below stops being caught. Not meant to run.
"""

from __future__ import annotations

import jax.numpy as jnp

import jaxbn


def swapped() -> None:
    params, state = jaxbn.bn_init(4)
    x = jnp.ones((8, 4))
    jaxbn.bn_apply(state, params, x, True)  # type: ignore[arg-type]
    jaxbn.bn_apply(params, x, state, True)  # type: ignore[arg-type]
    jaxbn.sync_state(params, "i")  # type: ignore[arg-type]
    jaxbn.fold_dense(jnp.ones((3, 4)), None, state, params)  # type: ignore[arg-type]
    y, state = jaxbn.bn_apply(params, state, x, True)
    state = y  # type: ignore[assignment]
    params["mean"] = x  # type: ignore[typeddict-unknown-key]
    jaxbn.bn_apply(params, state, x, True, axis="channels")  # type: ignore[arg-type]
