"""Notebooks to hand out: for every chapter, one for students and one with the solutions.

    python -m diffbook.handouts chapters/0[1-9]_*.md --out _build/notebooks      (what ``make notebooks`` runs)

A chapter writes its exercises with ``sphinx-exercise`` in the gated form, so that a solution can hold code cells:

.. code-block:: md

    ````{exercise} Title
    :label: ddpm-ex-closed-form
    The question.
    ````

    ````{solution-start} ddpm-ex-closed-form
    :class: dropdown
    ````
    Prose, then code cells that end in an ``assert`` of the answer.
    ````{solution-end}
    ````

``<chapter>_solutions.ipynb`` holds every cell of the chapter (the same code cells, in the same order, as the book
executes, after one setup cell that makes ``glue`` print the numbers the prose refers to). ``<chapter>_student.ipynb``
drops everything between ``solution-start`` and ``solution-end`` and puts one cell that raises
:class:`NotImplementedError` in its place. In both, the exercise and solution directives become plain Markdown
headings, which Jupyter renders, and MyST link targets are dropped.
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

_FENCE = r"(?P<fence>`{3,}|:{3,})"
_EXERCISE = re.compile(_FENCE + r"\{exercise\}\s*(?P<title>.*)$")
_SOLUTION_START = re.compile(_FENCE + r"\{solution-start\}\s*(?P<label>\S+)\s*$")
_SOLUTION_END = re.compile(_FENCE + r"\{solution-end\}\s*$")
_OPTION = re.compile(r"^:(?P<key>[\w-]+):\s*(?P<value>.*)$")
_PLAIN_SOLUTION = re.compile(_FENCE + r"\{solution\}")
_TARGET = re.compile(r"^\([\w.:-]+\)=\s*$")  # a MyST label line: a link target for the book, noise in Jupyter

STUDENT_SUFFIX, SOLUTIONS_SUFFIX = "_student", "_solutions"
# First code cell of every handout: the numbers the book's prose shows (glued) are printed instead.
GLUE_SETUP = ('import os\n\nos.environ["DIFFBOOK_GLUE"] = "print"  # show the numbers the book glues into its prose')


@dataclass
class Exercise:
    label: str
    title: str
    number: int
    solution_cells: int = 0  # code cells in its solution
    solution_asserts: int = 0  # ``assert`` statements in them


@dataclass
class Handout:
    student: nbformat.NotebookNode
    solutions: nbformat.NotebookNode
    exercises: dict[str, Exercise]


def _stub(exercise: Exercise) -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(
        f"# Exercise {exercise.number} ({exercise.title}): your code here. Delete the line below when done.\n"
        f"raise NotImplementedError(\"exercise {exercise.number}: {exercise.label}\")")


def _read(chapter: Path) -> nbformat.NotebookNode:
    try:
        import jupytext
    except ImportError as error:  # a book dependency, not a package one
        raise ImportError("making notebooks from the chapters needs jupytext: pip install -r requirements.txt") \
            from error
    return jupytext.read(chapter)


def make_handout(chapter: str | Path, first_number: int = 1) -> Handout:
    """Split ``chapter`` (a MyST-Markdown notebook) into its student and solutions notebooks. Exercises are numbered
    from ``first_number``: the book numbers them across all chapters, and the handouts follow it."""
    chapter = Path(chapter)
    source = _read(chapter)
    if "kernelspec" not in source.metadata:
        raise ValueError(f"{chapter}: not a notebook chapter (no kernelspec in its front matter)")
    exercises: dict[str, Exercise] = {}
    solved: set[str] = set()
    student, solutions = [], []
    state, fence, current = "text", "", None  # state: text | exercise-options | start-block | solution | end-block

    def fail(message: str) -> None:
        raise ValueError(f"{chapter}: {message}")

    def flush(lines: list[str], cells: list) -> None:
        text = "\n".join(lines).strip("\n")
        if text:
            cells.append(nbformat.v4.new_markdown_cell(text))
        lines.clear()

    for cell in source.cells:
        if cell.cell_type != "markdown":
            if state == "solution":
                current.solution_cells += 1
                current.solution_asserts += len(re.findall(r"^\s*assert\b", cell.source, re.M))
                if current.solution_cells == 1:
                    student.append(_stub(current))
            else:
                student.append(copy.deepcopy(cell))
            solutions.append(copy.deepcopy(cell))
            continue
        student_lines, solution_lines = [], []
        for line in cell.source.split("\n"):
            keep_for_student, shown = state not in ("solution", "start-block", "end-block"), line
            if state == "text" and (match := _EXERCISE.match(line)):
                title = match["title"].strip()
                state, fence, shown = "exercise-options", match["fence"], None
                current = Exercise(label="", title=title, number=first_number + len(exercises))
            elif state == "exercise-options" and (match := _OPTION.match(line)):
                if match["key"] == "label":
                    current.label = match["value"].strip()
                    if current.label in exercises:
                        fail(f"two exercises are labelled {current.label}")
                    exercises[current.label] = current
                shown = None
            elif state == "exercise-options":  # the first line after the options: the question starts
                if not current.label:
                    fail(f"exercise {current.title!r} has no :label: (its solution refers to it)")
                heading = f"**Exercise {current.number} ({current.title}).**"
                student_lines.append(heading)
                solution_lines.append(heading)
                state = "text" if line.strip() == fence else "exercise"
                shown = None if state == "text" else line
            elif state == "exercise" and line.strip() == fence:
                state, shown = "text", None
            elif state == "text" and _PLAIN_SOLUTION.match(line):
                fail("a {solution} directive cannot hold code cells: use the gated solution-start / solution-end form")
            elif state in ("solution", "start-block") and (_EXERCISE.match(line) or _SOLUTION_START.match(line)):
                fail(f"an exercise or solution starts inside the solution of {current.label}: close that solution's "
                     f"solution-start and solution-end with the fence they opened with ({fence})")
            elif state == "text" and (match := _SOLUTION_START.match(line)):
                if match["label"] not in exercises:
                    fail(f"a solution refers to {match['label']}, which is not the label of an exercise above it")
                current, state, fence = exercises[match["label"]], "start-block", match["fence"]
                solved.add(current.label)
                keep_for_student, shown = False, None
            elif state == "start-block":
                if line.strip() == fence:
                    state = "solution"
                    solution_lines.append(f"**Solution to exercise {current.number}.**")
                shown = None
            elif state == "solution" and (match := _SOLUTION_END.match(line)):
                state, fence, shown = "end-block", match["fence"], None
                if current.solution_cells == 0:  # a solution in prose only: the student still gets a stub
                    flush(student_lines, student)
                    student.append(_stub(current))
            elif state == "end-block":
                if line.strip() != fence:
                    fail(f"the solution-end of {current.label} is not closed by {fence}")
                state, shown = "text", None
            if shown is not None and _TARGET.match(shown):
                shown = None
            if shown is not None:
                solution_lines.append(shown)
                if keep_for_student:
                    student_lines.append(shown)
        flush(student_lines, student)
        flush(solution_lines, solutions)
    if state != "text":
        fail(f"the chapter ends inside an exercise or solution ({current.label if current else '?'}): close it")
    unsolved = [label for label in exercises if label not in solved]
    if unsolved:
        fail(f"exercises without a solution: {', '.join(unsolved)}")

    def notebook(cells: list) -> nbformat.NotebookNode:
        first_code = next((i for i, cell in enumerate(cells) if cell.cell_type == "code"), len(cells))
        cells = cells[:first_code] + [nbformat.v4.new_code_cell(GLUE_SETUP)] + cells[first_code:]
        nb = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": dict(source.metadata["kernelspec"])})
        for index, cell in enumerate(nb.cells):
            cell["id"] = f"cell-{index}"
        nbformat.validate(nb)
        return nb

    return Handout(notebook(student), notebook(solutions), exercises)


def write_handouts(chapters: list[Path], out: Path) -> list[Path]:
    """Write ``<stem>_student.ipynb`` and ``<stem>_solutions.ipynb`` for every chapter into ``out``, numbering the
    exercises on from one chapter to the next as the book does (pass the chapters in the book's order). A file
    whose content would not change is left alone, so that an incremental book build sees nothing new."""
    from .storage import atomic_write_text
    written, number = [], 1
    for chapter in chapters:
        handout = make_handout(chapter, first_number=number)
        number += len(handout.exercises)
        for suffix, nb in ((STUDENT_SUFFIX, handout.student), (SOLUTIONS_SUFFIX, handout.solutions)):
            path, text = out / f"{chapter.stem}{suffix}.ipynb", nbformat.writes(nb)
            if not (path.exists() and path.read_text() == text):
                atomic_write_text(path, text)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffbook.handouts", description=__doc__.split("\n\n")[0])
    parser.add_argument("chapters", type=Path, nargs="+", help="MyST-Markdown chapters")
    parser.add_argument("--out", type=Path, default=Path("_build/notebooks"))
    args = parser.parse_args(argv)
    try:
        written = write_handouts(args.chapters, args.out)
    except ValueError as error:
        sys.exit(f"error: {error}")
    print(f"wrote {len(written)} notebooks to {args.out}")


if __name__ == "__main__":
    main()
