"""The book's execution cache re-executes a chapter when what it uses changes, and only then."""
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
    modules, checkpoints, results = chapter_dependencies(_chapter(tmp_path, [
        "from diffbook import configs, metrics", "cfg = configs.RING_REFLOW",
        "%time x = 1", "path = f'locality_r2_{cfg.name}.json'"]))  # a magic must not hide the imports
    assert {"configs", "metrics", "nets", "schedules"} <= set(modules)  # nets, schedules: imported by configs
    assert "ring_reflow" in checkpoints and "ring_fm" in checkpoints  # the reflow config reads its parent
    # The config registry names every config, and train.py's docstring names mnist_ddpm: neither is a use.
    assert "mnist_ddpm" not in checkpoints and "mnist_classifier" not in checkpoints
    assert results == ["locality_r2_fashion_mnist.json", "locality_r2_mnist.json"]
    modules, checkpoints, results = chapter_dependencies(_chapter(tmp_path, ["import math"]))
    assert modules == ["__init__"] and checkpoints == [] and results == []
    modules, checkpoints, _ = chapter_dependencies(_chapter(tmp_path, ["from diffbook import paths", "x = (1"]))
    assert "train" in modules and "mnist_ddpm" in checkpoints  # unparseable: it depends on everything


def test_a_changed_dependency_re_executes_only_that_chapter(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cache = tmp_path / "cache"
    first = _chapter(tmp_path, ["x = 1", "assert x == 1"], "first.md")
    second = _chapter(tmp_path, ["y = 2"], "second.md")
    keys = {first.name: {"files": {"a.py": "1"}}, second.name: {"files": {"b.py": "1"}}}
    monkeypatch.setattr(book_cache, "chapter_key", lambda chapter, profile: {**keys[chapter.name], "profile": profile})
    assert invalidate_changed([first, second], cache, "smoke") == [first, second]  # no keys yet
    assert set(execute_missing([first, second], cache, jobs=2)[0]) == {"first.md", "second.md"}
    assert invalidate_changed([first, second], cache, "smoke") == []
    assert execute_missing([first, second], cache, jobs=2) == ({}, [])  # nothing changed: nothing runs
    before = first.stat().st_mtime_ns
    time.sleep(0.01)
    keys[first.name] = {"files": {"a.py": "2"}}  # a package module the first chapter imports changed
    assert invalidate_changed([first, second], cache, "smoke") == [first]
    assert first.stat().st_mtime_ns > before  # touched, so that Sphinx re-reads it
    assert set(execute_missing([first, second], cache, jobs=2)[0]) == {"first.md"}
    assert invalidate_changed([first, second], cache, "default") == [first, second]  # another profile


def test_reverting_a_chapter_s_code_does_not_bring_back_a_stale_run(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cache = tmp_path / "cache"
    chapter = _chapter(tmp_path, ["x = 1"], "chapter.md")
    key = {"files": {"module.py": "A"}}
    monkeypatch.setattr(book_cache, "chapter_key", lambda chapter, profile: {**key, "profile": profile})
    invalidate_changed([chapter], cache, "smoke")
    execute_missing([chapter], cache, jobs=1)  # version 1 of the code, run with module A
    version_1 = chapter.read_text()
    _chapter(tmp_path, ["x = 2"], "chapter.md")
    execute_missing([chapter], cache, jobs=1)  # version 2, module A
    key = {"files": {"module.py": "B"}}  # the module changes: version 2 re-runs
    assert invalidate_changed([chapter], cache, "smoke") == [chapter]
    chapter.write_text(version_1)  # and the cell is reverted: version 1's run used module A, so it must not count
    assert set(execute_missing([chapter], cache, jobs=1)[0]) == {"chapter.md"}


def test_a_failing_chapter_is_left_for_the_build_to_report(tmp_path, capsys):
    cache = tmp_path / "cache"
    broken = _chapter(tmp_path, ["raise ValueError('no')"], "broken.md")
    assert execute_missing([broken], cache, jobs=1) == ({}, ["broken.md"])
    reported = capsys.readouterr().err
    assert "broken.md: failed" in reported and "ValueError" in reported  # the traceback's tail is shown
    from jupyter_cache import get_cache
    with pytest.raises(KeyError):
        get_cache(cache).match_cache_notebook(read_chapter(broken))


def test_longest_measured_chapter_runs_first(tmp_path, monkeypatch):
    import json as json_module

    import diffbook.book_cache as book_cache
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "chapter_times_default.json").write_text(json_module.dumps(
        {"chapters": [{"chapter": "01_a", "seconds": 10.0}, {"chapter": "02_b", "seconds": 900.0},
                      {"chapter": "03_c", "seconds": 60.0}]}))
    chapters = []
    for name, size in (("01_a", 500), ("02_b", 10), ("03_c", 50), ("04_new", 5), ("05_new", 40)):
        path = tmp_path / f"{name}.md"
        path.write_text("x" * size)
        chapters.append(path)
    monkeypatch.setattr(book_cache, "REPO_ROOT", tmp_path)
    order = [path.stem for path in book_cache.longest_first(chapters, "default")]
    assert order == ["05_new", "04_new", "02_b", "03_c", "01_a"]
    (results / "chapter_times_default.json").write_text("not json")  # unreadable: file sizes decide
    assert [path.stem for path in book_cache.longest_first(chapters, "default")][0] == "01_a"
