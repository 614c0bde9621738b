"""One source for the exercises: the student notebooks are generated from the teacher's, and are current."""

from __future__ import annotations

import json

import pytest
from helpers import ROOT

from fedlora_edu.teaching.exercises import EXERCISES, GRADE_REPORT_ENV
from fedlora_edu.teaching.handouts import (
    BEGIN,
    END,
    STUB,
    build,
    has_solution,
    solution_namespace,
    strip_solutions,
    student_version,
)

SOURCES = sorted((ROOT / "exercises" / "source").glob("*.ipynb"))


def test_every_student_notebook_is_generated_from_a_current_source():
    assert SOURCES, "no teacher's notebooks in exercises/source"
    assert build(ROOT / "exercises", check_only=True) == [], "run: python -m fedlora_edu.teaching.handouts"
    students = sorted(p.name for p in (ROOT / "exercises").glob("*.ipynb"))
    assert students == [p.name for p in SOURCES]  # no student notebook without its source


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_no_answer_reaches_the_student(source):
    notebook = json.loads(source.read_text(encoding="utf-8"))
    student = json.dumps(student_version(notebook))
    answers = [cell for cell in notebook["cells"] if has_solution(cell)]
    assert answers
    for cell in answers:
        code = "".join(cell["source"])
        inside = code.split(BEGIN, 1)[1].split(END, 1)[0]
        for line in inside.splitlines():
            if line.strip():
                assert json.dumps(line)[1:-1] not in student, line
    assert "BEGIN SOLUTION" not in student and "END SOLUTION" not in student
    assert all("solution" not in cell.get("metadata", {}).get("tags", [])
               for cell in json.loads(student)["cells"])


def test_stubs_keep_the_indentation_and_what_surrounds_them():
    code = f"def f(x):\n    y = 1\n    {BEGIN}\n    return x + y\n    {END}\n\nprint(f)\n"
    assert strip_solutions(code) == f"def f(x):\n    y = 1\n    {STUB}\n\nprint(f)\n"


@pytest.mark.parametrize("code, problem", [
    (f"{BEGIN}\nx = 1\n", "without its"),
    (f"x = 1\n{END}\n", "without a"),
    (f"{BEGIN}\n{BEGIN}\n{END}\n", "inside another"),
])
def test_broken_markers_are_named(code, problem):
    with pytest.raises(ValueError, match=problem):
        strip_solutions(code, "exercise cell 3")


def test_a_notebook_without_answers_is_refused():
    notebook = {"cells": [{"cell_type": "code", "source": "x = 1\n", "metadata": {}, "outputs": []}]}
    with pytest.raises(ValueError, match="marks no answer"):
        student_version(notebook, "empty.ipynb")


def test_the_solution_namespace_holds_the_answers_and_runs_no_check(tmp_path, monkeypatch):
    report = tmp_path / "report.jsonl"
    monkeypatch.setenv(GRADE_REPORT_ENV, str(report))
    for source in SOURCES:
        namespace = solution_namespace(source)
        assert any(callable(value) and name in EXERCISES for name, value in namespace.items()), source
    assert not report.exists()  # no check cell ran: a check would have written its outcome here


@pytest.mark.parametrize("path", sorted((ROOT / "exercises").glob("*.ipynb")), ids=lambda p: p.name)
def test_an_untouched_student_version_reports_every_check_as_not_attempted(path, capsys):
    """Run the student's notebook as handed out (answers are stubs): each check says "not attempted", none fails."""
    notebook = json.loads(path.read_text(encoding="utf-8"))
    namespace: dict = {"__name__": "__main__"}
    checks = 0
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        if "google.colab" in source:  # the Colab install cell (an IPython magic)
            continue
        exec(compile(source, f"{path.name} cell", "exec"), namespace)  # noqa: S102 (our own notebooks)
        checks += source.count("print(check(")
    printed = [line for line in capsys.readouterr().out.splitlines() if ": not attempted yet (" in line]
    assert checks > 0 and len(printed) == checks, (checks, printed)
