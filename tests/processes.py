"""Runs a worker program in 2 processes that form one JAX cluster on 127.0.0.1 (gloo)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def env_without_fake_devices() -> dict:
    """The environment for a child JAX process: no inherited device-count flag, the repository
    importable (``tests.*`` included)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_two_processes(worker: str, out: Path, timeout: float) -> None:
    """Runs ``python -c worker PID PORT OUT`` for PID 0 and 1 on a free local port; asserts
    both exit 0 (their stderr in the message), killing them after ``timeout`` seconds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, "-c", worker, str(i), port, str(out)],
                              cwd=ROOT, env=env_without_fake_devices(), stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), errs[0][-2000:] + errs[1][-2000:]
