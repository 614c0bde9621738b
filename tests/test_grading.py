"""Grading a class: six kinds of submission, one score table, in bounded time."""

from __future__ import annotations

import json
import time

import pytest

from fedlora_edu.teaching.grading import COLUMNS, exercises_asked, grade_folder, main

IMPORT = "from fedlora_edu.teaching.exercises import check"
RIGHT = """def ideal_update(As, Bs, weights):
    return sum(p * B @ A for A, B, p in zip(As, Bs, weights))"""
FEDIT = """def ideal_update(As, Bs, weights):  # the product of the averages: FedIT's, not the ideal
    A = sum(p * A for A, p in zip(As, weights))
    B = sum(p * B for B, p in zip(Bs, weights))
    return B @ A"""
RAISING = """def ideal_update(As, Bs, weights):
    raise RuntimeError("forgot to finish")"""
UNTOUCHED = """def discordance(As, Bs, weights):
    raise NotImplementedError"""


def notebook(*cells: str, markdown: str = "# Exercises") -> str:
    return json.dumps({"cells": [{"cell_type": "markdown", "metadata": {}, "source": markdown}]
                       + [{"cell_type": "code", "metadata": {}, "source": source, "outputs": [],
                           "execution_count": None} for source in cells],
                       "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                   "language": "python"}},
                       "nbformat": 4, "nbformat_minor": 5})


def test_exercises_asked_are_read_from_the_check_calls():
    parsed = json.loads(notebook(IMPORT, RIGHT, 'print(check("ideal_update", ideal_update))',
                                 "check( 'discordance', discordance)  # again: check('ideal_update', f)"))
    assert exercises_asked(parsed) == ["ideal_update", "discordance"]


@pytest.mark.waits  # it waits out a timeout: run beside the others, see tasks.py's unit_tests
def test_six_kinds_of_submission_give_a_six_row_table_in_bounded_time(tmp_path):
    folder = tmp_path / "submissions"
    folder.mkdir()
    checks = ['print(check("ideal_update", ideal_update))', 'print(check("discordance", discordance))']
    (folder / "good.ipynb").write_text(notebook(IMPORT, RIGHT, UNTOUCHED, *checks))
    (folder / "wrong.ipynb").write_text(notebook(IMPORT, FEDIT, UNTOUCHED, *checks))
    (folder / "raising.ipynb").write_text(notebook(IMPORT, "1 / 0", RAISING, UNTOUCHED, *checks))
    # it never ends, but sleeps: a busy loop would take a core from the other test worker for the whole timeout
    (folder / "looping.ipynb").write_text(notebook(IMPORT, RIGHT, "import time\n\nwhile True:\n    time.sleep(0.05)",
                                                   *checks))
    (folder / "empty.ipynb").write_text(notebook(markdown="# nothing here yet"))
    (folder / "notes.txt").write_text("I could not open Jupyter")
    # ample for a kernel start and the checks while other test workers keep both cores busy; the looping one
    # runs into it
    timeout = 60.0
    started = time.monotonic()
    out = tmp_path / "scores.csv"
    table = grade_folder(folder, timeout=timeout, out=out)
    assert time.monotonic() - started < 5 * timeout
    assert list(table.columns) == COLUMNS and len(table) == 6 and out.exists()
    rows = table.set_index("submission")
    assert rows.loc["good.ipynb", ["status", "passed", "not attempted", "score"]].tolist() == ["graded", 1, 1, 0.5]
    wrong = rows.loc["wrong.ipynb"]
    assert wrong["status"] == "graded" and wrong["failed"] == 1 and wrong["score"] == 0
    assert "failed: ideal_update" in wrong["detail"]
    raising = rows.loc["raising.ipynb"]  # a cell that raises does not stop the cells after it
    assert raising["status"] == "graded" and raising["failed"] == 1 and raising["not attempted"] == 1
    looping = rows.loc["looping.ipynb"]
    assert looping["status"] == "timed out" and looping["score"] == 0 and looping["missing"] == 2
    assert rows.loc["empty.ipynb", "status"] == "empty" and rows.loc["notes.txt", "status"] == "not a notebook"


def test_the_command_names_a_bad_folder(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        grade_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="timeout"):
        grade_folder(tmp_path, timeout=0)
    with pytest.raises(SystemExit):
        main([])
