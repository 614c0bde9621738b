"""Grading a class: a folder of submitted exercise notebooks in, a score table out.

    python -m fedlora_edu.teaching.grading submissions/ --timeout 600   # writes submissions-scores.csv beside it

Each submission runs in a process of its own (a fresh kernel, under a time limit for the whole
notebook), with every cell executed even after one raises. Each call of
:func:`~fedlora_edu.teaching.exercises.check` in it records its outcome (passed, failed, not
attempted) in a report file the grader names through the environment variable
:data:`~fedlora_edu.teaching.exercises.GRADE_REPORT_ENV`; the exercises a notebook calls
``check`` for are read from its source, so an exercise whose cell never ran counts as missing.
A submission that is not a notebook, holds no code, runs past the limit or kills its kernel
is scored 0 with the reason, and the run goes on to the next one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from fedlora_edu.teaching.exercises import GRADE_REPORT_ENV

CHECK_CALL = re.compile(r"""\bcheck\(\s*["']([A-Za-z_][A-Za-z0-9_]*)["']""")
"""A call of ``check("name", ...)`` in a notebook's code: the exercises the notebook asks for."""
COLUMNS = ["submission", "status", "score", "passed", "failed", "not attempted", "missing", "seconds", "detail"]


def exercises_asked(notebook: dict) -> list[str]:
    """The exercises a notebook checks, in order of first appearance (from the source of its code cells)."""
    names: list[str] = []
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") == "code":
            source = cell.get("source", "")
            source = "".join(source) if isinstance(source, list) else source
            names += [name for name in CHECK_CALL.findall(source) if name not in names]
    return names


def _read_notebook(path: Path) -> tuple[dict | None, str]:
    """(the notebook, "") or (None, why it is not one)."""
    if path.suffix != ".ipynb":
        return None, f"not a notebook (a {path.suffix or 'file without extension'})"
    try:
        notebook = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"not a notebook ({type(error).__name__})"
    if not isinstance(notebook, dict) or not isinstance(notebook.get("cells"), list):
        return None, "not a notebook (no cells)"
    return notebook, ""


def _run_notebook(path: Path, report: Path) -> None:
    """Execute ``path`` in a fresh kernel, every cell even after an error, with ``report`` as the check log."""
    import nbformat
    from nbclient import NotebookClient

    os.environ[GRADE_REPORT_ENV] = str(report)
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=None, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()


def grade_submission(path: Path, timeout: float = 600.0) -> dict:
    """One row of the score table for the submission at ``path`` (see the module docstring)."""
    path = Path(path)
    row = dict.fromkeys(COLUMNS, 0)
    row.update(submission=path.name, status="graded", score=0.0, seconds=0.0, detail="")
    notebook, why = _read_notebook(path)
    if notebook is None:
        return {**row, "status": "not a notebook", "detail": why}
    asked = exercises_asked(notebook)
    if not asked:
        return {**row, "status": "empty", "detail": "no check(...) call: no exercise to grade"}
    with tempfile.TemporaryDirectory(prefix="fedlora-grade-") as scratch:
        report = Path(scratch) / "report.jsonl"
        started = time.monotonic()
        process = subprocess.Popen(  # its own session, so the limit stops the kernel it starts too
            [sys.executable, "-m", "fedlora_edu.teaching.grading", "--run", str(path.resolve()), "--report",
             str(report)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=timeout)
            status = "graded" if process.returncode == 0 else "crashed"
            detail = "" if status == "graded" else output.decode(errors="replace").strip().splitlines()[-1:]
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            status, detail = "timed out", f"still running after {timeout:g} s"
        seconds = time.monotonic() - started
        outcomes: dict[str, str] = {}
        if report.exists():
            for line in report.read_text(encoding="utf-8").splitlines():
                entry = json.loads(line)
                outcomes[entry["exercise"]] = entry["outcome"]  # the last check of an exercise counts
    counts = {key: sum(outcomes.get(name) == key for name in asked) for key in ("passed", "failed", "not attempted")}
    missing = [name for name in asked if name not in outcomes]
    failed_names = [name for name in asked if outcomes.get(name) == "failed"]
    notes = ([f"failed: {', '.join(failed_names)}"] if failed_names else []) + \
        ([f"never checked: {', '.join(missing)}"] if missing else [])
    if detail:
        notes.insert(0, detail if isinstance(detail, str) else (detail[0] if detail else "the kernel died"))
    return {**row, "status": status, "score": counts["passed"] / len(asked), **counts, "missing": len(missing),
            "seconds": round(seconds, 1), "detail": "; ".join(notes)}


def grade_folder(folder: Path, *, timeout: float = 600.0, out: Path | None = None) -> pd.DataFrame:
    """Grade every file in ``folder`` (hidden files left out), one row each, sorted by name; write ``out`` (CSV)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder of submissions")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    table = pd.DataFrame([grade_submission(path, timeout) for path in files], columns=COLUMNS)
    if out is not None:
        partial = Path(out).with_suffix(".partial")
        table.to_csv(partial, index=False)
        partial.replace(out)  # a table written whole or not at all
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, help="the folder of submitted notebooks")
    parser.add_argument("--out", type=Path, default=None, help="where to write the score table (CSV)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a whole submission may run")
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)  # internal: run one notebook
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run is not None:
        _run_notebook(args.run, args.report)
        return 0
    if args.folder is None:
        parser.error("name the folder of submissions")
    out = args.out if args.out is not None else args.folder.parent / f"{args.folder.name}-scores.csv"
    table = grade_folder(args.folder, timeout=args.timeout, out=out)
    with pd.option_context("display.width", 160, "display.max_colwidth", 60):
        print(table.drop(columns=["detail"]).to_string(index=False))
    print(f"\n{len(table)} submissions, mean score {table['score'].mean():.2f}; table written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
