"""Optional dependencies: Flax and Equinox are extras (``jaxbn[flax]``, ``jaxbn[equinox]``).

``import jaxbn`` needs only JAX. The modules that wrap a library (``jaxbn.linen``,
``jaxbn.nnx``, ``jaxbn.equinox``) import it at their top and call :func:`raise_missing` when the
import fails, and :func:`check_version` when it succeeds, so that a user without the library,
or with a release older than the tested floor, is told which extra to install.

Example:
  >>> from jaxbn._src.optional import check_version
  >>> check_version("flax", "0.12.6", "jaxbn.nnx")
  Traceback (most recent call last):
  ...
  ImportError: jaxbn.nnx needs flax>=0.12.7, found flax 0.12.6: pip install -U 'jaxbn[flax]'
"""

from __future__ import annotations

import re
from typing import NoReturn

# The lowest tested release of each optional library (pyproject.toml's extras; tests check
# that the two agree).
FLOORS = {"flax": "0.12.7", "equinox": "0.13.8"}


def _release(version: str) -> tuple[int, ...]:
    """The leading release numbers of a version string: ``"0.12.7.dev1+g"`` -> (0, 12, 7)."""
    m = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(p) for p in m.group(0).split(".")) if m else ()


def raise_missing(library: str, module: str, err: ModuleNotFoundError) -> NoReturn:
    """Raises the error for ``module``'s failed import of ``library`` (``err``).

    A ModuleNotFoundError naming the extra to install when ``library`` itself is missing;
    ``err`` itself otherwise (a missing dependency of the library, or a missing module inside
    it, shows its own message).
    """
    if err.name != library:
        raise err
    raise ModuleNotFoundError(
        f"{module} needs {library}, an optional dependency of jaxbn that is not installed: "
        f"pip install 'jaxbn[{library}]' (or pip install '{library}>={FLOORS[library]}')",
        name=library) from err


def check_version(library: str, version: str, module: str) -> None:
    """Raises ImportError when ``version`` of ``library`` is older than the tested floor."""
    floor = FLOORS[library]
    if _release(version) < _release(floor):
        raise ImportError(f"{module} needs {library}>={floor}, found {library} {version}: "
                          f"pip install -U 'jaxbn[{library}]'")
