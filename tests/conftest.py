"""Test setup: 8 fake CPU devices before JAX starts, and the ``slow`` marker.

``pytest -m "not slow"`` is the fast subset for development; CI runs everything. A test is
slow when it takes more than a few seconds on 2 CPU cores (training smoke tests, subprocesses,
large sweeps): mark it ``@pytest.mark.slow`` in its file, or list it in ``SLOW`` below.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# Slow tests in files whose owners have not marked them yet: "file::test" (every
# parametrization). Measured with `pytest --durations=40` on 2 shared CPU cores.
SLOW = {
    "tests/test_core.py::test_random_shapes_and_axes",
    "tests/test_examples.py::test_none_vs_batch_smoke",
    "tests/test_examples.py::test_vmap_ensemble_smoke",
    "tests/test_examples.py::test_sync_bn_cnn_matches_single_device",
    "tests/test_examples.py::test_sync_bn_cnn_smoke",
    "tests/test_features.py::test_fold_linen_on_a_cnn",
    "tests/test_flax_wrappers.py::test_linen_cnn_trains_like_flax",
    "tests/test_flax_wrappers.py::test_nnx_optimizer_jit_trains_like_flax",
    "tests/test_flax_wrappers.py::test_nnx_vmap_and_scan",
    "tests/test_sync.py::test_vmap_with_local_batch_and_uneven_masks",
    "tests/test_sync.py::test_vmap_without_local_batch_axis",
    "tests/test_sync.py::test_nested_axis_names_under_vmap",
    "tests/test_sync.py::test_single_example_per_device_needs_no_local_batch",
    "tests/test_examples.py::test_gradients_sweep_smoke",
    "tests/test_examples.py::test_layer_grad_norms_match_closed_form",
    "tests/test_examples.py::test_cnn_bn_state_per_channel",
    "tests/test_examples.py::test_dropout_only_in_training",
    "tests/test_examples.py::test_adabn_reestimates_first_layer_statistics",
    "tests/test_benchmarks.py::test_bench_bn_quick_reports_spreads_and_collectives",
    "tests/test_numerics.py::test_forward_mode_matches_plain_float64",
    "tests/test_numerics.py::test_clean_under_rank_promotion_raise",
    "tests/test_numerics.py::test_feature_without_valid_element_uses_running_statistics",
    "tests/test_flax_dropin.py::test_axis_name_under_rank_promotion_raise_like_flax",
    "tests/test_flax_dropin.py::test_complex_synchronized_over_axis_name_like_flax",
    "tests/test_flax_dropin.py::test_complex_gradients_match_flax",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.split("[")[0] in SLOW:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) >= 8, "tests need 8 fake CPU devices"
    return devs[:8]


# The library is held to Flax's CI setting (JAX_NUMPY_RANK_PROMOTION=raise in .ci/run). The
# example and benchmark programs are user code built on the public API, written in ordinary
# NumPy style: their tests run them with rank promotion allowed (in this process and in the
# subprocesses they start).
USER_CODE_TESTS = ("test_examples.py", "test_flax_examples.py", "test_benchmarks.py")
_RANK_PROMOTION = os.environ.get("JAX_NUMPY_RANK_PROMOTION", "allow")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture (module-scoped ones included) of a user-code test is set up."""
    if item.path.name in USER_CODE_TESTS:
        os.environ["JAX_NUMPY_RANK_PROMOTION"] = "allow"
        jax.config.update("jax_numpy_rank_promotion", "allow")


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    if item.path.name in USER_CODE_TESTS and (nextitem is None or
                                              nextitem.path.name not in USER_CODE_TESTS):
        os.environ["JAX_NUMPY_RANK_PROMOTION"] = _RANK_PROMOTION
        jax.config.update("jax_numpy_rank_promotion", _RANK_PROMOTION)
