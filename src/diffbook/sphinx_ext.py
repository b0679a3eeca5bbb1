"""A Sphinx extension for the book's own build: each page's scripts once.

Jupyter Book 1.x adds sphinx-thebe's and sphinx-togglebutton's inline settings twice to every page; the second
``const THEBE_JS_URL`` is a JavaScript SyntaxError in every reader's console (found by tests/test_rendered_pages.py).
This drops exact duplicates from each page's script list, keeping the first of each.
"""
from __future__ import annotations

from typing import Any


def _unique_scripts(app, pagename: str, templatename: str, context: dict[str, Any], doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for script in scripts:
        # an inline script's filename is None from one extension and "" from another: the same script
        filename = getattr(script, "filename", script) or ""
        key = (str(filename), getattr(script, "priority", 0), repr(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique  # in place: handlers after this one (MathJax's) add to the same list


def setup(app) -> dict[str, Any]:
    # Early: html-page-context stops at the first handler that returns a template, and the duplicates are global.
    app.connect("html-page-context", _unique_scripts, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
