"""Training-mode ``y`` and batch statistics are a function of the batch alone (issue 20).

The matrix (every running state x device counts 1, 2, 8, 9, 16, 32 x momentum 0, 0.9, 1, None,
masks with an empty device, ``axis_index_groups``) lives in ``tests/any_state.py`` and runs in a
subprocess with 32 fake devices, one mode per test. The last test runs 2 processes x 8 devices.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import any_state
from tests.processes import ROOT, env_without_fake_devices, run_two_processes


@pytest.mark.parametrize("mode", any_state.MODES)
def test_training_output_ignores_the_running_state(mode):
    out = subprocess.run([sys.executable, "-W", "ignore", "-m", "tests.any_state", mode],
                         cwd=ROOT, env=env_without_fake_devices(), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    failures = json.loads(out.stdout.strip().splitlines()[-1])
    assert failures == [], "\n".join(failures[:30])


_WORKER = r"""
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=60)
import numpy as np
import jaxbn
from jax.sharding import NamedSharding, PartitionSpec as P
from tests import any_state
from tests.processes import ROOT, env_without_fake_devices, run_two_processes
D, F, R = 16, any_state.F, any_state.ROWS
x, _ = any_state.batch(D)
mesh = jax.make_mesh((D,), ("d",), devices=jax.devices())
local = slice(pid * 8, (pid + 1) * 8)
def put(a, spec):
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), a[local], a.shape)
params = {"scale": np.ones(F, np.float32), "bias": np.zeros(F, np.float32)}
def body(s, xb):
    s = jax.tree.map(lambda v: v[0], s)
    y, new = jaxbn.bn_apply(params, s, xb[0], True, axis_name="d", momentum=0.0)
    return y[None], jax.tree.map(lambda v: v[None], new)
sm = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P("d")))
whole = jax.jit(lambda s, xx: jaxbn.bn_apply(params, s, xx, True, momentum=0.0))
results = {}
for name, st in any_state.states(D, per_device=True).items():
    with jax.set_mesh(mesh):
        y, new = sm(jax.tree.map(lambda v: put(v, P("d")), st), put(x, P("d")))
        single = jax.tree.map(lambda v: v[0], st)
        flat = jax.make_array_from_process_local_data(
            NamedSharding(mesh, P("d")), x[local].reshape(-1, F), (D * R, F))
        yj, newj = whole(single, flat)
    results[name] = {
        "y": [np.asarray(s.data, np.float64).tolist() for s in y.addressable_shards],
        "mean": [np.asarray(s.data, np.float64).tolist() for s in new["mean"].addressable_shards],
        "y_jit": [np.asarray(s.data, np.float64).tolist() for s in yj.addressable_shards],
        "mean_jit": np.asarray(newj["mean"].addressable_data(0), np.float64).tolist()}
json.dump(results, open(out + str(pid), "w"))
jax.distributed.shutdown()
"""


@pytest.mark.slow
def test_two_processes_of_eight_devices(tmp_path):
    """shard_map and plain jit over 2 processes x 8 CPU devices (gloo): every state gives the
    float64 statistics of the global batch."""
    out = tmp_path / "r"
    run_two_processes(_WORKER, out, timeout=300)
    x, _ = any_state.batch(16)
    mean, var, n = any_state.reference(x, None)
    y_ref = (x.astype(np.float64) - mean) / np.sqrt(var + any_state.EPS)
    bound = (n.max() + 8) * any_state.U * (np.abs(y_ref) + 2)
    for pid in range(2):
        results = json.loads(Path(str(out) + str(pid)).read_text())
        assert set(results) == set(any_state.states(16, per_device=True))
        for name, r in results.items():
            y = np.concatenate([np.asarray(b) for b in r["y"]])  # this process's 8 devices
            rows = slice(pid * 8, (pid + 1) * 8)
            assert np.all(np.abs(y - y_ref[rows]) <= bound[rows]), (pid, name)
            y_jit = np.concatenate([np.asarray(b) for b in r["y_jit"]]).reshape(8, -1, 3)
            assert np.all(np.abs(y_jit - y_ref[rows]) <= bound[rows]), (pid, name, "jit")
            tol = (n.max() + 8) * any_state.U * (np.abs(mean) + np.sqrt(var))
            for got in (np.concatenate([np.asarray(b) for b in r["mean"]]),
                        np.asarray(r["mean_jit"])[None]):
                assert np.all(np.abs(got - mean) <= tol + 4 * any_state.U * np.abs(mean)), name
