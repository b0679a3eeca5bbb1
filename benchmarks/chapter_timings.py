"""How long each chapter takes to execute: run them as a reader would (a fresh kernel each, one after another),
or read the times a book build recorded in its execution cache.

    DIFFBOOK_PROFILE=smoke python benchmarks/chapter_timings.py chapters/01_ddpm.md
    DIFFBOOK_PROFILE=default python benchmarks/chapter_timings.py chapters/0*.md --out benchmarks/results/chapter_times_default.json
    python benchmarks/chapter_timings.py chapters/0*.md --from-cache _build/.jupyter_cache --profile default \
        --out benchmarks/results/chapter_times_default.json      (after `make book`: its 2-at-a-time times)

The preface's time table reads ``benchmarks/results/chapter_times_<profile>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jupytext
from nbclient import NotebookClient

from diffbook.device import describe_hardware, pick_device
from diffbook.storage import atomic_write_text


def time_chapter(chapter: Path, top: int) -> dict:
    """Run every code cell of ``chapter`` in a new kernel; the wall time of each, slowest first."""
    notebook = jupytext.read(chapter)
    client = NotebookClient(notebook, timeout=3600, kernel_name="python3",
                            resources={"metadata": {"path": str(chapter.parent)}})
    timings = []
    started_all = time.perf_counter()
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type != "code":
                continue
            started = time.perf_counter()
            client.execute_cell(cell, index)
            timings.append({"cell": index, "seconds": round(time.perf_counter() - started, 2),
                            "first_line": cell.source.splitlines()[0] if cell.source else ""})
    return {"chapter": chapter.stem, "seconds": round(time.perf_counter() - started_all, 1),
            "slowest": sorted(timings, key=lambda t: -t["seconds"])[:top]}


def cpu_model() -> str:
    """The machine's processor, as the checkpoint manifests name it (without this process's thread count)."""
    return describe_hardware(pick_device()).rsplit(",", 1)[0]


def cached_times(chapters: list[Path], cache_path: Path) -> list[dict]:
    """The execution times a book build stored with each chapter's cached outputs (chapters not cached: left out)."""
    from jupyter_cache import get_cache

    from diffbook.book_cache import read_chapter
    cache = get_cache(cache_path)
    found = []
    for chapter in chapters:
        try:
            record = cache.match_cache_notebook(read_chapter(chapter))
        except KeyError:
            print(f"{chapter.name}: not in {cache_path} (not built, or changed since): left out", file=sys.stderr)
            continue
        found.append({"chapter": chapter.stem, "seconds": round(record.data["execution_seconds"], 1)})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("chapters", type=Path, nargs="+")
    parser.add_argument("--top", type=int, default=5, help="how many of the slowest cells to keep per chapter")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here (JSON)")
    parser.add_argument("--from-cache", type=Path, default=None, help="read a book build's jupyter-cache instead")
    parser.add_argument("--profile", default=None, help="the profile that cache was built in (with --from-cache)")
    args = parser.parse_args()
    if args.from_cache and not args.profile:
        parser.error("--from-cache needs --profile (the profile that cache was built in)")
    profile = args.profile or os.environ.get("DIFFBOOK_PROFILE", "default")
    report = {"profile": profile, "hardware": f"{cpu_model()}, {os.cpu_count()} logical CPUs", "chapters": []}
    if args.from_cache:
        report["how"] = (f"`make {'test' if profile == 'smoke' else 'book'}`: two chapters at a time, the CPU threads "
                         "split between them")
        report["chapters"] = cached_times(args.chapters, args.from_cache)
        if args.out:
            atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        return
    report["how"] = f"one chapter at a time, torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}"
    report["load_average_before"] = os.getloadavg()[0]
    for chapter in args.chapters:
        report["chapters"].append(time_chapter(chapter, args.top))
        print(json.dumps(report["chapters"][-1]), flush=True)
        if args.out:  # after every chapter: an interrupted run keeps what it measured
            report["load_average_after"] = os.getloadavg()[0]
            atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    if not args.out:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
