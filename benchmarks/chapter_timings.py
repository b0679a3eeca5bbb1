"""Execute one chapter and print the wall time of each code cell as JSON (slowest first).

    DIFFBOOK_PROFILE=smoke python benchmarks/chapter_timings.py chapters/01_ddpm.md
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jupytext
from nbclient import NotebookClient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("chapter", type=Path)
    parser.add_argument("--top", type=int, default=10, help="how many of the slowest cells to print")
    args = parser.parse_args()
    notebook = jupytext.read(args.chapter)
    client = NotebookClient(notebook, timeout=3600, kernel_name="python3",
                            resources={"metadata": {"path": str(args.chapter.parent)}})
    timings = []
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type != "code":
                continue
            started = time.perf_counter()
            client.execute_cell(cell, index)
            timings.append({"cell": index, "seconds": round(time.perf_counter() - started, 2),
                            "first_line": cell.source.splitlines()[0] if cell.source else ""})
    report = {"chapter": str(args.chapter), "profile": os.environ.get("DIFFBOOK_PROFILE", "default"),
              "total_seconds": round(sum(t["seconds"] for t in timings), 1),
              "slowest": sorted(timings, key=lambda t: -t["seconds"])[: args.top]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
