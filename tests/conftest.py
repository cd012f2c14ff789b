"""Test setup: 8 fake CPU devices before JAX starts, and the fast subset's one rule.

``pytest -m "not slow"`` is the fast subset for development (about a minute on 2 CPU cores);
CI runs everything. The rule, which needs no list of names:

- a test marked ``@pytest.mark.slow`` where it is written (a function, a class, or one
  ``pytest.param`` of a parametrization) is left out;
- a parametrized test function whose cases carry no ``slow`` mark runs in the fast subset on
  its first case only (put the cheapest case first); its other cases are marked slow here. A
  parametrization that marks some of its cases slow itself (``pytest.param(...,
  marks=pytest.mark.slow)``, as ``tests/test_transforms.py``'s matrix does) is taken as
  written.

Mark a test slow when its first case takes more than about 0.7 s on 2 cores
(``pytest --durations=0``).
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

def pytest_collection_modifyitems(config, items):
    by_function: dict[str, list] = {}
    for item in items:
        by_function.setdefault(item.nodeid.split("[")[0], []).append(item)
    for cases in by_function.values():
        if any(m.name == "slow" for case in cases for m in case.own_markers):
            continue  # the parametrization chose its fast cases itself
        for case in cases[1:]:  # a later case of a parametrized function
            case.add_marker(pytest.mark.slow)


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
