"""Two processes x two CPU devices on 127.0.0.1: statistics over the 4 global devices."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import multi_process  # noqa: E402


def test_two_processes_match_global_float64(tmp_path):
    out = tmp_path / "mp.json"
    cmd = [sys.executable, str(ROOT / "examples" / "multi_process.py"), "--out", str(out),
           "--num-processes", "2", "--devices-per-process", "2", "--timeout", "150"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=200, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["global_devices"] == 4
    x = multi_process.global_batch(4).astype(np.float64)
    np.testing.assert_allclose(got["mean"], x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(got["var"], x.var(0), rtol=1e-4)
