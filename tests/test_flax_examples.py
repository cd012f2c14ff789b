"""The Flax ResNet examples: a synchronized step equals Flax's own BatchNorm on the full batch
(on one device), the scripts run end to end at tiny sizes, and --help answers before JAX loads.
"""

import json
import subprocess
import sys
from pathlib import Path

import chex
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))
import flax_resnet  # noqa: E402
import flax_resnet_nnx  # noqa: E402

SCRIPTS = ("flax_resnet.py", "flax_resnet_nnx.py")
# One SGD step of a small ResNet, jaxbn's synchronized BatchNorm over 8 devices against Flax's
# on the whole batch: the two programs sum convolutions, statistics and gradients in other
# orders and Flax's default variance is one-pass. No error bound is derived for a whole
# training step; this tolerance is fixed, not computed (see tests/test_core.py and
# tests/test_flax_dropin.py for the layer itself against its bounds).
STEP_TOL = dict(atol=2e-5, rtol=1e-4)
TINY = ["--epochs", "1", "--max-steps", "2", "--width", "4", "--blocks", "1", "--no-progress"]


def _batch(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 1)).astype(np.float32) * 2.0 + 0.5
    return x, rng.integers(0, 10, n).astype(np.int32)


@pytest.mark.slow
def test_linen_sync_step_equals_flax_full_batch(devices):
    """One shard_map step over 8 devices with jaxbn's BatchNorm equals one single-device step
    on the whole batch with flax.linen.BatchNorm (the reference): parameters and statistics."""
    x, y = _batch()
    tx = flax_resnet.make_optimizer(0.1, 10)
    ours = flax_resnet.ResNet(flax_resnet.batchnorm_class("jaxbn"), 4, 1, axis_name="data")
    ref = flax_resnet.ResNet(nn.BatchNorm, 4, 1)
    v = ref.init(jax.random.key(0), x[:1], train=False)
    mesh = jax.make_mesh((8,), ("data",), devices=devices)
    rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = jax.device_put((v["params"], v["batch_stats"], tx.init(v["params"])), rep)
    got = flax_resnet.data_parallel(flax_resnet.make_train_step(ours, tx), mesh)(
        *state, *jax.device_put((x, y), split))
    want = jax.jit(flax_resnet.make_train_step(ref, tx))(
        v["params"], v["batch_stats"], tx.init(v["params"]), x, y)
    chex.assert_trees_all_close(jax.device_get(got), want, **STEP_TOL)
    assert float(got[3]) > 0  # the loss


@pytest.mark.slow
def test_nnx_sync_step_equals_flax_full_batch(devices):
    """The NNX twin: one nnx.shard_map step over 8 devices with jaxbn.nnx.BatchNorm equals one
    single-device nnx step on the whole batch with flax.nnx.BatchNorm."""
    x, y = _batch()
    mesh = jax.make_mesh((8,), ("data",), devices=devices)

    def build(norm, axis_name):
        model = flax_resnet_nnx.ResNet(norm, 4, 1, axis_name=axis_name, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, flax_resnet.make_optimizer(0.1, 10), wrt=nnx.Param)

    ours, ours_opt = build(flax_resnet_nnx.batchnorm_class("jaxbn"), "data")
    ref, ref_opt = build(nnx.BatchNorm, None)
    split = NamedSharding(mesh, P("data"))
    flax_resnet_nnx.make_train_step(mesh)(ours, ours_opt, *jax.device_put((x, y), split))

    @nnx.jit
    def ref_step(model, opt, x, y):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        _, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)

    ref_step(ref, ref_opt, x, y)
    chex.assert_trees_all_close(jax.device_get(nnx.to_pure_dict(nnx.state(ours))),
                                nnx.to_pure_dict(nnx.state(ref)), **STEP_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("script,bn", [("flax_resnet.py", "jaxbn"),
                                       ("flax_resnet_nnx.py", "jaxbn"),
                                       ("flax_resnet.py", "flax")])
def test_script_runs_end_to_end(tmp_path, script, bn):
    """Trains 2 steps on 8 fake devices, checkpoints and restores exactly, folds BN."""
    cmd = [sys.executable, str(EXAMPLES / script), *TINY, "--bn", bn, "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith(f"OK: {bn} "), proc.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["devices"] == 8 and res["steps"] == 2
    assert res["checkpoint_restored_exactly"] is True
    assert res["folded_relative_difference"] < 1e-4 and res["folded_same_predictions"] == 1.0
    assert 0.0 <= res["final_test_accuracy"] <= 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "results.json"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_defaults_without_importing_jax(script):
    code = (f"import runpy, sys; sys.path.insert(0, {str(EXAMPLES)!r}); "
            f"sys.argv = [{script!r}, '--help']\n"
            f"try:\n    runpy.run_path({str(EXAMPLES / script)!r}, run_name='__main__')\n"
            f"except SystemExit:\n    pass\n"
            f"assert 'jax' not in sys.modules, 'JAX was imported before --help'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    options = [line.split()[0] for line in proc.stdout.splitlines()
               if line.startswith("  --")]
    assert len(options) >= 12
    assert proc.stdout.count("(default:") >= len(options) - 2  # --help, --no-progress
