"""Shared benchmark machinery: device setup, interleaved timing, ratio spreads, noise flags,
and the memory-bandwidth floor of the platform.

Import order matters: :func:`configure` edits ``XLA_FLAGS`` and must run before JAX starts,
so this module imports JAX only inside the functions that need it.

Example:
  >>> import numpy as np
  >>> s = summarize(np.array([1.0, 1.1, 0.9, 1.0]), np.array([1.0, 1.0, 1.0, 1.0]))
  >>> round(s["median"], 2), s["p10"] <= s["median"] <= s["p90"]
  (1.0, True)
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

# Peak memory bandwidth (bytes/s) of known accelerators, matched by substring of
# ``device.device_kind`` (first match wins, so the more specific names come first).
PEAK_BANDWIDTH = (
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),  # SXM (HBM3)
    ("GH200", 4.0e12),
    ("B200", 8.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),  # 40 GB
    ("L40S", 0.864e12),
    ("L4", 0.3e12),
    ("A10G", 0.6e12),
    ("V100", 0.9e12),
    ("T4", 0.32e12),
    ("TPU v4", 1.2e12),
    ("TPU v5 lite", 0.819e12),
    ("TPU v5", 2.765e12),
)


def configure(fake_devices: int) -> None:
    """Splits a CPU host into ``fake_devices`` devices (before JAX starts; no effect on GPUs)."""
    if "jax" in sys.modules:
        raise RuntimeError("configure() must run before JAX is imported")
    if fake_devices > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={fake_devices}"
                                   ).strip()


def environment() -> dict[str, Any]:
    """Platform, device kind, versions and the allocator setting a figure was taken under."""
    import jax

    dev = jax.devices()[0]
    return {"platform": dev.platform, "device_kind": dev.device_kind,
            "device_count": jax.device_count(), "jax": jax.__version__,
            "cpu_count": os.cpu_count(),
            "mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "unset")}


def peak_bandwidth(mib: int = 256, reps: int = 10) -> dict[str, Any]:
    """The device's peak memory bandwidth in bytes/s: the datasheet figure for a known
    accelerator, else (CPU, unknown device) a measured streaming copy ``y = 2 * x``
    (bytes read + written over the best time of ``reps``)."""
    import jax
    import jax.numpy as jnp

    kind = jax.devices()[0].device_kind
    for key, bw in PEAK_BANDWIDTH:
        if key.lower() in kind.lower():
            return {"bytes_per_s": bw, "source": f"datasheet ({key})"}
    x = jnp.ones((mib * 2**18,), jnp.float32)
    f = jax.jit(lambda x: x * 2.0)
    jax.block_until_ready(f(x))
    best = min(_time_call(f, x) for _ in range(reps))
    return {"bytes_per_s": 2 * x.nbytes / best,
            "source": f"measured: streaming copy y = 2x of {mib} MiB, best of {reps}"}


def _time_call(fn: Callable, *args) -> float:
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def interleaved(calls: dict[str, Callable[[], Any]], rounds: int,
                inner: int = 1) -> dict[str, np.ndarray]:
    """Times every call once per round, in an order rotated each round (no variant always runs
    first or after the same neighbour). Each round's figure for a call is the best of ``inner``
    back-to-back runs. Returns per-round seconds, aligned across calls (round ``i`` of every
    call ran within the same stretch of time, so ratios are taken per round)."""
    names = list(calls)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            out[n].append(min(_time_call(calls[n]) for _ in range(inner)))
    return {n: np.asarray(t) for n, t in out.items()}


def summarize(t: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Median and 10-90% range of the per-round ratio ``t / ref``."""
    r = np.asarray(t) / np.asarray(ref)
    lo, med, hi = np.percentile(r, [10, 50, 90])
    return {"median": float(med), "p10": float(lo), "p90": float(hi)}


def relative_spread(t: np.ndarray) -> float:
    """(p90 - p10) / median of a set of times: how much one call's own time moved."""
    lo, med, hi = np.percentile(np.asarray(t), [10, 50, 90])
    return float((hi - lo) / med)


def fmt(s: dict[str, float], digits: int = 2) -> str:
    """``median [p10-p90]``."""
    return f"{s['median']:.{digits}f} [{s['p10']:.{digits}f}-{s['p90']:.{digits}f}]"


def noise_verdict(spreads: dict[str, float], threshold: float) -> str | None:
    """A warning naming the reference timings whose own spread exceeds ``threshold``."""
    bad = {k: v for k, v in spreads.items() if v > threshold}
    if not bad:
        return None
    what = ", ".join(f"{k} {v:.0%}" for k, v in bad.items())
    return (f"NOISY RUN: the reference's own 10-90% spread exceeds {threshold:.0%} ({what}); "
            "the machine was busy, read the ratios' intervals, not their medians")
