"""jaxbn: Batch Normalization for JAX as pure functions, with synchronized statistics."""

from jaxbn.collectives import UnboundAxisNameError
from jaxbn.core import bn_apply, bn_init, sync_state

__all__ = ["UnboundAxisNameError", "bn_apply", "bn_init", "sync_state"]
__version__ = "0.1.0"
