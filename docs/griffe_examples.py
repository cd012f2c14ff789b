"""Griffe extension for the docs build: docstrings written for ``help()`` render as Markdown.

- ``Example:`` headings become ``Examples:``. jaxbn's docstrings head their doctests
  ``Example:``; Google style reserves ``Examples:`` for the section whose ``>>>`` lines render
  as code (``Example:`` would render as a plain admonition, its code as prose).
- Sphinx roles (``:func:`name```, ``:class:`~pkg.Name```) would show literally in Markdown: a
  public jaxbn name becomes a link to its entry, anything else inline code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.M)
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|obj|data|exc):`~?([\w.]+)`")


def _role(match: re.Match[str]) -> str:
    name = match.group(1)
    public = name.startswith("jaxbn.") and not any(p.startswith("_") for p in name.split("."))
    return f"[`{name}`][{name}]" if public else f"`{name.rsplit('.', 1)[-1]}`"


def markdown(text: str) -> str:
    """A docstring's text with the two rewrites above.

    >>> markdown(":func:`jaxbn.bn_init` then :class:`~jaxbn._src.moments.Moments`")
    '[`jaxbn.bn_init`][jaxbn.bn_init] then `Moments`'
    """
    return _ROLE.sub(_role, _HEADING.sub(r"\1Examples:", text))


class ExampleSections(griffe.Extension):
    """Applies :func:`markdown` to every docstring griffe loads."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
