"""jaxbn: Batch Normalization for JAX as pure functions, with synchronized statistics."""

from jaxbn import counting, linen, nnx
from jaxbn._src.collectives import UnboundAxisNameError
from jaxbn._src.core import bn_apply, bn_init, sync_state
from jaxbn.fold import fold_conv, fold_dense, fold_linen
from jaxbn.precise import finish_stats, precise_linen_stats, reset_stats

__all__ = ["UnboundAxisNameError", "bn_apply", "bn_init", "counting", "finish_stats", "fold_conv",
           "fold_dense", "fold_linen", "linen", "nnx", "precise_linen_stats", "reset_stats",
           "sync_state"]
__version__ = "0.1.0"  # the one place: pyproject.toml reads it (setuptools dynamic)
