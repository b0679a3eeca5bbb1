"""What chapters need from the notebook they run in, with or without the book's tools installed.

:func:`glue` is myst-nb's ``glue`` when myst-nb is installed (the book build puts the value into the prose), and
otherwise prints the value, so a chapter's notebook also runs in a plain Jupyter with only this package. A handout
notebook sets ``DIFFBOOK_GLUE=print`` in its first cell, so it prints the numbers even where myst-nb is installed.
"""
from __future__ import annotations

import os
from typing import Any

try:
    from myst_nb import glue as _myst_glue
except ImportError:  # a student's Jupyter with only diffbook installed
    _myst_glue = None


def _plain(value: Any) -> Any:
    """NumPy scalars and 0-d tensors as Python numbers: myst-nb formats ``{glue:text}`x:.2f``` from the value's repr,
    and ``np.float64(0.5)`` is not a number to it."""
    if hasattr(value, "ndim") and getattr(value, "ndim") == 0 and hasattr(value, "item"):
        return value.item()
    return value


def glue(name: str, value: Any, display: bool = True) -> None:
    """Store ``value`` under ``name`` for the prose (``{glue:text}`name```); without myst-nb, print it. NumPy and
    torch scalars are stored as Python numbers, so that format specs apply to them."""
    value = _plain(value)
    if _myst_glue is not None and os.environ.get("DIFFBOOK_GLUE") != "print":
        _myst_glue(name, value, display=display)
    else:
        print(f"{name} = {value!r}")
