"""Rebuild only what changed: the book's execution cache, keyed on each chapter's code *and* what it depends on.

    python -m diffbook.book_cache --cache _build/.jupyter_cache --jobs 2 chapters/0*.md     (``make book`` runs this)

Jupyter Book's ``execute_notebooks: cache`` (jupyter-cache) re-executes a chapter only when its code cells change.
It does not see a change in this package or in a shipped checkpoint, so this module keys each chapter on those too:

* the ``diffbook`` modules the chapter imports, followed through their own imports (parsed, not executed);
* the shipped checkpoints (``checkpoints/<name>.pt`` and its manifest) whose config name, or config constant
  (``MNIST_DDPM``), appears in the chapter's code or in one of those modules other than the registry ``configs``
  (names and strings in code, not docstrings or comments); all of them for a chapter that lists ``checkpoints_dir()``;
* the ``benchmarks/results`` files a string in the chapter's code names (``"locality_r2_"``, ``"chapter_times_*.json"``);
* the profile (``$DIFFBOOK_PROFILE``) and ``requirements.txt``.

When a chapter's key changes, its cache record is removed and its source is touched, so Sphinx re-reads it and
myst-nb re-executes it. Chapters with no cache record are then executed here, ``--jobs`` at a time with the CPU
threads split between them, and stored in the cache, where the book build finds them.
"""
from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .configs import CONFIGS
from .profiles import current_profile
from .storage import REPO_ROOT, atomic_write_text, checkpoints_dir, sha256_file

PACKAGE_DIR = Path(__file__).resolve().parent
KEYS_FILE = "diffbook-keys.json"


def read_chapter(chapter: Path):
    """The chapter as myst-nb reads it for the book build (so that cache lookups agree with the build's)."""
    from myst_nb.core.read import read_myst_markdown_notebook
    return read_myst_markdown_notebook(chapter.read_text(encoding="utf-8"), add_source_map=True, path=str(chapter))


def _parse_cells(chapter: Path) -> list[ast.Module] | None:
    """Each code cell as Python (IPython magics and shell escapes translated first); None if one will not parse."""
    from IPython.core.inputtransformer2 import TransformerManager
    transform = TransformerManager().transform_cell
    trees = []
    for cell in read_chapter(chapter).cells:
        if cell.cell_type == "code":
            try:
                trees.append(ast.parse(transform(cell.source)))
            except SyntaxError:
                return None
    return trees


def _code_tokens(tree: ast.Module) -> set[str]:
    """Names, attributes and string constants of ``tree``, without docstrings: what the code uses, not what its
    comments and documentation mention."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    tokens = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            tokens.add(node.id)
        elif isinstance(node, ast.Attribute):
            tokens.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            tokens.add(node.value)
    return tokens


def _imported_modules(tree: ast.Module) -> set[str]:
    """``diffbook`` submodules imported by ``tree`` (absolute imports in chapters, relative ones in the package)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 1 or base.startswith("diffbook"):
                base = base.removeprefix("diffbook").lstrip(".")
                if base:
                    found.add(base.split(".")[0])
                else:  # from diffbook import checks  /  from . import checks
                    found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("diffbook."))
    return {name for name in found if (PACKAGE_DIR / f"{name}.py").exists()}


def _module_tree(name: str) -> ast.Module:
    return ast.parse((PACKAGE_DIR / f"{name}.py").read_text(encoding="utf-8"))


def _names_file(token: str, name: str) -> bool:
    """Whether a string in code names the results file ``name``: equal, a glob pattern matching it, or a prefix
    ending in ``_`` (``f"locality_r2_{dataset}.json"`` holds the constant ``"locality_r2_"``)."""
    return token == name or ("*" in token and fnmatch.fnmatch(name, token)) or (
        token.endswith("_") and len(token) > 1 and name.startswith(token))


def chapter_dependencies(chapter: Path) -> tuple[list[str], list[str], list[str]]:
    """The package modules (transitively), shipped checkpoints and ``benchmarks/results`` files a chapter uses.

    A checkpoint is used when its config name, or its config constant (``MNIST_DDPM``), is a name or string in the
    chapter's code or in the code of a module it imports, other than the registry ``configs`` (docstrings and
    comments do not count); a chapter that lists ``checkpoints_dir()`` itself uses them all. A results file is used
    when a string in the chapter's code names it, matches it as a glob, or starts it (``"locality_r2_"``). A chapter whose code does not parse
    depends on every module, checkpoint and results file (with a warning)."""
    shipped = sorted(path.stem for path in checkpoints_dir().glob("*.pt"))
    results = sorted(path.name for path in (REPO_ROOT / "benchmarks" / "results").glob("*.json"))
    trees = _parse_cells(chapter)
    if trees is None:
        print(f"{chapter.name}: a code cell does not parse; it depends on everything", file=sys.stderr)
        return sorted(path.stem for path in PACKAGE_DIR.glob("*.py")), shipped, results
    chapter_tokens = set().union(*(_code_tokens(tree) for tree in trees))
    modules, todo = {"__init__"}, set().union(*(_imported_modules(tree) for tree in trees))
    while todo:
        name = todo.pop()
        if name not in modules:
            modules.add(name)
            todo |= _imported_modules(_module_tree(name))
    used_results = [name for name in results if any(_names_file(token, name) for token in chapter_tokens)]
    if "checkpoints_dir" in chapter_tokens:  # the chapter lists the checkpoints itself (the preface's table)
        return sorted(modules), shipped, used_results
    # configs names every config: it is the registry, not a use. Other modules name what they load themselves.
    tokens = chapter_tokens.union(*(_code_tokens(_module_tree(name)) for name in modules if name != "configs"))
    used = {name for name in shipped if name in tokens or name.upper() in tokens}
    for name in list(used):  # a derived config (e.g. reflow) reads its parent's checkpoint
        parent = CONFIGS[name].dataset.removeprefix("reflow:") if name in CONFIGS else ""
        if parent in shipped:
            used.add(parent)
    return sorted(modules), sorted(used), used_results


def chapter_key(chapter: Path, profile: str) -> dict:
    """Everything a chapter's outputs depend on beyond its own code, with content hashes."""
    modules, checkpoints, results = chapter_dependencies(chapter)
    files = [PACKAGE_DIR / f"{name}.py" for name in modules]
    files += [REPO_ROOT / "benchmarks" / "results" / name for name in results]
    for name in checkpoints:
        files += [checkpoints_dir() / f"{name}.pt", checkpoints_dir() / f"{name}.json"]
    files.append(REPO_ROOT / "requirements.txt")
    return {"profile": profile, "files": {str(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT)
                                              else path): sha256_file(path) for path in files if path.exists()}}


def _remove_records(cache, chapter: Path) -> None:
    """Drop every cached execution of ``chapter``: of its current code and of any earlier version (which would
    come back if the code were reverted)."""
    from jupyter_cache.cache.db import NbCacheRecord
    target = chapter.resolve()
    for record in cache.list_cache_records():
        if Path(record.uri).resolve() == target:
            try:
                cache.remove_cache(record.pk)
            except KeyError:  # its notebook file is gone already: drop the database row itself
                NbCacheRecord.remove_records([record.pk], cache.db)
    try:  # a record of this code stored under another path
        record = cache.match_cache_notebook(read_chapter(chapter))
        cache.remove_cache(record.pk)
    except KeyError:
        pass


def invalidate_changed(chapters: list[Path], cache_path: Path, profile: str) -> list[Path]:
    """Drop the cache records of chapters whose key changed and touch them, so that Sphinx re-reads them (also when
    no key was stored: the cache may have been cleared under an existing build). Returns those chapters."""
    from jupyter_cache import get_cache
    cache = get_cache(cache_path)
    keys_path = cache_path / KEYS_FILE
    stored = json.loads(keys_path.read_text()) if keys_path.exists() else {}
    changed = []
    for chapter in chapters:
        key = chapter_key(chapter, profile)
        if stored.get(chapter.name) == key:
            continue
        _remove_records(cache, chapter)
        chapter.touch()
        changed.append(chapter)
        stored[chapter.name] = key
        atomic_write_text(keys_path, json.dumps(stored, indent=1, sort_keys=True))
    return changed


def execute_missing(chapters: list[Path], cache_path: Path, jobs: int,
                    timeout: int = 3600) -> tuple[dict[str, float], list[str]]:
    """Execute the chapters that have no cache record, ``jobs`` at a time, and cache the ones that succeed.
    Returns their wall times and the names of those that failed (the book build re-executes and reports them)."""
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn
    from jupyter_cache.executors.utils import single_nb_execution
    cache = get_cache(cache_path)
    missing = []
    for chapter in chapters:
        try:
            cache.match_cache_notebook(read_chapter(chapter))
        except KeyError:
            missing.append(chapter)
    if not missing:
        return {}, []
    workers = max(1, min(jobs, len(missing)))
    # Split the cores between the kernels (they inherit this process's environment), unless the user chose.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    times: dict[str, float] = {}
    failed: list[str] = []
    writing = threading.Lock()  # jupyter-cache writes a record, then its notebook: one writer at a time

    def run(chapter: Path) -> None:
        try:
            notebook = read_chapter(chapter)
            result = single_nb_execution(notebook, cwd=str(chapter.parent), allow_errors=False, timeout=timeout,
                                         meta_override=True)
            if result.err is not None:
                raise RuntimeError(result.exc_string or repr(result.err))
            with writing:
                cache.cache_notebook_bundle(CacheBundleIn(notebook, str(chapter.resolve()),
                                                          data={"execution_seconds": result.time}),
                                            check_validity=False, overwrite=True)
        except Exception as error:  # a failing cell, a dead kernel, a locked database: report, go on
            failed.append(chapter.name)
            tail = "\n".join(str(error).strip().splitlines()[-12:])
            print(f"{chapter.name}: failed; the book build will execute it again and stop there:\n{tail}",
                  file=sys.stderr, flush=True)
            return
        times[chapter.name] = round(result.time, 1)
        print(f"{chapter.name}: executed in {result.time:.0f} s", file=sys.stderr, flush=True)

    # Longest chapters first, so that the workers finish close together (Graham's LPT rule).
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(run, longest_first(missing, current_profile())))
    return times, failed


def longest_first(chapters: list[Path], profile: str) -> list[Path]:
    """``chapters`` ordered by their measured execution time in ``profile``, longest first
    (``benchmarks/results/chapter_times_<profile>.json``, the preface's time table). A chapter not measured yet goes
    first, the largest file first: it is new, and may be long."""
    report = REPO_ROOT / "benchmarks" / "results" / f"chapter_times_{profile}.json"
    measured: dict[str, float] = {}
    if report.exists():
        try:
            measured = {row["chapter"]: float(row["seconds"]) for row in json.loads(report.read_text())["chapters"]}
        except (ValueError, KeyError, TypeError):
            measured = {}  # an unreadable report only loses the ordering
    return sorted(chapters, key=lambda path: (path.stem in measured, -measured.get(path.stem, path.stat().st_size)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffbook.book_cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("chapters", type=Path, nargs="+")
    parser.add_argument("--cache", type=Path, required=True, help="the build's jupyter-cache directory")
    parser.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                        help="chapters executed at once (default: 2, or 1 on a one-core machine)")
    parser.add_argument("--no-execute", action="store_true", help="only invalidate; let the build execute")
    args = parser.parse_args(argv)
    profile = current_profile()
    started = time.perf_counter()
    for chapter in invalidate_changed(args.chapters, args.cache, profile):
        print(f"{chapter.name}: its package modules, checkpoints or profile differ from its cached run",
              file=sys.stderr)
    times, failed = ({}, []) if args.no_execute else execute_missing(args.chapters, args.cache, args.jobs)
    print(f"execution cache ({profile}): {len(times)} chapter(s) executed, {len(failed)} failed, "
          f"{len(args.chapters) - len(times) - len(failed)} up to date, in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)


if __name__ == "__main__":
    main()
