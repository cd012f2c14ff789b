"""Two processes x two CPU devices on 127.0.0.1: statistics over the 4 global devices."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import multi_process  # noqa: E402

from tests import reference as ref  # noqa: E402


@pytest.mark.slow
def test_two_processes_match_global_float64(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "multi_process.py"), "--out", str(tmp_path),
           "--num-processes", "2", "--devices-per-process", "2", "--timeout", "150"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=200, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / multi_process.RESULT).read_text())
    assert got["global_devices"] == 4
    x = multi_process.global_batch(4).astype(np.float64)  # the reference, computed here
    # momentum 0: the batch statistics as a float32 state holds them, within their bounds
    # (moments pooled across the 4 devices included: tests.reference.moments_bound)
    _, _, _, e_mean, e_var = ref.stats_with_bounds(x)
    ref.assert_within(got["mean"], x.mean(0), e_mean, "mean over 2 processes")
    ref.assert_within(got["var"], x.var(0), e_var, "var over 2 processes")
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("OK: 2 processes, 4 devices"), proc.stdout
    assert list(tmp_path.iterdir()) == [tmp_path / multi_process.RESULT]  # nothing else written


def test_verdict_reports_a_mismatch_and_a_missing_result(tmp_path):
    assert multi_process.verdict(str(tmp_path), 0)[0] is False  # no result file
    result = {"num_processes": 2, "global_devices": 4, "mean": [1.0, 2.0], "var": [1.0, 1.0],
              "reference_mean": [1.0, 2.0], "reference_var": [1.0, 1.01]}
    (tmp_path / multi_process.RESULT).write_text(json.dumps(result))
    ok, line = multi_process.verdict(str(tmp_path), 0)
    assert not ok and line.startswith("FAILED") and "var 9.9e-03" in line
    result["var"] = [1.0, 1.01]
    (tmp_path / multi_process.RESULT).write_text(json.dumps(result))
    assert multi_process.verdict(str(tmp_path), 0)[0] is True
    assert multi_process.verdict(str(tmp_path), 3)[0] is False  # a worker failed
