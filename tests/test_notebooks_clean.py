"""Committed notebooks carry no outputs or placeholders, and the table of contents points at real files.

Outputs belong to the build (every chapter is executed when the book is built), not to git:
stored outputs bloat diffs, leak the author's paths and can show results the code no longer
gives. Kernel metadata must stay, because the build starts the kernel the notebook names and
Sphinx reads ``language_info`` for syntax highlighting (a notebook without it fails ``-W``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import load_script

ROOT = Path(__file__).resolve().parent.parent
browser_check = load_script(".ci/browser_check.py")
NOTEBOOK_DIRS = ("book", "exercises")
PAGE_SUFFIXES = (".ipynb", ".md")
# Text left for a measurement to fill in ("<CPU>", "TODO"): a chapter must say what was measured.
PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]+>|\bTODO\b|\bTBD\b|\bFIXME\b")
# Source shown as printed text: a chapter shows the package's code with fedlora_edu.show_source
# (highlighted, taken from the package when it runs), never print(inspect.getsource(...)).
PRINTED_SOURCE = re.compile(r"\bgetsource\s*\(")
# A measurement typed into prose: a first-person, this-run or per-profile phrase and a number with
# decimals, a percentage or a count of test articles in the same sentence ("when we ran this, FedIT
# reached 0.406"). Such sentences come from the run instead (fedlora_edu.report in a code cell).
# Papers' own numbers are quoted without these phrases and stay allowed.
MEASURED_PHRASE = re.compile(
    r"\b(when we (last )?(ran|wrote|measured|tried)|we (measured|saw|got|found|observed)|in our (last )?runs?|"
    r"our (last )?(run|runs|measurement)|(this|the last) run (gave|showed|measured|reached|had))\b"
    r"|under `(smoke|cpu|gpu)`",
    re.IGNORECASE)
MEASURED_NUMBER = re.compile(r"\b\d+\.\d+\b|\b\d+(\.\d+)? ?%|\b\d+ (test )?articles \(of")


def typed_measurements(markdown: str) -> list[str]:
    """The sentences of ``markdown`` that state a measured number by hand (see MEASURED_PHRASE)."""
    sentences = re.split(r"(?<=[.!?])\s+|\n\n", markdown)
    return [s.strip() for s in sentences if MEASURED_PHRASE.search(s) and MEASURED_NUMBER.search(s)]


def find_notebooks() -> list[Path]:
    """Every notebook under book/ and exercises/, without Jupyter's checkpoint copies."""
    found = []
    for folder in NOTEBOOK_DIRS:
        for path in sorted((ROOT / folder).rglob("*.ipynb")):
            if ".ipynb_checkpoints" not in path.parts:
                found.append(path)
    return found


def notebook_problems(notebook: dict) -> list[str]:
    """What keeps a notebook (parsed JSON) from being committable; empty when it is clean."""
    problems = []
    metadata = notebook.get("metadata", {})
    kernelspec = metadata.get("kernelspec", {})
    if kernelspec.get("name") != "python3":
        problems.append(f"metadata.kernelspec.name should be 'python3', got {kernelspec!r}")
    if metadata.get("language_info", {}).get("name") != "python":
        problems.append("metadata.language_info is missing or not python")
    if "widgets" in metadata:
        problems.append("metadata.widgets holds saved widget state (an output)")
    # nbformat 4.5 gives every cell an id (nbformat warns without one today and will refuse later)
    ids = [cell.get("id") for cell in notebook.get("cells", [])]
    if (notebook.get("nbformat"), notebook.get("nbformat_minor", 0)) >= (4, 5):
        problems += [f"cell {index} has no id" for index, cell_id in enumerate(ids) if not cell_id]
        problems += [f"cell id {cell_id!r} is used twice" for cell_id in sorted({i for i in ids if i})
                     if ids.count(cell_id) > 1]
    for index, cell in enumerate(notebook.get("cells", [])):
        if cell.get("cell_type") == "markdown":
            source = "".join(cell.get("source", ""))
            problems += [f"cell {index} holds the placeholder {m.group()!r}" for m in PLACEHOLDER.finditer(source)]
            problems += [f"cell {index} types a measured number into prose: {sentence[:90]!r}"
                         for sentence in typed_measurements(source)]
        if cell.get("cell_type") != "code":
            continue
        if PRINTED_SOURCE.search("".join(cell.get("source", ""))):
            problems.append(f"cell {index} prints source with inspect.getsource; use fedlora_edu.show_source")
        if cell.get("outputs"):
            problems.append(f"cell {index} has outputs")
        if cell.get("execution_count") is not None:
            problems.append(f"cell {index} has execution_count {cell['execution_count']}")
    return problems


def page_start_problems(notebook: dict) -> list[str]:
    """What keeps a chapter's page from starting with the chapter: its title must come first, the Colab
    install cell must be removed from the page (``remove-cell``) and the environment cell's code hidden
    (``hide-input``); both still run, in the build and in Colab."""
    cells = notebook.get("cells", [])
    problems = []
    if not cells or cells[0].get("cell_type") != "markdown" or not "".join(cells[0].get("source", "")).startswith("# "):
        problems.append("the first cell is not the chapter's title (a markdown cell starting with '# ')")
    wanted = {"google.colab": "remove-cell", "describe_environment(": "hide-input"}
    for index, cell in enumerate(cells):
        source, tags = "".join(cell.get("source", "")), cell.get("metadata", {}).get("tags", [])
        for marker, tag in wanted.items():
            if cell.get("cell_type") == "code" and marker in source and tag not in tags:
                problems.append(f"cell {index} ({marker.rstrip('(')}) lacks the tag {tag!r}")
    return problems


def toc_files() -> list[str]:
    """Every page named in _toc.yml (root, chapters, sections), without suffix: the pages the browser check opens."""
    return browser_check.toc_pages(ROOT / "_toc.yml")


def page_path(name: str) -> Path | None:
    for suffix in PAGE_SUFFIXES:
        candidate = ROOT / (name + suffix)
        if candidate.is_file():
            return candidate
    return None


CLEAN_NOTEBOOK = {
    "cells": [
        {"cell_type": "markdown", "id": "title", "metadata": {}, "source": "# A chapter"},
        {"cell_type": "code", "execution_count": None, "id": "first", "metadata": {}, "outputs": [],
         "source": "x = 1"},
    ],
    "metadata": {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    },
    "nbformat": 4,
    "nbformat_minor": 5,
}


def test_checker_accepts_a_clean_notebook() -> None:
    assert notebook_problems(CLEAN_NOTEBOOK) == []


def test_checker_flags_outputs_counts_and_missing_metadata() -> None:
    dirty = json.loads(json.dumps(CLEAN_NOTEBOOK))
    dirty["cells"][1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "1\n"}]
    dirty["cells"][1]["execution_count"] = 3
    del dirty["metadata"]["language_info"]
    dirty["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {}}
    problems = notebook_problems(dirty)
    assert problems == [
        "metadata.language_info is missing or not python",
        "metadata.widgets holds saved widget state (an output)",
        "cell 1 has outputs",
        "cell 1 has execution_count 3",
    ]
    dirty["metadata"].pop("kernelspec")
    assert any("kernelspec" in problem for problem in notebook_problems(dirty))


def test_checker_flags_cells_without_an_id_or_with_the_same_id() -> None:
    unnamed = json.loads(json.dumps(CLEAN_NOTEBOOK))
    del unnamed["cells"][1]["id"]
    assert notebook_problems(unnamed) == ["cell 1 has no id"]
    unnamed["cells"][1]["id"] = "title"
    assert notebook_problems(unnamed) == ["cell id 'title' is used twice"]
    unnamed["nbformat_minor"] = 4  # before nbformat 4.5 cells had no ids
    del unnamed["cells"][1]["id"]
    assert notebook_problems(unnamed) == []


def test_checker_flags_placeholders_in_prose() -> None:
    unfinished = json.loads(json.dumps(CLEAN_NOTEBOOK))
    unfinished["cells"][0]["source"] = "Under `cpu` FedIT was ... <CPU>. TODO: rerun"
    assert notebook_problems(unfinished) == ["cell 0 holds the placeholder '<CPU>'",
                                             "cell 0 holds the placeholder 'TODO'"]
    unfinished["cells"][0]["source"] = "A <b>bold</b> word, a matrix A < B, and TODOS are fine."
    assert notebook_problems(unfinished) == []


def test_checker_flags_measured_numbers_typed_into_prose() -> None:
    typed = json.loads(json.dumps(CLEAN_NOTEBOOK))
    typed["cells"][0]["source"] = ("When we last ran this chapter, FedIT reached 0.406. In our runs it lost 3%.\n\n"
                                   "Under `cpu` it was 2 articles (of 200) behind. The paper reports a cosine of "
                                   "0.9998. We use lambda = 0.01. Under `cpu` each client takes 3 steps.")
    problems = notebook_problems(typed)
    assert len(problems) == 3 and all("types a measured number" in p for p in problems)
    assert "0.406" in problems[0] and "3%" in problems[1] and "2 articles" in problems[2]


def test_checker_flags_printed_source() -> None:
    printing = json.loads(json.dumps(CLEAN_NOTEBOOK))
    printing["cells"][1]["source"] = "import inspect\nprint(inspect.getsource(FedIT.aggregate))"
    assert notebook_problems(printing) == ["cell 1 prints source with inspect.getsource; use fedlora_edu.show_source"]
    printing["cells"][1]["source"] = "show_source(FedIT.aggregate)"
    assert notebook_problems(printing) == []


@pytest.mark.parametrize(
    "path", find_notebooks(), ids=lambda path: str(path.relative_to(ROOT))
)
def test_notebook_is_committed_clean(path: Path) -> None:
    notebook = json.loads(path.read_text(encoding="utf-8"))
    assert notebook.get("nbformat") == 4, f"{path.name}: not an nbformat 4 notebook"
    problems = notebook_problems(notebook)
    assert not problems, f"{path.relative_to(ROOT)}: " + "; ".join(problems) + (
        " (clear all outputs in Jupyter, then save, before committing)"
    )


def test_page_start_checker() -> None:
    chapter = json.loads(json.dumps(CLEAN_NOTEBOOK))
    assert page_start_problems(chapter) == []
    setup = {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
             "source": 'if "google.colab" in sys.modules:\n    pass'}
    chapter["cells"].insert(0, setup)
    assert page_start_problems(chapter) == [
        "the first cell is not the chapter's title (a markdown cell starting with '# ')",
        "cell 0 (google.colab) lacks the tag 'remove-cell'"]
    chapter["cells"] = [chapter["cells"][1], {**setup, "metadata": {"tags": ["remove-cell"]}}]
    assert page_start_problems(chapter) == []


@pytest.mark.parametrize("path", sorted((ROOT / "book").rglob("*.ipynb")), ids=lambda path: str(path.relative_to(ROOT)))
def test_a_chapter_page_starts_with_the_chapter(path: Path) -> None:
    problems = page_start_problems(json.loads(path.read_text(encoding="utf-8")))
    assert not problems, f"{path.relative_to(ROOT)}: " + "; ".join(problems)


def test_toc_pages_exist() -> None:
    names = toc_files()
    assert names[0] == "book/intro"
    missing = [name for name in names if page_path(name) is None]
    assert not missing, f"_toc.yml names pages that are not on disk: {missing}"


def test_every_toc_notebook_is_checked() -> None:
    """The glob above must see every notebook the book builds, or the clean check is hollow."""
    checked = set(find_notebooks())
    in_toc = [page_path(name) for name in toc_files()]
    notebooks_in_toc = [path for path in in_toc if path is not None and path.suffix == ".ipynb"]
    assert set(notebooks_in_toc) <= checked
