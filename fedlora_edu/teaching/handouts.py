"""One source for an exercise notebook's student and solution versions.

A teacher writes (and CI runs) the *solution* notebook, ``exercises/source/<name>.ipynb``: in each
code cell that holds an answer, the answer sits between a line ``# BEGIN SOLUTION`` and a line
``# END SOLUTION``; a cell tagged ``solution`` (a teacher's note) belongs to the solution version
only. The *student* notebook, ``exercises/<name>.ipynb``, is generated from it: each marked region
becomes ``raise NotImplementedError`` at the region's indentation, the tagged cells are left out,
and every output is cleared, so the two cannot drift and no answer reaches a student. (The convention of nbgrader
and otter-grader, written for this book.)

    python -m fedlora_edu.teaching.handouts             # write every student version
    python -m fedlora_edu.teaching.handouts --check     # fail when a student version is not current

:func:`solution_namespace` runs a source notebook's answer cells and returns what they define,
for the tests that check every solution with :func:`~fedlora_edu.teaching.exercises.check`.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import sys
from pathlib import Path
from typing import Any

BEGIN = "# BEGIN SOLUTION"
END = "# END SOLUTION"
STUB = "raise NotImplementedError"
SOLUTION_TAG = "solution"


def _source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def has_solution(cell: dict) -> bool:
    """Whether a cell is a code cell with a marked answer."""
    return cell.get("cell_type") == "code" and any(line.strip() == BEGIN for line in _source(cell).splitlines())


def strip_solutions(code: str, where: str = "cell") -> str:
    """``code`` with every marked answer replaced by ``raise NotImplementedError`` at the marker's indentation.

    Raises ValueError, naming ``where``, for a BEGIN without its END, an END without a BEGIN, or
    markers nested.
    """
    lines, out, inside = code.splitlines(), [], False
    for number, line in enumerate(lines, start=1):
        marker = line.strip()
        if marker == BEGIN:
            if inside:
                raise ValueError(f"{where}, line {number}: {BEGIN!r} inside another solution region")
            inside = True
            out.append(line[: len(line) - len(line.lstrip())] + STUB)
        elif marker == END:
            if not inside:
                raise ValueError(f"{where}, line {number}: {END!r} without a {BEGIN!r} before it")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: {BEGIN!r} without its {END!r}")
    return "\n".join(out) + ("\n" if code.endswith("\n") else "")


def student_version(notebook: dict, name: str = "notebook") -> dict:
    """The student notebook of a solution ``notebook`` (nbformat 4 as a dict).

    Answers stubbed, cells tagged ``solution`` left out, outputs cleared.
    """
    student = copy.deepcopy(notebook)
    if not any(has_solution(cell) for cell in student.get("cells", [])):
        raise ValueError(f"{name} marks no answer ({BEGIN!r} ... {END!r}): nothing for a student to write")
    student["cells"] = [cell for cell in student["cells"]
                        if SOLUTION_TAG not in cell.get("metadata", {}).get("tags", [])]
    for index, cell in enumerate(student["cells"]):
        if cell.get("cell_type") != "code":
            continue
        code = strip_solutions(_source(cell), f"{name}, cell {index}")
        cell["source"] = code.splitlines(keepends=True)
        cell["outputs"] = []
        cell["execution_count"] = None
    return student


def _imports_only(cell: dict) -> bool:
    """A code cell made of import statements only (the answers' ``import torch``)."""
    if cell.get("cell_type") != "code":
        return False
    try:
        body = ast.parse(_source(cell)).body
    except SyntaxError:  # IPython magics (the Colab install cell)
        return False
    return bool(body) and all(isinstance(node, (ast.Import, ast.ImportFrom)) for node in body)


def solution_namespace(path: Path | str) -> dict[str, Any]:
    """What the answer cells of a solution notebook define, run in order in one fresh namespace.

    Only the cells with a marked answer and the cells that only import run (not the install or
    check cells), so a test can take the reference solutions without executing the notebook.
    """
    notebook = json.loads(Path(path).read_text(encoding="utf-8"))
    namespace: dict[str, Any] = {"__name__": f"solutions of {Path(path).name}"}
    for cell in notebook.get("cells", []):
        if has_solution(cell) or _imports_only(cell):
            exec(compile(_source(cell), str(path), "exec"), namespace)  # noqa: S102 (the book's own notebooks)
    return namespace


def _dump(notebook: dict) -> str:
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def build(folder: Path | str = "exercises", check_only: bool = False) -> list[Path]:
    """Write (or, with ``check_only``, compare) the student version of every ``<folder>/source/*.ipynb``.

    Returns the student notebooks that were out of date (all of them written unless ``check_only``).
    Each file is written whole, through a temporary file in the same folder, so a failure leaves
    the old version in place.
    """
    folder = Path(folder)
    sources = sorted((folder / "source").glob("*.ipynb"))
    if not sources:
        raise FileNotFoundError(f"no solution notebooks in {folder / 'source'}")
    stale = []
    for source in sources:
        target = folder / source.name
        wanted = _dump(student_version(json.loads(source.read_text(encoding="utf-8")), str(source)))
        if target.exists() and target.read_text(encoding="utf-8") == wanted:
            continue
        stale.append(target)
        if not check_only:
            partial = target.with_suffix(".ipynb.partial")
            partial.write_text(wanted, encoding="utf-8")
            partial.replace(target)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="exercises", help="the exercises folder (with source/ inside)")
    parser.add_argument("--check", action="store_true", help="only say which student versions are not current")
    args = parser.parse_args(argv)
    stale = build(args.folder, check_only=args.check)
    for path in stale:
        print(f"{'not current' if args.check else 'wrote'}: {path}")
    if args.check and stale:
        print("run: python -m fedlora_edu.teaching.handouts", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
