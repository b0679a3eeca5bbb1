"""The notebooks handed to students: no solution code in theirs, every exercise solved and asserted in the other,
and both run in a plain Jupyter kernel that has the package but not the book's tools (no myst-nb)."""
import os
import re
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from diffbook.handouts import make_handout, write_handouts

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("0[1-9]_*.md"))
MIN_EXERCISES = 4

TOY = """---
jupytext:
  text_representation: {extension: .md, format_name: myst}
kernelspec: {display_name: Python 3, language: python, name: python3}
---

# Toy

(toy-target)=

```{code-cell} ipython3
x = 2
```

````{exercise} Square it
:label: toy-ex-square

Compute $x^2$.
````

````{solution-start} toy-ex-square
:class: dropdown
````

It is four:

```{code-cell} ipython3
secret_answer = x**2
assert secret_answer == 4
```

````{solution-end}
````

Text after the solution.
"""


def _code_lines(cells):
    return {line.strip() for cell in cells if cell.cell_type == "code" for line in cell.source.splitlines()
            if line.strip() and not line.strip().startswith("#")}


def _write(tmp_path, text):
    path = tmp_path / "toy.md"
    path.write_text(text)
    return path


def test_the_student_gets_the_question_and_a_stub_the_solutions_keep_the_code(tmp_path):
    handout = make_handout(_write(tmp_path, TOY))
    student = "\n".join(cell.source for cell in handout.student.cells)
    solutions = "\n".join(cell.source for cell in handout.solutions.cells)
    assert "Compute $x^2$" in student and "Text after the solution." in student and "x = 2" in student
    assert "secret_answer" not in student and "It is four" not in student and "solution-" not in student
    assert 'raise NotImplementedError("exercise 1: toy-ex-square")' in student
    assert "secret_answer = x**2" in solutions and "It is four" in solutions and "solution-start" not in solutions
    assert "**Exercise 1 (Square it).**" in student and "**Solution to exercise 1.**" in solutions
    assert "(toy-target)=" not in student + solutions  # link targets mean nothing in Jupyter
    assert handout.exercises["toy-ex-square"].solution_asserts == 1
    for notebook in (handout.student, handout.solutions):
        nbformat.validate(notebook)


@pytest.mark.parametrize("broken, message", [
    (TOY.replace(":label: toy-ex-square\n", ""), "has no :label:"),
    (TOY.replace("{solution-start} toy-ex-square", "{solution-start} toy-ex-cube"), "not the label of an exercise"),
    (TOY.replace("````{solution-end}\n````\n", ""), "ends inside an exercise or solution"),
    (TOY.split("````{solution-start}")[0], "exercises without a solution: toy-ex-square"),
])
def test_malformed_exercises_are_refused_with_the_chapter_named(tmp_path, broken, message):
    with pytest.raises(ValueError, match=rf"toy\.md: .*{message}"):
        make_handout(_write(tmp_path, broken))


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda path: path.stem)
def test_every_chapter_has_solved_asserted_exercises_and_a_clean_student_notebook(chapter):
    handout = make_handout(chapter)
    assert len(handout.exercises) >= MIN_EXERCISES, f"{chapter.name}: {len(handout.exercises)} exercises"
    for label, exercise in handout.exercises.items():
        assert exercise.solution_cells >= 1 and exercise.solution_asserts >= 1, \
            f"{chapter.name}: the solution of {label} has no code cell that asserts its answer"
    # The solutions notebook runs exactly the chapter's code, in order: the book build executes the same cells.
    book_code = [cell.source for cell in jupytext.read(chapter).cells if cell.cell_type == "code"]
    assert [cell.source for cell in handout.solutions.cells if cell.cell_type == "code"] == book_code
    solution_only = _code_lines(handout.solutions.cells) - _code_lines(
        [cell for cell in jupytext.read(chapter).cells if cell.cell_type == "code"
         and cell.source in {c.source for c in handout.student.cells}])
    leaked = solution_only & _code_lines(handout.student.cells)
    assert not leaked, f"{chapter.name}: solution code in the student notebook: {sorted(leaked)[:3]}"
    stubs = [cell for cell in handout.student.cells if "raise NotImplementedError" in cell.source]
    assert len(stubs) == len(handout.exercises)


def _run(notebook, path, env):
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path)}})
    saved = dict(os.environ)
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        return client.execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_a_chapter_s_notebooks_run_in_plain_jupyter_without_the_book_tools(tmp_path):
    chapter = ROOT / "chapters" / "02_score_matching.md"  # the quickest chapter with exercises
    student_path, solutions_path = write_handouts([chapter], tmp_path / "out")
    shadow = tmp_path / "no_book_tools" / "myst_nb"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('myst-nb is not installed in this kernel')\n")
    env = {"DIFFBOOK_PROFILE": "smoke", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(shadow.parent), os.environ.get("PYTHONPATH")]))}
    solved = _run(nbformat.read(solutions_path, as_version=4), chapter.parent, env)
    printed = "".join(output.get("text", "") for cell in solved.cells for output in cell.get("outputs", []))
    assert re.search(r"^\w+ = ", printed, re.M), "glue did not fall back to printing without myst-nb"
    student = nbformat.read(student_path, as_version=4)
    with pytest.raises(CellExecutionError, match="NotImplementedError") as stopped:
        _run(student, chapter.parent, env)
    first_stub = next(i for i, cell in enumerate(student.cells) if "raise NotImplementedError" in cell.source)
    assert "exercise 1:" in str(stopped.value)
    ran = [i for i, cell in enumerate(student.cells) if cell.cell_type == "code" and cell.get("execution_count")]
    assert ran and max(ran) == first_stub  # everything before the first exercise ran, and stopped there
