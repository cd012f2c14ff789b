"""Synchronized BatchNorm across processes with ``jax.distributed`` on one machine.

Launches ``--num-processes`` worker processes (2 CPU devices each by default) on 127.0.0.1.
They form one JAX cluster; a global batch is sharded over all devices with ``shard_map``
and ``jaxbn.bn_apply(..., axis_name="d")`` computes its statistics across processes. Process
0 writes the running statistics after one step, with the float64 statistics of the global
batch for comparison, to ``--out``/result.json; the launcher then prints a one-line verdict.

  python examples/multi_process.py                 # 2 processes x 2 devices
  python examples/multi_process.py --num-processes 3 --devices-per-process 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

FEATURES = 5
PER_DEVICE = 6
RESULT = "result.json"
MEAN_RTOL, VAR_RTOL = 1e-6, 1e-4  # float32 statistics against the float64 reference


def global_batch(num_devices: int, seed: int = 0):
    """The global batch, the same in every process (each takes its own rows)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    offsets = rng.normal(0, 50, (num_devices, 1, FEATURES)) + 1e3  # different per device
    x = rng.normal(size=(num_devices, PER_DEVICE, FEATURES)) * 2 + offsets
    return x.reshape(-1, FEATURES).astype(np.float32)


def worker(args) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", args.devices_per_process)
    jax.config.update("jax_platforms", "cpu")
    jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                               process_id=args.process_id, initialization_timeout=60)
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxbn

    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("d",), devices=devices)
    x = global_batch(len(devices))
    rows = PER_DEVICE * args.devices_per_process
    local = x[args.process_id * rows:(args.process_id + 1) * rows]
    sharding = NamedSharding(mesh, P("d"))
    xs = jax.make_array_from_process_local_data(sharding, local, x.shape)
    params, state = jaxbn.bn_init(FEATURES)

    def step(x):
        y, new = jaxbn.bn_apply(params, state, x, True, momentum=0.0, axis_name="d")
        return y, new

    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P("d"), out_specs=(P("d"), P())))
    y, new = fn(xs)
    mean = np.asarray(new["mean"].addressable_data(0))
    var = np.asarray(new["var"].addressable_data(0))
    if args.process_id == 0:
        x64 = x.astype(np.float64)
        result = {"num_processes": args.num_processes, "global_devices": len(devices),
                  "mean": mean.tolist(), "var": var.tolist(),
                  "reference_mean": x64.mean(0).tolist(), "reference_var": x64.var(0).tolist()}
        (Path(args.out) / RESULT).write_text(json.dumps(result, indent=1))
    jax.distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(num_processes: int, devices_per_process: int, out: str, timeout: float) -> int:
    """Starts the workers, waits at most ``timeout`` seconds, returns the worst exit code."""
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / RESULT).unlink(missing_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen(
        [sys.executable, __file__, "--worker", "--process-id", str(i), "--port", str(port),
         "--num-processes", str(num_processes), "--devices-per-process",
         str(devices_per_process), "--out", out], env=env) for i in range(num_processes)]
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(deadline - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            print(f"workers did not finish within {timeout} s", file=sys.stderr)
            return 124
    return max(abs(c) for c in codes)


def verdict(out: str, code: int) -> tuple[bool, str]:
    """Reads process 0's result and compares it with the float64 statistics."""
    path = Path(out) / RESULT
    if code != 0 or not path.exists():
        return False, f"FAILED: the workers exited with code {code}; no result in {path}"
    import numpy as np

    r = json.loads(path.read_text())
    err_mean = float(np.max(np.abs(np.subtract(r["mean"], r["reference_mean"]))
                            / np.abs(r["reference_mean"])))
    err_var = float(np.max(np.abs(np.subtract(r["var"], r["reference_var"]))
                           / np.abs(r["reference_var"])))
    ok = err_mean <= MEAN_RTOL and err_var <= VAR_RTOL
    return ok, (f"{'OK' if ok else 'FAILED'}: {r['num_processes']} processes, "
                f"{r['global_devices']} devices: the synchronized running statistics match the "
                f"global batch's float64 statistics (max relative error: mean {err_mean:.1e}, "
                f"var {err_var:.1e}; result in {path})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].replace("``", ""),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--num-processes", type=int, default=2,
                        help="worker processes to launch on 127.0.0.1")
    parser.add_argument("--devices-per-process", type=int, default=2,
                        help="fake CPU devices in each process")
    parser.add_argument("--out", default="out/multi_process",
                        help=f"folder for {RESULT} (created if needed)")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds to wait for the workers before killing them")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    code = launch(args.num_processes, args.devices_per_process, args.out, args.timeout)
    ok, line = verdict(args.out, code)
    print(line)
    return 0 if ok else (code or 1)


if __name__ == "__main__":
    sys.exit(main())
