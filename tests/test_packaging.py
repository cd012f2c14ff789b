"""What a user installs and imports: a lean ``import jaxbn``, optional Flax/Equinox, true floors.

Each check that imports runs in a fresh interpreter (``sys.modules`` of this one already holds
Flax and everything else the tests import).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from jaxbn._src import optional
from tests import reference
from tests.reference import assert_within, sum_error_bound

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Libraries that only an extra brings (jaxbn[flax], jaxbn[equinox], the examples' and tests').
EXTRAS_ONLY = ("flax", "equinox", "optax", "orbax", "tensorstore", "chex", "treescope", "msgpack")


def run_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_import_jaxbn_needs_only_jax():
    out = run_python(
        "import sys, jaxbn\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({EXTRAS_ONLY!r})))\n"
        "print(sorted(n for n in ('linen', 'nnx', 'equinox') if 'jaxbn.' + n in sys.modules))")
    assert out.splitlines() == ["[]", "[]"], out


# `sys.modules[name] = None` makes `import name` raise ModuleNotFoundError, as on a machine
# where the library is not installed.
WITHOUT_FLAX = "import sys\nsys.modules['flax'] = None\n"


@pytest.mark.slow  # a fresh interpreter each (seconds): the fast subset keeps the import checks
def test_the_functional_core_works_without_flax():
    x = np.array([[0.0, 1.0], [2.0, 5.0], [1.0, -3.0]], np.float32)
    out = run_python(
        WITHOUT_FLAX + "import json, numpy as np, jaxbn\n"
        f"x = np.array({x.tolist()!r}, np.float32)  # NumPy input\n"
        "y, state = jaxbn.bn_apply(*jaxbn.bn_init(2), x, train=True)\n"
        "print(json.dumps([y.tolist(), sorted(state)]))\n")
    y, keys = json.loads(out)
    assert keys == ["count", "mean", "var"]
    # float64 reference; float32 error bound: the mean's summation error e_m, the variance's
    # (a sum of n squared deviations, each off by the mean's error), then |y| times the
    # relative error of 1/sigma (half the variance's, plus the roundings of rsqrt and eps).
    n, u = len(x), np.finfo(np.float32).eps / 2
    mean, var, _ = reference.batch_stats(x)
    e_m = sum_error_bound(np.abs(x).sum(0), n) / n
    dev = np.abs(x - mean)
    e_v = (sum_error_bound((dev**2).sum(0), n, ulps=3) + 2 * e_m * dev.sum(0)) / n
    sigma = np.sqrt(var + 1e-5)
    want = reference.bn_forward(x, np.ones(2), np.zeros(2))
    bound = (e_m + 2 * u * dev) / sigma + np.abs(want) * (e_v / (2 * sigma**2) + 4 * u)
    assert_within(y, want, bound, "y")


# (wrapper module, the library it needs)
WRAPPERS = [("jaxbn.linen", "flax"), ("jaxbn.nnx", "flax"), ("jaxbn.equinox", "equinox")]


@pytest.mark.parametrize(("module", "library"), WRAPPERS)
@pytest.mark.parametrize("how", ["import", "attribute"])
def test_a_wrapper_without_its_library_names_the_extra(module, library, how):
    use = f"import {module}" if how == "import" else f"import jaxbn; jaxbn.{module[6:]}"
    out = run_python(f"import sys\nsys.modules[{library!r}] = None\ntry:\n"
                     f"    {use}\n"
                     "except ModuleNotFoundError as e:\n"
                     "    print(type(e).__name__, e.name, '|', e)\n")
    assert out.startswith(f"ModuleNotFoundError {library} |"), out
    assert f"{module} needs {library}" in out and f"pip install 'jaxbn[{library}]'" in out, out


@pytest.mark.slow
@pytest.mark.parametrize(("module", "library"), WRAPPERS)
def test_a_library_older_than_the_floor_is_refused(module, library):
    old = {"flax": "0.12.6", "equinox": "0.13.7"}[library]
    out = run_python(f"import {library}\n{library}.__version__ = {old!r}\ntry:\n"
                     f"    import {module}\n"
                     "except ImportError as e:\n"
                     "    print(e)\n")
    floor = optional.FLOORS[library]
    assert f"{module} needs {library}>={floor}, found {library} {old}" in out, out


@pytest.mark.slow
def test_a_broken_flax_install_shows_its_own_error():
    """Only Flax itself missing is reported as the extra; a missing dependency of Flax keeps
    its own message."""
    out = run_python("import sys\nsys.modules['msgpack'] = None\ntry:\n"
                     "    import jaxbn.linen\n"
                     "except ModuleNotFoundError as e:\n"
                     "    print(e.name, '|', e)\n")
    assert out.startswith("msgpack |") and "jaxbn[flax]" not in out, out


@pytest.mark.slow
def test_wrappers_load_on_first_use():
    out = run_python("import sys, jaxbn, flax.linen, flax.nnx\n"
                     "print(issubclass(jaxbn.linen.BatchNorm, flax.linen.BatchNorm),\n"
                     "      issubclass(jaxbn.nnx.BatchNorm, flax.nnx.BatchNorm),\n"
                     "      'linen' in dir(jaxbn), hasattr(jaxbn, 'no_such_name'))")
    assert out.split() == ["True", "True", "True", "False"], out


def _floor(requirement: str) -> tuple[str, str]:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement)
    assert m, f"{requirement!r}: expected NAME>=FLOOR"
    return m.group(1), m.group(2)


def test_declared_floors_are_the_ones_ci_tests():
    """pyproject's floors, .ci/floors.txt's pins (the fast tests run with exactly those) and
    the floors jaxbn.linen/nnx/equinox check at import agree."""
    declared = dict(_floor(r) for r in PYPROJECT["dependencies"])
    extras = PYPROJECT["optional-dependencies"]
    for extra in ("flax", "equinox"):
        (req,) = extras[extra]
        name, floor = _floor(req)
        assert name == extra and optional.FLOORS[extra] == floor, (extra, req, optional.FLOORS)
        declared[name] = floor
    pins = dict(line.split("==") for line in (ROOT / ".ci" / "floors.txt").read_text().split()
                if "==" in line)
    assert pins == {k: (v + ".0" if v.count(".") == 1 else v) for k, v in declared.items()}, (
        pins, declared)
    assert PYPROJECT["requires-python"] == ">=3.11"  # jax 0.10 has no Python 3.10 release


def test_examples_extra_has_what_the_examples_import():
    """Every third-party top-level module the examples import is in ``jaxbn[examples]``."""
    stdlib = sys.stdlib_module_names
    local = {p.stem for p in (ROOT / "examples").glob("*.py")}
    imported = set()
    for path in (ROOT / "examples").glob("*.py"):
        imported |= set(re.findall(r"^\s*(?:import|from)\s+([A-Za-z_]\w*)", path.read_text(),
                                   re.M))
    third_party = imported - set(stdlib) - local - {"jaxbn", "__future__"}
    extras = PYPROJECT["optional-dependencies"]
    provided = {"jax", "numpy", "flax", "sklearn", "orbax"}  # core deps, jaxbn[flax], renames
    listed = {re.split(r"[<>=\[]", r)[0].replace("-", "_") for r in extras["examples"]}
    assert "jaxbn[flax]" in extras["examples"]
    assert {"scikit_learn", "orbax_checkpoint"} <= listed
    missing = sorted(third_party - listed - provided)
    assert not missing, f"examples import {missing}, absent from the examples extra"
