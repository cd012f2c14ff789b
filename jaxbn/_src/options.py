"""The normalization options, declared once: ``bn_apply``'s keywords and the wrappers' fields.

:class:`Options` is what the core works from. ``jaxbn.bn_apply`` builds one from its keyword
arguments (same names), and the Flax and Equinox wrappers build one from their fields with
:func:`from_attributes` (Flax's names are the same). Adding an option means: a field here, its
check in :meth:`Options.checked`, and its use in the core (plus the keyword of ``bn_apply``).

Example:
  >>> from jaxbn._src.options import Options
  >>> Options(momentum=0.9).checked().momentum
  0.9
  >>> Options(momentum=1.5).checked()
  Traceback (most recent call last):
  ...
  ValueError: momentum must be a real number in [0, 1] (or None for a cumulative average), got 1.5
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

from jaxbn._src import collectives, combine, option_checks


class Options(NamedTuple):
    """How one BatchNorm layer normalizes and updates its statistics (see ``jaxbn.bn_apply``).

    Attributes:
      axis: the feature axis of ``x``, or a tuple of them.
      momentum: running update ``momentum * old + (1 - momentum) * batch``; None keeps a
        cumulative average (needs ``state["count"]``).
      epsilon: added to the variance before the square root.
      axis_name: the axis name(s) of ``pmap``/``shard_map``/``vmap`` to synchronize over.
      axis_index_groups: groups of device indices along ``axis_name`` that share statistics.
      unbiased_running_var: accumulate ``n / (n - 1)`` times the batch variance.
      virtual_batch_size: ghost batches of this many examples along axis 0.
      renorm: ``(r_max, d_max)`` for batch renormalization.
      skip_nonfinite: leave the running statistics unchanged on a non-finite batch.
      allow_single_value: accept one value per feature in training (variance 0).
      sync_method: ``"auto"``, ``"gather"`` or ``"reduce"``: how statistics are combined
        over devices (``jaxbn._src.combine``).
    """

    axis: int | Sequence[int] = -1
    momentum: Any = 0.99  # a float in [0, 1], a traced float scalar, or None
    epsilon: float = 1e-5
    axis_name: Hashable | tuple[Hashable, ...] | None = None
    axis_index_groups: Sequence[Sequence[int]] | None = None
    unbiased_running_var: bool = False
    virtual_batch_size: int | None = None
    renorm: tuple[Any, Any] | None = None
    skip_nonfinite: bool = False
    allow_single_value: bool = False
    sync_method: str = "auto"

    def checked(self) -> Options:
        """The options after the checks that need no input (each raises a clear error);
        ``axis_index_groups`` comes back as a tuple of tuples."""
        option_checks.check_momentum(self.momentum)
        option_checks.check_axis_name(self.axis_name)
        option_checks.check_groups(self.axis_name, self.axis_index_groups)
        option_checks.check_renorm(self.renorm)
        combine.check_method(self.sync_method)
        for name in ("unbiased_running_var", "skip_nonfinite", "allow_single_value"):
            option_checks.check_flag(getattr(self, name), name)
        return self._replace(
            axis_index_groups=collectives.normalize_groups(self.axis_index_groups))


def from_attributes(obj: Any, **overrides: Any) -> Options:
    """An :class:`Options` from the attributes of ``obj`` that share a field's name (a Flax or
    Equinox module's fields), then ``overrides``."""
    found = {f: getattr(obj, f) for f in Options._fields if hasattr(obj, f)}
    return Options(**{**found, **overrides})
