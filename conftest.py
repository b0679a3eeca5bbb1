"""Let nbval collect the book's MyST-Markdown notebooks (``chapters/*.md`` with a jupytext header).

nbval reads ``.ipynb`` only; this gives it the same notebooks parsed by jupytext, without ever writing an
``.ipynb`` beside its source. A ``.md`` notebook has no stored outputs, so run it with ``--nbval-lax``:
the chapters check themselves with ``assert``.
"""
from __future__ import annotations

import jupytext
import nbformat
import pytest
from nbval import plugin


def _is_jupytext_markdown(path) -> bool:
    if path.suffix != ".md":
        return False
    head = path.read_text(encoding="utf-8")[:2000]
    return head.startswith("---") and "jupytext:" in head.split("\n---", 1)[0]


class _JupytextReader:
    """Stands in for the ``nbformat`` module inside nbval: ``read`` parses with jupytext."""

    def __getattr__(self, name):
        return getattr(nbformat, name)

    @staticmethod
    def read(path, as_version=4):
        return jupytext.read(path, as_version=as_version)


class MarkdownNotebook(plugin.IPyNbFile):
    def collect(self):
        original, plugin.nbformat = plugin.nbformat, _JupytextReader()
        try:
            yield from super().collect()
        finally:
            plugin.nbformat = original


def pytest_collect_file(file_path, parent):
    option = parent.config.option
    if (option.nbval or option.nbval_lax) and _is_jupytext_markdown(file_path):
        return MarkdownNotebook.from_parent(parent, path=file_path)
    return None
