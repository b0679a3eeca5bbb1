"""What chapters need from the notebook they run in, with or without the book's tools installed.

:func:`glue` is myst-nb's ``glue`` when myst-nb is installed (the book build puts the value into the prose), and
otherwise shows the value, so a chapter's notebook also runs in a plain Jupyter with only this package.
"""
from __future__ import annotations

from typing import Any

try:
    from myst_nb import glue as _myst_glue
except ImportError:  # a student's Jupyter with only diffbook installed
    _myst_glue = None


def glue(name: str, value: Any, display: bool = True) -> None:
    """Store ``value`` under ``name`` for the prose (``{glue:text}`name```); without myst-nb, print it."""
    if _myst_glue is not None:
        _myst_glue(name, value, display=display)
    else:
        print(f"{name} = {value!r}")
