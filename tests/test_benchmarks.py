"""Smoke tests of the benchmark scripts at tiny sizes, and of their statistics helpers.

The scripts run in this process (tests/conftest.py already split the CPU into 8 devices), with
the fewest rounds and implementations that still exercise every code path they report.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402


def test_summarize_is_the_percentiles_of_per_round_ratios():
    t = np.array([2.0, 3.0, 4.0, 10.0, 5.0])
    ref = np.array([1.0, 1.0, 2.0, 2.0, 5.0])
    s = common.summarize(t, ref)
    r = t / ref  # 2, 3, 2, 5, 1
    assert s["median"] == pytest.approx(2.0)
    assert s["p10"] == pytest.approx(np.percentile(r, 10))
    assert s["p90"] == pytest.approx(np.percentile(r, 90))
    assert common.fmt(s) == f"2.00 [{s['p10']:.2f}-{s['p90']:.2f}]"


def test_noise_verdict_names_only_the_spreads_above_threshold():
    assert common.relative_spread(np.full(5, 3.0)) == 0.0
    assert common.noise_verdict({"a": 0.1, "b": 0.2}, 0.25) is None
    msg = common.noise_verdict({"a": 0.1, "b": 0.5}, 0.25)
    assert msg.startswith("NOISY RUN") and "b 50%" in msg and "a 10%" not in msg


def test_interleaved_rotates_the_order_and_aligns_rounds():
    order = []
    calls = {n: (lambda n=n: order.append(n)) for n in "abc"}
    t = common.interleaved(calls, rounds=3, inner=2)
    assert {k: len(v) for k, v in t.items()} == {"a": 3, "b": 3, "c": 3}
    firsts = [order[i * 6] for i in range(3)]  # 2 inner runs x 3 calls per round
    assert firsts == ["a", "b", "c"]


@pytest.mark.parametrize("script", ["bench_bn.py", "bench_model.py"])
def test_help_answers_before_jax_starts(script):
    """Arguments are parsed before JAX is imported (so --fake-devices/--devices can act)."""
    code = ("import runpy, sys\nsys.argv = ['x', '--help']\n"
            f"try:\n    runpy.run_path({str(ROOT / 'benchmarks' / script)!r}, "
            "run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('JAX' if 'jax' in sys.modules else 'NOJAX')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "--out" in out and "(default:" in out and out.strip().endswith("NOJAX")


def test_default_output_is_gitignored():
    import bench_bn
    import bench_model

    for mod in (bench_bn, bench_model):
        out = Path(mod.parser().parse_args([]).out)
        assert out.parent == ROOT / "out"
    assert "/out/" in (ROOT / ".gitignore").read_text().split()


@pytest.mark.slow
def test_bench_bn_quick_reports_spreads_and_collectives(tmp_path):
    import bench_bn

    args = bench_bn.parser().parse_args(["--quick", "--impls", "jaxbn", "--rounds", "2",
                                         "--inner", "1", "--no-plot", "--out", str(tmp_path)])
    bench_bn.run(args)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["env"]["platform"] == "cpu" and res["bandwidth"]["bytes_per_s"] > 0
    for row in res["shapes"]:
        assert set(row["impls"]) == {"flax", "jaxbn"}
        s = row["impls"]["jaxbn"]["fwd_bwd_vs_flax"]
        assert s["p10"] <= s["median"] <= s["p90"]
        assert row["impls"]["flax"]["fwd_bwd_vs_flax"]["median"] == 1.0
        assert row["impls"]["jaxbn"]["fwd_bwd_vs_floor"] > 0
    assert res["collectives"]["flax"] == {"fwd": [1, 1], "fwd_bwd": [2, 2]}
    assert "error" not in res["collectives"]["jaxbn"]
    assert "fwd+bwd / flax" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_equinox_is_counted_under_pmap():
    """The anchors' Equinox layer runs under pmap (it used to fail on its state check)."""
    pytest.importorskip("equinox")
    import bench_bn

    c = bench_bn.collectives_under_pmap(["equinox"])["equinox"]
    assert "error" not in c, c
    assert c["fwd"][0] == 2  # Equinox's two pmeans (mean, variance)


@pytest.mark.slow
def test_bench_model_quick(tmp_path):
    import bench_model

    args = bench_model.parser().parse_args(["--quick", "--dtypes", "float32", "--placements",
                                            "shard_map", "--rounds", "1",
                                            "--out", str(tmp_path)])
    bench_model.run(args)
    res = json.loads((tmp_path / "model.json").read_text())
    (sharded,) = res["rows"]
    assert sharded["devices"] == 8
    for r in res["rows"]:
        assert r["ratio"]["p10"] <= r["ratio"]["median"] <= r["ratio"]["p90"]
        assert r["norms"]["jaxbn"]["temp_bytes"] >= 0
    assert sharded["norms"]["jaxbn"]["collectives"][0] > 0
    assert "step time jaxbn / flax" in (tmp_path / "model.md").read_text()
