"""Execute chapters as a reader would (a fresh kernel each) and report each one's wall time and its slowest cells.

    DIFFBOOK_PROFILE=smoke python benchmarks/chapter_timings.py chapters/01_ddpm.md
    DIFFBOOK_PROFILE=default python benchmarks/chapter_timings.py chapters/0*.md --out benchmarks/results/chapter_times_default.json

The preface's time table is read from the ``--out`` files in ``benchmarks/results/`` (one per profile).
"""
from __future__ import annotations

import argparse
import json
import os
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("chapters", type=Path, nargs="+")
    parser.add_argument("--top", type=int, default=5, help="how many of the slowest cells to keep per chapter")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here (JSON)")
    args = parser.parse_args()
    report = {"profile": os.environ.get("DIFFBOOK_PROFILE", "default"),
              "hardware": f"{describe_hardware(pick_device())}, {os.cpu_count()} logical CPUs",
              "torch_threads": os.environ.get("OMP_NUM_THREADS", "torch default"),
              "load_average_before": os.getloadavg()[0], "chapters": []}
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
