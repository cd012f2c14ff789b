"""jaxbn: Batch Normalization for JAX as pure functions, with synchronized statistics.

``import jaxbn`` needs only JAX. The module wrappers load their library on first use:
``jaxbn.linen`` and ``jaxbn.nnx`` need Flax (``pip install 'jaxbn[flax]'``), ``jaxbn.equinox``
needs Equinox (``pip install 'jaxbn[equinox]'``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from jaxbn import counting
from jaxbn._src.collectives import UnboundAxisNameError
from jaxbn._src.core import bn_apply, bn_init, sync_state
from jaxbn._src.types import Axis, Params, State
from jaxbn.fold import fold_conv, fold_dense, fold_linen
from jaxbn.precise import finish_stats, precise_linen_stats, reset_stats

if TYPE_CHECKING:  # type checkers see the wrappers; at run time they load on first use
    from jaxbn import equinox as equinox
    from jaxbn import linen as linen
    from jaxbn import nnx as nnx

__all__ = ["Axis", "Params", "State", "UnboundAxisNameError", "bn_apply", "bn_init", "counting",
           "finish_stats", "fold_conv", "fold_dense", "fold_linen", "precise_linen_stats",
           "reset_stats", "sync_state"]
__version__ = "0.1.0"  # the one place: pyproject.toml reads it (setuptools dynamic)

# Submodules that import an optional library: `jaxbn.linen` works after a plain `import jaxbn`,
# and imports Flax only then.
_WRAPPERS = ("linen", "nnx", "equinox")

if not TYPE_CHECKING:  # hidden from type checkers, which would accept any attribute otherwise

    def __getattr__(name: str):
        if name in _WRAPPERS:
            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(globals()) | set(_WRAPPERS))
