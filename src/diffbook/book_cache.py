"""Rebuild only what changed: the book's execution cache, keyed on each chapter's code *and* what it depends on.

    python -m diffbook.book_cache --cache _build/.jupyter_cache --jobs 2 chapters/0*.md     (``make book`` runs this)

Jupyter Book's ``execute_notebooks: cache`` (jupyter-cache) re-executes a chapter only when its code cells change.
It does not see a change in this package or in a shipped checkpoint, so this module keys each chapter on those too:

* the ``diffbook`` modules the chapter imports, followed through their own imports (parsed, not executed);
* the shipped checkpoints (``checkpoints/<name>.pt`` and its manifest) whose config name, or config constant
  (``MNIST_DDPM``), appears in the chapter's code or in one of those modules other than the registry ``configs``
  (e.g. ``metrics`` loads the classifier); all of them for a chapter that lists ``checkpoints_dir()`` itself;
* the profile (``$DIFFBOOK_PROFILE``) and ``requirements.txt`` (and, for a chapter that tabulates them, the
  measurements in ``benchmarks/results``).

When a chapter's key changes, its cache record is removed and its source is touched, so Sphinx re-reads it and
myst-nb re-executes it. Chapters with no cache record are then executed here, ``--jobs`` at a time with the CPU
threads split between them, and stored in the cache, where the book build finds them.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
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
    return read_myst_markdown_notebook(chapter.read_text(), add_source_map=True, path=str(chapter))


def _imported_modules(source: str) -> set[str]:
    """``diffbook`` submodules imported by ``source`` (absolute imports in chapters, relative ones in the package)."""
    found = set()
    try:
        tree = ast.parse(source)
    except SyntaxError:  # a cell with IPython magics: fall back to a textual scan
        return set(re.findall(r"diffbook\.(\w+)", source))
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
            found.update(alias.name.split(".")[1] for alias in node.names
                         if alias.name.startswith("diffbook.") and alias.name.count(".") >= 1)
    return {name for name in found if (PACKAGE_DIR / f"{name}.py").exists()}


def chapter_dependencies(chapter: Path) -> tuple[list[str], list[str]]:
    """The package modules (transitively) and shipped checkpoints a chapter depends on, sorted."""
    code = "\n".join(cell.source for cell in read_chapter(chapter).cells if cell.cell_type == "code")
    code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))
    modules, todo = {"__init__"}, _imported_modules(code)
    while todo:
        name = todo.pop()
        if name not in modules:
            modules.add(name)
            todo |= _imported_modules((PACKAGE_DIR / f"{name}.py").read_text())
    # configs names every config: it is the registry, not a use. Other modules name what they load themselves.
    text = code + "\n" + "\n".join((PACKAGE_DIR / f"{name}.py").read_text() for name in modules if name != "configs")
    shipped = {path.stem for path in checkpoints_dir().glob("*.pt")}
    if "checkpoints_dir()" in code:  # the chapter lists the checkpoints itself (the preface's table)
        return sorted(modules), sorted(shipped)
    used = {name for name in shipped
            if re.search(rf"\b{re.escape(name)}\b", text) or re.search(rf"\b{re.escape(name.upper())}\b", text)}
    for name in list(used):  # a derived config (e.g. reflow) reads its parent's checkpoint
        parent = CONFIGS[name].dataset.removeprefix("reflow:") if name in CONFIGS else ""
        if parent in shipped:
            used.add(parent)
    return sorted(modules), sorted(used)


def chapter_key(chapter: Path, profile: str) -> dict:
    """Everything a chapter's outputs depend on beyond its own code, with content hashes."""
    modules, checkpoints = chapter_dependencies(chapter)
    files = [PACKAGE_DIR / f"{name}.py" for name in modules]
    if "benchmarks" in chapter.read_text():  # the preface tabulates the measured times
        files += sorted((REPO_ROOT / "benchmarks" / "results").glob("*.json"))
    for name in checkpoints:
        files += [checkpoints_dir() / f"{name}.pt", checkpoints_dir() / f"{name}.json"]
    files.append(REPO_ROOT / "requirements.txt")
    return {"profile": profile, "files": {str(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT)
                                              else path): sha256_file(path) for path in files if path.exists()}}


def invalidate_changed(chapters: list[Path], cache_path: Path, profile: str) -> list[Path]:
    """Drop the cache records of chapters whose key changed (and touch them for Sphinx); returns those chapters."""
    from jupyter_cache import get_cache
    cache = get_cache(cache_path)
    keys_path = cache_path / KEYS_FILE
    stored = json.loads(keys_path.read_text()) if keys_path.exists() else {}
    changed = []
    for chapter in chapters:
        key = chapter_key(chapter, profile)
        if stored.get(chapter.name) == key:
            continue
        try:
            record = cache.match_cache_notebook(read_chapter(chapter))
            cache.remove_cache(record.pk)
        except KeyError:  # nothing cached for this code
            pass
        if chapter.name in stored:  # a first build has nothing to re-read
            chapter.touch()
            changed.append(chapter)
        stored[chapter.name] = key
        atomic_write_text(keys_path, json.dumps(stored, indent=1, sort_keys=True))
    return changed


def execute_missing(chapters: list[Path], cache_path: Path, jobs: int, timeout: int = 3600) -> dict[str, float]:
    """Execute the chapters that have no cache record, ``jobs`` at a time, and cache them. Returns wall times."""
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
        return {}
    # Split the cores between the kernels (they inherit this process's environment).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    times: dict[str, float] = {}

    def run(chapter: Path) -> None:
        notebook = read_chapter(chapter)
        result = single_nb_execution(notebook, cwd=str(chapter.parent), allow_errors=False, timeout=timeout,
                                     meta_override=True)
        if result.err is not None:  # the book build re-executes it and reports the traceback
            print(f"{chapter.name}: failed ({type(result.err).__name__}); the build will show why", file=sys.stderr)
            return
        cache.cache_notebook_bundle(CacheBundleIn(notebook, str(chapter.resolve()),
                                                  data={"execution_seconds": result.time}),
                                    check_validity=False, overwrite=True)
        times[chapter.name] = round(result.time, 1)
        print(f"{chapter.name}: executed in {result.time:.0f} s", file=sys.stderr, flush=True)

    # Longest chapters first (file size as the proxy) so that the two workers finish close together.
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(run, sorted(missing, key=lambda path: -path.stat().st_size)))
    return times


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
    changed = invalidate_changed(args.chapters, args.cache, profile)
    for chapter in changed:
        print(f"{chapter.name}: the package or a checkpoint it uses changed; it will re-execute", file=sys.stderr)
    times = {} if args.no_execute else execute_missing(args.chapters, args.cache, args.jobs)
    print(f"execution cache ({profile}): {len(times)} chapter(s) executed, "
          f"{len(args.chapters) - len(times)} up to date, in {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
