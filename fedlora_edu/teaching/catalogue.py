"""How many exercises each chapter has: in the book (with an executed solution) and autograded.

A chapter's in-book exercise is a markdown paragraph that starts ``**Exercise N``; it has a
solution when a code cell of the same notebook starts ``# Solution to exercise N`` (collapsed on
the page by its ``hide-cell`` tag, executed by every build). An autograded exercise is one that a
teacher's notebook in ``exercises/source/`` checks (``check("name", ...)``); the chapter it goes
with is the one its :class:`~fedlora_edu.teaching.checking.Exercise` names.

``python -m fedlora_edu.teaching.catalogue`` prints the table for the repository it runs in.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from fedlora_edu.teaching.exercises import EXERCISES

_EXERCISE = re.compile(r"^\*\*Exercise (\d+)", re.MULTILINE)
_SOLUTION = re.compile(r"^# Solution to exercises? (\d+)(?:(?: and |, )(\d+))*")
_CHECK = re.compile(r"""\bcheck\(\s*["']([A-Za-z0-9_]+)["']""")
PARTS = ("part1", "part2", "part3", "part4")
"""The parts whose chapters must each have exercises (issue 16: Parts I to IV)."""


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8")).get("cells", [])


def in_book_exercises(path: Path | str) -> tuple[list[int], list[int]]:
    """(every exercise number of the chapter at ``path``, the numbers that have a solution cell)."""
    numbers: set[int] = set()
    solved: set[int] = set()
    for cell in _cells(Path(path)):
        text = "".join(cell.get("source", []))
        if cell.get("cell_type") == "markdown":
            numbers.update(int(n) for n in _EXERCISE.findall(text))
        elif cell.get("cell_type") == "code":
            first = text.lstrip().splitlines()[0] if text.strip() else ""
            match = _SOLUTION.match(first)
            if match:
                solved.update(int(n) for n in re.findall(r"\d+", first[:match.end()]))
    return sorted(numbers), sorted(solved & numbers)


def autograded_exercises(folder: Path | str) -> dict[str, list[str]]:
    """Chapter (as ``part2/full_size``) -> the exercises the teacher's notebooks in ``folder`` check for it."""
    by_chapter: dict[str, list[str]] = {}
    for path in sorted(Path(folder).glob("*.ipynb")):
        for chapter, names in autograded_exercises_in(path).items():
            known = by_chapter.setdefault(chapter, [])
            known.extend(name for name in names if name not in known)
    return by_chapter


def notebooks_by_chapter(folder: Path | str) -> dict[str, list[str]]:
    """Chapter -> the names of the notebooks in ``folder`` that check one of its exercises (where to link)."""
    found: dict[str, list[str]] = {}
    for path in sorted(Path(folder).glob("*.ipynb")):
        for chapter in autograded_exercises_in(path):
            found.setdefault(chapter, []).append(path.name)
    return found


def autograded_exercises_in(path: Path | str) -> dict[str, list[str]]:
    """Chapter -> the exercises the one notebook at ``path`` checks for it."""
    by_chapter: dict[str, list[str]] = {}
    for cell in _cells(Path(path)):
        if cell.get("cell_type") != "code":
            continue
        for name in _CHECK.findall("".join(cell.get("source", []))):
            if name not in EXERCISES:
                raise ValueError(f"{Path(path).name} checks an unknown exercise {name!r}")
            names = by_chapter.setdefault(EXERCISES[name].chapter, [])
            if name not in names:
                names.append(name)
    return by_chapter


def exercise_table(root: Path | str) -> list[dict]:
    """One row per chapter of Parts I to IV: its in-book exercises, how many have a solution, its autograded ones."""
    root = Path(root)
    autograded = autograded_exercises(root / "exercises" / "source")
    rows = []
    for part in PARTS:
        for path in sorted((root / "book" / part).glob("*.ipynb")):
            chapter = f"{part}/{path.stem}"
            numbers, solved = in_book_exercises(path)
            names = autograded.get(chapter, [])
            kinds = [EXERCISES[name].kind for name in names]
            rows.append({"chapter": chapter, "in book": len(numbers), "with solution": len(solved),
                         "autograded": len(names), "experiment": kinds.count("experiment"),
                         "exercises": ", ".join(names)})
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as a fixed-width text table."""
    header = f"{'chapter':34s} {'in book':>7s} {'solved':>6s} {'autograded':>10s} {'experiment':>10s}  exercises"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['chapter']:34s} {row['in book']:7d} {row['with solution']:6d} {row['autograded']:10d} "
                     f"{row['experiment']:10d}  {row['exercises']}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - a command for teachers and the team
    print(format_table(exercise_table(Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd())))
