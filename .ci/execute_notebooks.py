"""Execute notebooks once each, a few at a time, and keep the executed copies.

    python .ci/execute_notebooks.py --output _build/executed --workers 2 book/part1/lora.ipynb ...

Each notebook runs top to bottom in a fresh kernel of this Python, with its own folder as the
working directory (as Jupyter and the book build run it); the executed copy, outputs included,
is written to the same relative path under ``--output``. A cell that raises fails that notebook:
its error is printed with the cell that raised, and the exit code is 1. ``tasks.py test`` builds
the book from these copies without executing anything again.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def execute(path: str, output: str, timeout: int) -> tuple[str, float, str | None]:
    """Run one notebook; return (path, seconds, error message or None)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    source = (ROOT / path).resolve()
    notebook = nbformat.read(source, as_version=4)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(source.parent)}})
    started = time.monotonic()
    error = None
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as failure:
        error = str(failure)
    except Exception as failure:  # a kernel that died, a notebook that cannot start: report, do not hang
        error = f"{type(failure).__name__}: {failure}"
    seconds = time.monotonic() - started
    if error is None:
        target = Path(output) / source.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, target)
    return path, seconds, error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", help="notebooks, relative to the repository root")
    parser.add_argument("--output", required=True, help="folder for the executed copies")
    parser.add_argument("--workers", type=int, default=2, help="notebooks executed at the same time")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds a cell may run")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    failed = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(execute, path, args.output, args.timeout) for path in args.notebooks]
        for done, future in enumerate(as_completed(futures), start=1):
            path, seconds, error = future.result()
            status = "ok" if error is None else "FAILED"
            print(f"[notebooks] {done}/{len(futures)} {status:6} {seconds:6.0f} s  {path}", flush=True)
            if error is not None:
                failed.append(path)
                print(error, flush=True)
    if failed:
        print(f"[notebooks] {len(failed)} of {len(args.notebooks)} failed: {', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
