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

from diffbook.handouts import GLUE_SETUP, make_handout, write_handouts

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


_GATED = re.compile(r"^(`{3,}|:{3,})\{solution-start\}.*?^\1\{solution-end\}", re.M | re.S)
_CODE_CELL = re.compile(r"^```\{code-cell\}[^\n]*\n(.*?)^```", re.M | re.S)


def _solution_code(chapter):
    """The code cells inside the chapter's solution regions, found from its text (not by diffbook.handouts)."""
    return [cell for region in _GATED.finditer(chapter.read_text()) for cell in _CODE_CELL.findall(region.group(0))]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda path: path.stem)
def test_every_chapter_has_solved_asserted_exercises_and_a_clean_student_notebook(chapter):
    handout = make_handout(chapter)
    assert len(handout.exercises) >= MIN_EXERCISES, f"{chapter.name}: {len(handout.exercises)} exercises"
    for label, exercise in handout.exercises.items():
        assert exercise.solution_cells >= 1 and exercise.solution_asserts >= 1, \
            f"{chapter.name}: the solution of {label} has no code cell that asserts its answer"
    # The solutions notebook runs exactly the chapter's code, in order (after its glue setup cell): the book build
    # executes the same cells.
    book_code = [cell.source for cell in jupytext.read(chapter).cells if cell.cell_type == "code"]
    assert [cell.source for cell in handout.solutions.cells if cell.cell_type == "code"] == [GLUE_SETUP] + book_code
    # No line of solution code reaches the student notebook, unless the chapter body has the same line.
    solution_lines = _code_lines_of(_solution_code(chapter))
    assert len(_solution_code(chapter)) >= len(handout.exercises)
    body_lines = _code_lines_of([c for c in book_code if c.strip() not in {s.strip() for s in _solution_code(chapter)}])
    student_code = [cell.source for cell in handout.student.cells if cell.cell_type == "code"]
    leaked = (solution_lines - body_lines) & _code_lines_of(student_code)
    assert not leaked, f"{chapter.name}: solution code in the student notebook: {sorted(leaked)[:3]}"
    stubs = [cell for cell in student_code if "raise NotImplementedError" in cell]
    assert len(stubs) == len(handout.exercises)
    # The notebooks run wherever a teacher puts them: no paths relative to chapters/.
    assert 'Path("..")' not in "".join(book_code) and '"../' not in "".join(book_code), chapter.name


def _code_lines_of(sources):
    return {line.strip() for source in sources for line in source.splitlines()
            if line.strip() and not line.strip().startswith("#")}


def test_prose_solutions_get_a_stub_and_numbering_follows_the_book(tmp_path):
    prose_only = TOY.replace("It is four:\n\n```{code-cell} ipython3\nsecret_answer = x**2\nassert secret_answer == 4\n```\n",
                             "It is four.\n")
    handout = make_handout(_write(tmp_path, prose_only), first_number=6)
    student = "\n".join(cell.source for cell in handout.student.cells)
    assert 'raise NotImplementedError("exercise 6: toy-ex-square")' in student and "It is four" not in student
    assert student.index("Compute $x^2$") < student.index("NotImplementedError") < student.index("Text after")
    (tmp_path / "a.md").write_text(TOY)
    (tmp_path / "b.md").write_text(TOY)
    first, second = write_handouts([tmp_path / "a.md", tmp_path / "b.md"], tmp_path / "out")[::2]
    assert "exercise 1:" in first.read_text() and "exercise 2:" in second.read_text()  # numbered on, as the book


@pytest.mark.parametrize("broken, message", [
    # a solution-start closed with the wrong fence would swallow the next exercise
    (TOY.replace(":class: dropdown\n````", ":class: dropdown\n```") + TOY.split("---\n", 2)[2].replace(
        "toy-ex-square", "toy-ex-cube").replace("# Toy", ""), "inside the solution of toy-ex-square"),
    (TOY.replace("````{solution-end}\n````", "````{solution-end}\n```"), "not closed by ````"),
    (TOY.replace("````{solution-start} toy-ex-square\n:class: dropdown\n````",
                 "````{solution} toy-ex-square\n:class: dropdown"), "use the gated solution-start"),
    (TOY.replace("kernelspec: {display_name: Python 3, language: python, name: python3}\n", ""), "not a notebook"),
])
def test_mistakes_that_would_lose_an_exercise_are_refused(tmp_path, broken, message):
    with pytest.raises(ValueError, match=message):
        make_handout(_write(tmp_path, broken))


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
    glued = re.findall(r'glue\("(\w+)"', chapter.read_text())
    missing = [name for name in glued if not re.search(rf"^{name} = ", printed, re.M)]
    assert glued and not missing, f"glued values not printed without myst-nb: {missing[:5]}"
    student = nbformat.read(student_path, as_version=4)
    with pytest.raises(CellExecutionError, match="NotImplementedError") as stopped:
        _run(student, chapter.parent, env)
    first_stub = next(i for i, cell in enumerate(student.cells) if "raise NotImplementedError" in cell.source)
    assert "exercise 1:" in str(stopped.value)
    ran = [i for i, cell in enumerate(student.cells) if cell.cell_type == "code" and cell.get("execution_count")]
    assert ran and max(ran) == first_stub  # everything before the first exercise ran, and stopped there
