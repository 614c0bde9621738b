"""The exercise count per chapter: how it is counted, and the table for this repository (printed)."""

from __future__ import annotations

import json

import pytest
from helpers import ROOT

from fedlora_edu.teaching.catalogue import (
    autograded_exercises,
    exercise_table,
    format_table,
    in_book_exercises,
    notebooks_by_chapter,
)
from fedlora_edu.teaching.exercises import EXERCISES


def _notebook(tmp_path, cells):
    path = tmp_path / "chapter.ipynb"
    notebook = {"cells": [{"cell_type": kind, "source": [text], "metadata": {}} for kind, text in cells]}
    path.write_text(json.dumps(notebook))
    return path


def test_an_exercise_counts_as_solved_only_with_its_solution_cell(tmp_path):
    path = _notebook(tmp_path, [
        ("markdown", "## Exercises\n\n**Exercise 1.** Prove it."),
        ("code", "# Solution to exercise 1\nassert True"),
        ("markdown", "**Exercise 2** (a longer run). Run it."),
        ("markdown", "**Exercise 3.** Measure it."),
        ("code", "x = 1  # Solution to exercise 3 is not at the start of the cell"),
        ("code", "# solution to exercise 2, lower case, does not count"),
    ])
    assert in_book_exercises(path) == ([1, 2, 3], [1])


def test_every_checked_exercise_belongs_to_a_chapter_of_the_book():
    for chapter, names in autograded_exercises(ROOT / "exercises" / "source").items():
        assert (ROOT / "book" / f"{chapter}.ipynb").exists(), (chapter, names)
    assert all(exercise.chapter for exercise in EXERCISES.values())


def test_an_unknown_exercise_in_a_teachers_notebook_is_an_error(tmp_path):
    (tmp_path / "x.ipynb").write_text(json.dumps({"cells": [
        {"cell_type": "code", "source": ['print(check("no_such_exercise", f))'], "metadata": {}}]}))
    with pytest.raises(ValueError, match="no_such_exercise"):
        autograded_exercises(tmp_path)


def test_print_the_exercise_count_per_chapter(capsys):
    rows = exercise_table(ROOT)
    assert {row["chapter"].split("/")[0] for row in rows} == {"part1", "part2", "part3", "part4"}
    with capsys.disabled():
        print("\nexercises per chapter (issue 16 asks for >= 3 in the book with a solution and >= 2 autograded, "
              "one of them an experiment):\n" + format_table(rows))


def test_every_chapter_has_three_solved_exercises_and_two_autograded_one_an_experiment():
    short = [row for row in exercise_table(ROOT)
             if row["with solution"] < 3 or row["autograded"] < 2 or row["experiment"] < 1]
    assert not short, format_table(short)


def test_every_chapter_links_the_notebooks_that_hold_its_autograded_exercises():
    missing = {}
    for chapter, notebooks in notebooks_by_chapter(ROOT / "exercises" / "source").items():
        cells = json.loads((ROOT / "book" / f"{chapter}.ipynb").read_text(encoding="utf-8"))["cells"]
        text = "".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "markdown")
        absent = [name for name in notebooks if f"exercises/{name}" not in text]
        if absent:
            missing[chapter] = absent
    assert not missing
