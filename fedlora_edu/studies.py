"""Studies: named, resumable experiments whose results are stored with their provenance.

A chapter runs a small live experiment within its time budget; some claims need more rounds,
clients and seeds than that. Those come from a *study*: a script under ``studies/`` that runs a
grid of runs (each a dict of settings, such as data set, method and seed) and appends one JSON
line per finished run to ``fedlora_edu/results/<name>.jsonl`` (inside the package, so that a
chapter opened in Colab finds it too). A run whose key is already in the
file is skipped, so a study interrupted at any point continues where it stopped. Every line
carries the run's settings, what it measured, and its provenance: the command, the commit, the
device, the library versions, the profile, the date, and a fingerprint of the code it ran.

The fingerprint (:func:`code_fingerprint`) hashes the syntax tree of the modules a run depends
on, docstrings left out, so editing prose does not make a study stale but changing code does.
:func:`stale_rows` recomputes it for every stored row; the test suite fails on a stale study,
and a chapter that shows a stored study says so beside it (:func:`load_study`).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from fedlora_edu.registry import METHODS
from fedlora_edu.simulation.profiles import provenance

PACKAGE = Path(__file__).resolve().parent
RESULTS = Path(os.environ["FEDLORA_RESULTS"]) if os.environ.get("FEDLORA_RESULTS") else PACKAGE / "results"
"""Where studies keep their rows: the package's ``results`` folder, or ``$FEDLORA_RESULTS`` (for a trial run)."""
SHARED_PACKAGES = ("core", "assets", "foundations", "simulation")
"""What every run depends on, whatever the method: the core, the assets, the foundations, the simulation."""


def _is_prose(statement: ast.stmt) -> bool:
    return (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
            and isinstance(statement.value.value, str))


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    """Drop every statement that is a bare string: docstrings of modules, classes and functions, and the
    strings under a constant or attribute that document it (they do nothing when the code runs)."""
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if isinstance(body, list) and body and all(isinstance(statement, ast.stmt) for statement in body):
                kept = [statement for statement in body if not _is_prose(statement)]
                if len(kept) != len(body):
                    setattr(node, field, kept or [ast.Pass()])
    return tree


def _canonical(node: object) -> object:
    """A syntax tree as nested tuples that every Python version the package runs on writes alike.

    Fields that are empty (None or an empty list) are left out: newer Pythons add such fields to
    old nodes (3.12's ``type_params`` on every function and class) and newer ``ast.dump`` leaves
    them out (3.13), so ``ast.dump`` itself gives one file a different text on 3.11, 3.12 and 3.13,
    and a study stored on one would read as stale on another (Colab runs 3.12).
    """
    if isinstance(node, ast.AST):
        return (type(node).__name__, tuple((name, _canonical(value)) for name, value in ast.iter_fields(node)
                                           if value is not None and not (isinstance(value, list) and not value)))
    if isinstance(node, list):
        return tuple(_canonical(item) for item in node)
    return (type(node).__name__, repr(node))


def source_fingerprint(path: Path) -> str:
    """SHA-256 of a Python file's syntax tree without docstrings (comments and layout never enter a tree),
    the same on every Python version (:func:`_canonical`)."""
    return _text_fingerprint(path.read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=512)
def _text_fingerprint(text: str) -> str:
    # Cached by the source text itself: checking a study's rows fingerprints the same files once per row.
    return hashlib.sha256(repr(_canonical(_strip_docstrings(ast.parse(text)))).encode()).hexdigest()


def _package_files(package: str) -> list[Path]:
    return sorted((PACKAGE / package).rglob("*.py"))


def _module_file(module: str) -> Path:
    """The file of a top-level module or subpackage of ``fedlora_edu`` named without the prefix ("testbed")."""
    path = PACKAGE / f"{module}.py"
    if not path.is_file():
        raise ValueError(f"depends_on names modules of fedlora_edu such as 'testbed'; no file {path.name} "
                         f"in {PACKAGE}")
    return path


def _method_files(methods: Iterable[str], depends_on: Iterable[str]) -> set[Path]:
    """The package files a run of ``methods`` depends on beyond :data:`SHARED_PACKAGES` (:func:`code_fingerprint`)."""
    files = {_module_file(module) for module in depends_on}
    for name in methods:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
        for cls in METHODS[name].__mro__:
            module = sys.modules.get(cls.__module__)
            if module is not None and cls.__module__.startswith("fedlora_edu."):
                files.add(Path(inspect.getfile(module)))
    return files


def _fingerprint_of(sources: Mapping[Path, str]) -> str:
    """The hash of a set of package files, given as {path relative to the package: source text}."""
    digest = hashlib.sha256()
    for relative in sorted(sources):
        digest.update(str(relative).encode() + b"\0" + _text_fingerprint(sources[relative]).encode() + b"\0")
    return digest.hexdigest()[:16]


def code_fingerprint(methods: Iterable[str] = (), depends_on: Iterable[str] = ()) -> str:
    """A short hash of the code a run of ``methods`` (registry names) executes.

    The shared machinery (the core, assets, foundations and simulation subpackages), the
    module of every class in each method's inheritance chain (FedLoRU's runs depend on
    ``client_init`` and on ``discordance``'s FedIT if it inherits from it), and the top-level
    modules of ``fedlora_edu`` named in ``depends_on`` (``"testbed"`` for a study on the testbed).
    """
    files = {path for package in SHARED_PACKAGES for path in _package_files(package)}
    files |= _method_files(methods, depends_on)
    return _fingerprint_of({path.relative_to(PACKAGE): path.read_text(encoding="utf-8") for path in files})


def _git(*arguments: str) -> str | None:
    """The output of a git command in the package's checkout, or None (no git, not a checkout, unknown commit)."""
    try:
        done = subprocess.run(["git", *arguments], cwd=PACKAGE.parent, capture_output=True, text=True, check=False)
    except OSError:
        return None
    return done.stdout if done.returncode == 0 else None


def fingerprint_at(commit: str, methods: Iterable[str] = (), depends_on: Iterable[str] = ()) -> str | None:
    """:func:`code_fingerprint` of the same run as the code stood at git ``commit``, or None if it cannot be read.

    The files are the ones the run depends on today (the method's modules, ``depends_on``) and the
    shared packages as they were at ``commit``, read from git; None when a file did not exist then
    or git is not at hand (an installed package has no history).
    """
    package = PACKAGE.name
    listing = _git("ls-tree", "-r", "--name-only", commit, "--", *(f"{package}/{name}" for name in SHARED_PACKAGES))
    if listing is None:
        return None
    relatives = {Path(line).relative_to(package) for line in listing.splitlines() if line.endswith(".py")}
    relatives |= {path.relative_to(PACKAGE) for path in _method_files(methods, depends_on)}
    sources = {}
    for relative in relatives:
        text = _git("show", f"{commit}:{package}/{relative.as_posix()}")
        if text is None:
            return None
        sources[relative] = text
    return _fingerprint_of(sources)


# ----------------------------------------------------------------------------------------
# Running and reading a study
# ----------------------------------------------------------------------------------------
def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or not all(c.isalnum() or c == "_" for c in name):
        raise ValueError(f"a study name is letters, digits and underscores, got {name!r}")
    return name


def result_path(name: str) -> Path:
    """Where the study ``name`` keeps its rows."""
    return RESULTS / f"{_check_name(name)}.jsonl"


def run_key(settings: Mapping[str, Any]) -> str:
    """The identity of a run: its settings as canonical JSON (key order does not matter)."""
    return json.dumps(dict(settings), sort_keys=True)


def _line(row: Mapping[str, Any]) -> str:
    """A row as the study file stores it: one JSON line, keys sorted."""
    return json.dumps(row, sort_keys=True) + "\n"


def read_rows(name: str) -> list[dict]:
    """Every stored row of the study (empty if it never ran); a last line cut off by a crash is skipped."""
    path = result_path(name)
    if not path.exists():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                continue  # the one line a kill in the middle of a write can leave; its run is simply redone
            raise ValueError(f"{path}:{number} is not a JSON line; the file was edited by hand?") from None
    return rows


def run_study(
    name: str,
    runs: Sequence[Mapping[str, Any]],
    run_one: Callable[[Mapping[str, Any]], Mapping[str, Any]],
    *,
    profile: str,
    methods_of: Callable[[Mapping[str, Any]], Sequence[str]] | None = None,
    depends_on: Sequence[str] = (),
    progress: bool = True,
) -> pd.DataFrame:
    """Run every run of ``runs`` not stored yet, appending one row each as it finishes; return the study.

    ``run_one(settings)`` measures one run and returns a dict of plain numbers or lists. Each
    row stores the settings, the measured values, the seconds it took, the code fingerprint of
    the methods ``methods_of(settings)`` names (by default ``[settings["method"]]`` when there
    is one) and of the modules named in ``depends_on`` (see :func:`code_fingerprint`), and the
    provenance of the machine. Rows are appended whole, so interrupting a study
    (Ctrl-C, a killed job) loses at most the run in progress, and running it again continues.
    """
    depends_on = sorted(depends_on)
    code_fingerprint((), depends_on)  # an unknown module fails here, before any run
    keys = [run_key(settings) for settings in runs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"study {name!r}: two runs have the same settings")
    done = {run_key(row["settings"]) for row in read_rows(name)}
    pending = [settings for settings, key in zip(runs, keys, strict=True) if key not in done]
    stored = len(runs) - len(pending)  # of these runs; the file may hold others (other methods, seeds)
    methods_of = methods_of or (lambda settings: [settings["method"]] if "method" in settings else [])
    path = result_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
    bar = tqdm(pending, desc=f"study {name} ({stored} of {len(runs)} stored)", unit="run", disable=not progress)
    for settings in bar:
        bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in settings.items()), refresh=False)
        started = time.perf_counter()
        measured = dict(run_one(settings))
        methods = list(methods_of(settings))
        row = {"settings": dict(settings), "measured": measured, "seconds": round(time.perf_counter() - started, 2),
               "methods": methods, **({"depends_on": depends_on} if depends_on else {}),
               "code": code_fingerprint(methods, depends_on),
               "provenance": {**provenance(profile), "command": command}}
        line = _line(row)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
    return load_study(name)


CodeKey = tuple[tuple[str, ...], tuple[str, ...]]
"""What a row's fingerprint covers: its methods and the modules it depends on."""


def _stale_among(rows: Iterable[dict]) -> list[tuple[dict, CodeKey, str]]:
    """The rows whose fingerprint differs from the code's now, each with its key and the current fingerprint
    (computed once per key)."""
    current: dict[CodeKey, str] = {}
    stale = []
    for row in rows:
        key = (tuple(row.get("methods", ())), tuple(row.get("depends_on", ())))
        if key not in current:
            current[key] = code_fingerprint(*key)
        if row.get("code") != current[key]:
            stale.append((row, key, current[key]))
    return stale


def stale_rows(name: str) -> list[dict]:
    """The stored rows whose code fingerprint no longer matches the code (empty when the study is current)."""
    return [row for row, _, _ in _stale_among(read_rows(name))]


def carry_forward(name: str, base: str, reason: str) -> int:
    """Mark as current the stored rows that were current at git commit ``base``; return how many.

    For a change to the shared code that provably leaves every stored run's computation as it was
    (a new hook whose default does nothing, a renamed private helper, a faster path checked to give
    identical results), which would otherwise make every study stale. Only a row whose fingerprint
    equals its code's fingerprint at ``base`` (:func:`fingerprint_at`) is carried: rows already
    stale at ``base`` stay stale. Each carried row keeps its old fingerprint, ``base`` and the
    ``reason`` (say what changed and how its neutrality was checked) under
    ``provenance["carried"]``, so the step can be audited. The file is rewritten whole, atomically.
    """
    if not isinstance(reason, str) or len(reason.split()) < 4:
        raise ValueError(f"reason must say what changed and how it was checked, got {reason!r}")
    if _git("rev-parse", "--verify", f"{base}^{{commit}}") is None:
        raise ValueError(f"base must be a commit of this checkout's history, got {base!r}")
    rows = read_rows(name)
    then: dict[CodeKey, str | None] = {}
    carried = 0
    for row, key, now in _stale_among(rows):
        if key not in then:
            then[key] = fingerprint_at(base, *key)
        if then[key] is not None and row.get("code") == then[key]:
            row["provenance"].setdefault("carried", []).append(
                {"from": row["code"], "base": base, "reason": reason,
                 "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            row["code"] = now
            carried += 1
    if carried:
        path = result_path(name)
        partial = path.with_suffix(".jsonl.partial")
        partial.write_text("".join(_line(row) for row in rows), encoding="utf-8")
        partial.replace(path)
    return carried


def load_study(name: str) -> pd.DataFrame:
    """The study as a table: one row per run, its settings and measured values as columns.

    Provenance columns: ``seconds``, ``code``, ``commit``, ``date``, ``device_name``,
    ``profile``. ``df.attrs["stale"]`` counts the rows whose code has changed since they ran
    (:func:`stale_rows`); a chapter shows it beside the numbers.
    """
    rows = read_rows(name)
    if not rows:
        raise FileNotFoundError(f"study {name!r} has no results at {result_path(name)}; run studies/{name}.py")
    records = []
    for row in rows:
        record = {**row["settings"], **row["measured"], "seconds": row["seconds"], "code": row["code"]}
        record.update({key: row["provenance"].get(key) for key in ("commit", "date", "device_name", "profile")})
        records.append(record)
    frame = pd.DataFrame(records)
    frame.attrs["stale"] = len(stale_rows(name))
    frame.attrs["name"] = name
    return frame
