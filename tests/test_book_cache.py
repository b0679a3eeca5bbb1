"""The book's execution cache re-executes a chapter when what it uses changes, and only then."""
import os
import time

import pytest

import diffbook.book_cache as book_cache
from diffbook.book_cache import chapter_dependencies, execute_missing, invalidate_changed, read_chapter

HEADER = """---
jupytext:
  text_representation: {extension: .md, format_name: myst}
kernelspec: {display_name: Python 3, language: python, name: python3}
---

# Toy
"""


def _chapter(tmp_path, code, name="toy.md"):
    path = tmp_path / name
    path.write_text(HEADER + "".join(f"\n```{{code-cell}} ipython3\n{cell}\n```\n" for cell in code))
    return path


def test_dependencies_follow_imports_and_name_checkpoints(tmp_path):
    modules, checkpoints = chapter_dependencies(_chapter(tmp_path, ["from diffbook import configs, metrics",
                                                                     "cfg = configs.RING_REFLOW"]))
    assert {"configs", "metrics", "nets", "schedules"} <= set(modules)  # nets, schedules: imported by configs
    assert "ring_reflow" in checkpoints and "ring_fm" in checkpoints  # the reflow config reads its parent
    assert "mnist_ddpm" not in checkpoints  # the config registry names every config; that is not a use
    modules, checkpoints = chapter_dependencies(_chapter(tmp_path, ["import math"]))
    assert modules == ["__init__"] and checkpoints == []


def test_a_changed_dependency_re_executes_only_that_chapter(tmp_path, monkeypatch):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cache = tmp_path / "cache"
    first = _chapter(tmp_path, ["x = 1", "assert x == 1"], "first.md")
    second = _chapter(tmp_path, ["y = 2"], "second.md")
    keys = {first.name: {"files": {"a.py": "1"}}, second.name: {"files": {"b.py": "1"}}}
    monkeypatch.setattr(book_cache, "chapter_key", lambda chapter, profile: {**keys[chapter.name], "profile": profile})
    assert invalidate_changed([first, second], cache, "smoke") == []  # a first build: nothing to re-read
    assert set(execute_missing([first, second], cache, jobs=2)) == {"first.md", "second.md"}
    assert invalidate_changed([first, second], cache, "smoke") == []
    assert execute_missing([first, second], cache, jobs=2) == {}  # nothing changed: nothing runs
    before = first.stat().st_mtime_ns
    time.sleep(0.01)
    keys[first.name] = {"files": {"a.py": "2"}}  # a package module the first chapter imports changed
    assert invalidate_changed([first, second], cache, "smoke") == [first]
    assert first.stat().st_mtime_ns > before  # touched, so that Sphinx re-reads it
    assert set(execute_missing([first, second], cache, jobs=2)) == {"first.md"}
    assert invalidate_changed([first, second], cache, "default") == [first, second]  # another profile


def test_a_failing_chapter_is_left_for_the_build_to_report(tmp_path, capsys):
    cache = tmp_path / "cache"
    broken = _chapter(tmp_path, ["raise ValueError('no')"], "broken.md")
    assert execute_missing([broken], cache, jobs=1) == {}
    assert "broken.md: failed (" in capsys.readouterr().err
    from jupyter_cache import get_cache
    with pytest.raises(KeyError):
        get_cache(cache).match_cache_notebook(read_chapter(broken))
