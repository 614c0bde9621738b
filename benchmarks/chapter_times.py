"""Wall time of every chapter of the book under a profile, and the README budget table.

Executes each notebook listed in ``_toc.yml`` in a fresh kernel, one after another (as a reader
would run them), with the chosen ``FEDLORA_PROFILE`` and the Hugging Face hub switched off, and
times it. Prints a table, writes ``benchmarks/results/chapter_times_<profile>.json`` with the
provenance of the run (device, versions, profile, date, commit), and with ``--update-readme``
rewrites the budget table in README.md from every ``chapter_times_*.json`` present.

    .venv/bin/python benchmarks/chapter_times.py --profile smoke --profile cpu --update-readme

The budgets, on the 2-core reference machine: at most 43 s a chapter under ``smoke`` and at most 3
minutes a chapter under ``cpu``. Each run says whether it met them. (The foundation issue gave
``smoke`` 10 minutes for every chapter together when the book had 14; at 30 chapters the fixed cost
of a fresh kernel, the imports and the model alone is about 550 s there, so the budget became the
foundation's per chapter, 600 s / 14 = 43 s: see README, "Budgets".)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
START_MARK = "<!-- chapter-times:start (written by benchmarks/chapter_times.py) -->"
END_MARK = "<!-- chapter-times:end -->"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# Budgets in seconds, for each chapter. Smoke's is the foundation's 10 minutes for the 14 chapters it was set
# for, per chapter (600 / 14, rounded down).
SMOKE_CHAPTER_BUDGET = 43.0
CPU_CHAPTER_BUDGET = 180.0
# The budgets hold on the slowest 2-core machine this project has run on, an AMD EPYC with AVX2 and no
# AVX-512, where a 1024 x 1024 float32 matrix product ran at 54 GFLOP/s on one thread and 103 on two
# (2026-12-02). The chapters' time is the base model's matrix products, so a run elsewhere is scaled
# by the ratio of that speed measured at the start of the run (two threads) to the reference's.
REFERENCE_MACHINE = "the 2-core AMD EPYC with AVX2 only"
REFERENCE_GFLOPS = 103.0


def matmul_gflops(threads: int, size: int = 1024, repeats: int = 20) -> float:
    """Best speed of a size x size float32 matrix product on ``threads`` torch threads, in GFLOP/s."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - started)
    finally:
        torch.set_num_threads(before)
    return 2 * size**3 / best / 1e9


def reference_scale(result: dict) -> float | None:
    """How many times longer a chapter would take on the reference machine (None if the run did not measure it)."""
    speed = result["provenance"].get("matmul_gflops", {}).get("2")
    return None if speed is None else speed / REFERENCE_GFLOPS


def chapters() -> list[Path]:
    """The notebooks of the book, in the order of ``_toc.yml``."""
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    files: list[str] = []

    def walk(entries: list[dict]) -> None:
        for entry in entries:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("chapters", []) + entry.get("sections", []))

    walk(toc.get("parts", []) + toc.get("chapters", []))
    return [ROOT / f"{name}.ipynb" for name in files if (ROOT / f"{name}.ipynb").exists()]


def time_notebook(path: Path, timeout: int) -> float:
    """Execute one notebook in a fresh kernel from its own folder; return the wall seconds."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    start = time.perf_counter()
    client.execute()
    return time.perf_counter() - start


def exec_notebook(path: Path) -> None:
    """Run a notebook's code cells in this process, in order, as plain Python (``--runner exec``).

    For machines without Jupyter (the lent GPU machine has none): IPython magics (lines that
    start with ``%`` or ``!``, such as the Colab install cell's) become ``pass``, ``display`` prints,
    and figures go to matplotlib's Agg backend.
    """
    import matplotlib

    matplotlib.use("Agg")
    notebook = json.loads(path.read_text(encoding="utf-8"))
    namespace: dict = {"__name__": "__main__", "display": print}
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        lines = [line[: len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("%", "!")) else line
                 for line in source.splitlines()]
        code = "\n".join(lines)
        exec(compile(code, f"{path.name}[cell {index}]", "exec"), namespace)  # noqa: S102


def time_notebook_exec(path: Path, timeout: int) -> float:
    """Run :func:`exec_notebook` in a fresh interpreter from the notebook's folder; wall seconds."""
    import subprocess

    start = time.perf_counter()
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--exec-one", str(path)], cwd=path.parent,
                   check=True, timeout=timeout)
    return time.perf_counter() - start


def run_profile(profile: str, timeout: int, runner: str = "kernel", only: list[str] | None = None) -> dict:
    """Time every chapter under one profile; the kernels inherit this process's environment.

    The result file is rewritten after each chapter (``complete`` false until the last), so a
    run cut short still leaves what it measured. A run limited by ``only`` writes its own file,
    ``chapter_times_<profile>_only.json``, which the README table does not read: it never
    replaces the measurement of the whole book.
    """
    from tqdm.auto import tqdm

    os.environ.update(OFFLINE_ENV)
    os.environ["FEDLORA_PROFILE"] = profile
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    sys.path.insert(0, str(ROOT))
    from fedlora_edu.simulation.profiles import provenance

    selected = [path for path in chapters() if not only or any(str(path.relative_to(ROOT)).startswith(o) for o in only)]
    timer = time_notebook if runner == "kernel" else time_notebook_exec
    result = {"benchmark": "chapter_times", "runner": runner, "provenance": provenance(profile), "chapters": [],
              "total_seconds": 0.0, "complete": False, "only": only or None}
    result["provenance"]["matmul_gflops"] = {str(n): round(matmul_gflops(n), 1) for n in (1, 2)}
    for path in tqdm(selected, desc=f"chapters ({profile})", unit="chapter"):
        seconds = timer(path, timeout)
        result["chapters"].append({"chapter": str(path.relative_to(ROOT)), "seconds": round(seconds, 1)})
        result["total_seconds"] = round(sum(row["seconds"] for row in result["chapters"]), 1)
        tqdm.write(f"{profile:>5}  {seconds:7.1f} s  {path.relative_to(ROOT)}")
        write_result(profile, result)
    result["complete"] = len(result["chapters"]) == len(chapters())
    write_result(profile, result)
    return result


def result_path(profile: str, only: list[str] | None = None) -> Path:
    """Where a run's JSON goes: one file per profile, another for runs limited by ``--only``."""
    return RESULTS / (f"chapter_times_{profile}_only.json" if only else f"chapter_times_{profile}.json")


def write_result(profile: str, result: dict) -> Path:
    """Write the JSON atomically: a reader never sees half a file."""
    out = result_path(profile, result.get("only"))
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out)
    return out


def verdict(result: dict) -> str:
    """Whether a run met its profile's budget, judged on the reference machine where the run measured its speed."""
    profile = result["provenance"]["profile"]
    scale = reference_scale(result)

    def judged(seconds: float, budget: float) -> str:
        if scale is None:
            return f"budget {budget:.0f} s: {'met' if seconds <= budget else 'MISSED'} here (speed not measured)"
        there = seconds * scale
        return (f"about {there:.0f} s on {REFERENCE_MACHINE} (x{scale:.2f}, from the matrix-product speed), "
                f"budget {budget:.0f} s: {'met' if there <= budget else 'MISSED'}")

    if profile in ("smoke", "cpu"):
        worst = max(row["seconds"] for row in result["chapters"])
        budget = SMOKE_CHAPTER_BUDGET if profile == "smoke" else CPU_CHAPTER_BUDGET
        return (f"slowest chapter {worst:.0f} s here, {judged(worst, budget)} each"
                + (f" (all {len(result['chapters'])} together {result['total_seconds']:.0f} s here)"
                   if profile == "smoke" else ""))
    return f"total {result['total_seconds']:.0f} s (real scale; no budget in seconds)"


def readme_table() -> str:
    """The budget table, one column per profile measured, from the JSON files present."""
    results = {}
    for file in sorted(RESULTS.glob("chapter_times_*.json")):
        result = json.loads(file.read_text(encoding="utf-8"))
        if result.get("only"):
            continue  # a run of some chapters only (--only) does not stand for the book
        results[result["provenance"]["profile"]] = result
    order = [name for name in ("smoke", "cpu", "gpu") if name in results]
    if not order:
        return "No chapter times measured yet: run `benchmarks/chapter_times.py`."
    names = [row["chapter"] for row in results[order[0]]["chapters"]]
    for name in order[1:]:
        names += [row["chapter"] for row in results[name]["chapters"] if row["chapter"] not in names]
    lines = ["| chapter | " + " | ".join(f"`{name}`" for name in order) + " |",
             "| --- | " + " | ".join("---:" for _ in order) + " |"]
    for chapter in names:
        cells = []
        for name in order:
            seconds = {row["chapter"]: row["seconds"] for row in results[name]["chapters"]}.get(chapter)
            cells.append("not run" if seconds is None else f"{seconds:.0f} s")
        lines.append(f"| {chapter} | " + " | ".join(cells) + " |")
    lines.append("| **all chapters** | " + " | ".join(f"**{results[n]['total_seconds']:.0f} s**" for n in order) + " |")
    lines.append("")
    for name in order:
        prov = results[name]["provenance"]
        versions = ", ".join(f"{k} {v}" for k, v in prov["versions"].items())
        lines.append(
            f"- `{name}`: {verdict(results[name])}. Measured {prov['date']} on {prov['device_name']} "
            f"({prov['cpu_count']} cores, {prov['torch_threads']} torch threads, device {prov['device']}), "
            f"commit {prov['commit']}; {versions}"
            + (f"; matrix products at {prov['matmul_gflops']['1']:g} and {prov['matmul_gflops']['2']:g} GFLOP/s on "
               f"one and two threads." if "matmul_gflops" in prov else ".")
        )
    if "gpu" not in results:
        lines.append("- `gpu`: not measured yet (no GPU was at hand); run this script on one to fill the column.")
    return "\n".join(lines)


def update_readme() -> None:
    """Replace the text between the chapter-times markers in README.md."""
    text = README.read_text(encoding="utf-8")
    if START_MARK not in text or END_MARK not in text:
        raise SystemExit(f"README.md lacks the markers {START_MARK!r} ... {END_MARK!r}")
    head, rest = text.split(START_MARK, 1)
    _, tail = rest.split(END_MARK, 1)
    README.write_text(head + START_MARK + "\n" + readme_table() + "\n" + END_MARK + tail, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", action="append", choices=["smoke", "cpu", "gpu"],
                        help="profile to time (repeatable); none: only --update-readme")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per notebook cell")
    parser.add_argument("--update-readme", action="store_true", help="rewrite README's budget table")
    parser.add_argument("--runner", choices=["kernel", "exec"], default="kernel",
                        help="kernel: a Jupyter kernel per chapter (default); exec: plain Python, for machines "
                             "without Jupyter")
    parser.add_argument("--only", nargs="*", help="time only chapters whose path starts with one of these")
    parser.add_argument("--exec-one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.exec_one:
        exec_notebook(Path(args.exec_one))
        return 0
    if not args.profile and not args.update_readme:
        parser.error("give --profile NAME (repeatable), --update-readme, or both")
    RESULTS.mkdir(parents=True, exist_ok=True)
    for profile in args.profile or []:
        result = run_profile(profile, args.timeout, args.runner, args.only)
        print(f"{profile}: {verdict(result)}; wrote {result_path(profile, args.only).relative_to(ROOT)}")
    if args.update_readme:
        update_readme()
        print(readme_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
