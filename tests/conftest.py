"""Test setup: 8 fake CPU devices before JAX starts, and the ``slow`` marker.

``pytest -m "not slow"`` is the fast subset for development (under a minute on 2 CPU cores);
CI runs everything. The fast subset runs every test function once, on its first
parametrization, except the functions whose first case alone takes more than about 0.7 s
(listed in ``SLOW`` below, or marked ``@pytest.mark.slow`` in their files), and a slice of the
transformation matrix (``_fast_transform_case``).
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# Test functions (every parametrization) left out of the fast subset: "file::test". Measured
# with `pytest --durations=0` on 2 CPU cores: training smoke tests, subprocesses, sweeps, and
# every function whose first case takes more than about 0.7 s.
SLOW = {
    "jaxbn/_src/complex_bn.py::jaxbn._src.complex_bn",
    "jaxbn/_src/core.py::jaxbn._src.core.bn_apply",
    "tests/reference_jnp.py::tests.reference_jnp",
    "tests/test_benchmarks.py::test_bench_bn_quick_reports_spreads_and_collectives",
    "tests/test_benchmarks.py::test_equinox_is_counted_under_pmap",
    "tests/test_core.py::test_fully_masked_batch_leaves_state_and_no_nan",
    "tests/test_core.py::test_gradient_without_scale_and_bias",
    "tests/test_core.py::test_jit_equals_eager",
    "tests/test_core.py::test_low_precision_inputs",
    "tests/test_core.py::test_random_shapes_and_axes",
    "tests/test_core.py::test_running_stats_carry_no_gradient",
    "tests/test_core.py::test_scan_and_checkpoint_compose",
    "tests/test_core.py::test_side_by_side_with_flax_stable_mode",
    "tests/test_core.py::test_vmap_ensemble_equals_loop",
    "tests/test_examples.py::test_adabn_reestimates_first_layer_statistics",
    "tests/test_examples.py::test_cnn_bn_state_per_channel",
    "tests/test_examples.py::test_cnn_sweep_smoke",
    "tests/test_examples.py::test_dropout_only_in_training",
    "tests/test_examples.py::test_dropout_sweep_smoke",
    "tests/test_examples.py::test_gradients_sweep_smoke",
    "tests/test_examples.py::test_layer_grad_norms_match_closed_form",
    "tests/test_examples.py::test_none_vs_batch_smoke",
    "tests/test_examples.py::test_shift_sweep_smoke",
    "tests/test_examples.py::test_sync_bn_cnn_matches_single_device",
    "tests/test_examples.py::test_sync_bn_cnn_smoke",
    "tests/test_examples.py::test_vmap_ensemble_smoke",
    "tests/test_features.py::test_batch_renorm_with_traced_limits",
    "tests/test_features.py::test_fold_linen_on_a_cnn",
    "tests/test_features.py::test_precise_bn_linen_and_nnx_helpers",
    "tests/test_features.py::test_unbiased_running_var",
    "tests/test_features.py::test_wrappers_expose_the_features",
    "tests/test_flax_dropin.py::test_axis_name_under_rank_promotion_raise_like_flax",
    "tests/test_flax_dropin.py::test_complex_gradients_match_flax",
    "tests/test_flax_dropin.py::test_complex_synchronized_over_axis_name_like_flax",
    "tests/test_flax_dropin.py::test_feature_without_valid_element_keeps_running_statistics",
    "tests/test_flax_dropin.py::test_float64_statistics_like_flax_linen",
    "tests/test_flax_dropin.py::test_linen_complex_matches_flax",
    "tests/test_flax_dropin.py::test_linen_init_in_training_normalizes_with_batch_statistics",
    "tests/test_flax_dropin.py::test_linen_init_with_axis_name_issues_no_collective",
    "tests/test_flax_dropin.py::test_linen_one_value_per_feature_returns_bias_like_flax",
    "tests/test_flax_dropin.py::test_linen_tabulate_bridge_and_spectral_norm_like_flax",
    "tests/test_flax_dropin.py::test_nnx_complex_normalizes_like_flax",
    "tests/test_flax_dropin.py::test_nnx_equals_linen_bit_for_bit_and_flax_within_rounding",
    "tests/test_flax_dropin.py::test_nnx_one_example_under_vmap_jit_and_tabulate_like_flax",
    "tests/test_flax_dropin.py::test_non_boolean_masks_are_cast_like_flax",
    "tests/test_flax_wrappers.py::test_linen_cnn_trains_like_flax",
    "tests/test_flax_wrappers.py::test_linen_init_outside_pmap_then_pmap_matches_flax",
    "tests/test_flax_wrappers.py::test_linen_under_nn_vmap_equals_flat_batch",
    "tests/test_flax_wrappers.py::test_nnx_matches_flax",
    "tests/test_flax_wrappers.py::test_nnx_optimizer_jit_trains_like_flax",
    "tests/test_flax_wrappers.py::test_nnx_vmap_and_scan",
    "tests/test_numerics.py::test_clean_under_rank_promotion_raise",
    "tests/test_numerics.py::test_feature_without_valid_element_uses_running_statistics",
    "tests/test_numerics.py::test_forward_mode_matches_plain_float64",
    "tests/test_numerics.py::test_forward_mode_through_the_flax_wrappers_matches_flax",
    "tests/test_numerics.py::test_padding_holds_anything",
    "tests/test_numerics.py::test_reverse_mode_saves_only_the_input",
    "tests/test_private_copies.py::test_derivatives_of_every_order_match_the_closed_form",
    "tests/test_private_copies.py::test_low_precision_layer_makes_no_float32_copy_of_its_input",
    "tests/test_sync.py::test_groups_under_vmap_raise_clearly",
    "tests/test_sync.py::test_nested_axis_names_under_shard_map",
    "tests/test_sync.py::test_nested_axis_names_under_vmap",
    "tests/test_sync.py::test_single_example_per_device_needs_no_local_batch",
    "tests/test_sync.py::test_vmap_with_local_batch_and_uneven_masks",
    "tests/test_sync.py::test_vmap_without_local_batch_axis",
    "tests/test_combine.py::test_bn_apply_collectives_per_method",
    "tests/test_combine.py::test_payload_bytes_at_8_devices",
    "tests/test_combine.py::test_reduce_across_two_processes",
    "tests/test_any_state.py::test_two_processes_of_eight_devices",
    "tests/test_validation.py::test_fold_linen_keeps_the_original_model_right",
    "tests/test_validation.py::test_numpy_integers_are_accepted",
    "tests/test_validation.py::test_one_value_under_vmap_of_size_one_raises",
    "tests/test_validation.py::test_precise_stats_mean_of_batches_0_2_4_6_is_3",
    "tests/test_validation.py::test_precise_stats_through_any_pytree",
    "tests/test_validation.py::test_precise_unbiased_variance_with_ghost_batches",
    "tests/test_validation.py::test_stats_dtype_float64_keeps_float64_statistics",
}


# The transformation matrix's fast slice: the first-order transforms of the plain option under
# one mode of each kind of axis binding (compiled together per mode: a few seconds in all).
FAST_TRANSFORM_MODES = ("shard_map_auto", "pmap", "vmap", "jit_explicit_batch")
FAST_TRANSFORMS = ("forward", "grad", "jvp", "remat")


def _fast_transform_case(item) -> bool:
    if item.name.startswith("test_matrix["):  # test_matrix[mode-transform-option]
        mode, transform, option = item.name[len("test_matrix["):-1].split("-")
        return mode in FAST_TRANSFORM_MODES and transform in FAST_TRANSFORMS and (
            option == "plain")
    # NoSyncTest (chex variants): the plain option's gradient under jit
    return "option='plain', transform='grad'" in item.name and item.name.endswith("with_jit")


def pytest_collection_modifyitems(config, items):
    seen: set[str] = set()
    for item in items:
        function = item.nodeid.split("[")[0]
        if function.startswith("tests/test_transforms.py"):
            slow = not _fast_transform_case(item)
        else:  # a parametrized function is in the fast subset on its first case only
            slow = function in SLOW or function in seen
        seen.add(function)
        if slow:
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
