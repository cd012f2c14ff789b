"""Griffe extension for the docs build: ``Example:`` sections render as examples.

jaxbn's docstrings head their doctests ``Example:``; Google style reserves ``Examples:`` for
the section whose ``>>>`` lines render as code (``Example:`` would render as a plain
admonition, its code as prose). This renames the heading when the docs are built.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.M)


class ExampleSections(griffe.Extension):
    """Renames ``Example:`` headings to ``Examples:`` in every docstring griffe loads."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
