"""Studies: resumable, stored with provenance, and stale as soon as the code they measured changes."""

from __future__ import annotations

import json

import pytest

from fedlora_edu import studies
from fedlora_edu.studies import (
    RESULTS,
    carry_forward,
    code_fingerprint,
    fingerprint_at,
    load_study,
    read_rows,
    run_study,
    source_fingerprint,
    stale_rows,
)


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(studies, "RESULTS", tmp_path)
    return tmp_path


def test_the_fingerprint_ignores_prose_and_sees_code(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('"""Doc."""\n\ndef f(x):\n    """What f does."""\n    return x + 1  # add one\n')
    original = source_fingerprint(path)
    path.write_text('"""Another doc."""\n\n\ndef f(x):\n    # a new comment\n    return x + 1\n')
    assert source_fingerprint(path) == original
    path.write_text('"""Doc."""\n\ndef f(x):\n    return x + 2\n')
    assert source_fingerprint(path) != original
    path.write_text('LIMIT = 3\n"""What the limit is for."""\n')  # a constant's own docstring is prose too
    constant = source_fingerprint(path)
    path.write_text('LIMIT = 3\n"""Another word on it."""\n')
    assert source_fingerprint(path) == constant
    path.write_text('LIMIT = 4\n"""Another word on it."""\n')
    assert source_fingerprint(path) != constant


def test_a_method_fingerprint_covers_its_module_and_its_bases():
    assert code_fingerprint(["FedIT"]) != code_fingerprint([])
    assert code_fingerprint(["FedLoRU"]) != code_fingerprint(["FedIT"])
    assert code_fingerprint(["FedIT"]) == code_fingerprint(["FedIT"])
    with pytest.raises(ValueError, match="unknown method"):
        code_fingerprint(["NoSuchMethod"])


def test_a_study_appends_one_row_per_run_and_resumes(results):
    calls = []

    def run_one(settings):
        calls.append(settings["seed"])
        if settings["seed"] == 2 and len(calls) == 3:
            raise KeyboardInterrupt  # interrupted in the middle of the third run
        return {"accuracy": settings["seed"] / 10}

    runs = [{"method": "FedIT", "seed": seed} for seed in range(4)]
    with pytest.raises(KeyboardInterrupt):
        run_study("demo", runs, run_one, profile="smoke", progress=False)
    assert [row["settings"]["seed"] for row in read_rows("demo")] == [0, 1]  # nothing half-written
    frame = run_study("demo", runs, run_one, profile="smoke", progress=False)
    assert calls == [0, 1, 2, 2, 3]  # the stored runs were not redone
    assert list(frame["seed"]) == [0, 1, 2, 3] and list(frame["accuracy"]) == [0.0, 0.1, 0.2, 0.3]
    row = read_rows("demo")[0]
    assert row["methods"] == ["FedIT"] and row["code"] == code_fingerprint(["FedIT"])
    for key in ("commit", "date", "device_name", "profile", "versions", "command"):
        assert key in row["provenance"]
    assert frame.attrs["stale"] == 0


def test_a_crash_mid_line_is_skipped_and_the_run_redone(results):
    run_study("demo", [{"seed": 0}], lambda s: {"x": 1}, profile="smoke", progress=False)
    with (results / "demo.jsonl").open("a") as handle:
        handle.write('{"settings": {"seed": 1}, "meas')  # a write cut off by a kill
    assert len(read_rows("demo")) == 1
    (results / "demo.jsonl").write_text('{"broken\n' + (results / "demo.jsonl").read_text())
    with pytest.raises(ValueError, match="not a JSON line"):
        read_rows("demo")


def test_a_row_measured_on_other_code_is_stale(results):
    run_study("demo", [{"method": "FedIT", "seed": 0}], lambda s: {"x": 1}, profile="smoke", progress=False)
    row = read_rows("demo")[0]
    row["code"] = "0" * 16  # as if FedIT's code had changed since
    (results / "demo.jsonl").write_text(json.dumps(row) + "\n")
    assert len(stale_rows("demo")) == 1
    assert load_study("demo").attrs["stale"] == 1


def test_bad_names_and_duplicate_runs_are_refused(results):
    with pytest.raises(ValueError, match="study name"):
        read_rows("../outside")
    with pytest.raises(ValueError, match="same settings"):
        run_study("demo", [{"seed": 0}, {"seed": 0}], lambda s: {}, profile="smoke", progress=False)
    with pytest.raises(FileNotFoundError, match="run studies/none.py"):
        load_study("none")


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.jsonl")), ids=lambda path: path.stem)
def test_every_stored_study_is_current(path):
    stale = stale_rows(path.stem)
    assert not stale, (f"{len(stale)} rows of study {path.stem} measured code that has changed since "
                       f"(first: {stale[0]['settings']}); run studies/{path.stem}.py again")


def test_a_study_on_the_testbed_is_stale_when_the_testbed_changes(results, monkeypatch, tmp_path):
    run_study("demo", [{"seed": 0}], lambda s: {"x": 1}, profile="smoke", depends_on=["testbed"], progress=False)
    row = read_rows("demo")[0]
    assert row["depends_on"] == ["testbed"] and row["code"] == code_fingerprint([], ["testbed"])
    assert row["code"] != code_fingerprint([])
    assert not stale_rows("demo")
    package = tmp_path / "package"  # a copy of the package whose testbed has one more line of code
    package.mkdir()
    for name in ("testbed.py", *studies.SHARED_PACKAGES):
        source = studies.PACKAGE / name
        if source.is_dir():
            for path in source.rglob("*.py"):
                (package / path.relative_to(studies.PACKAGE)).parent.mkdir(parents=True, exist_ok=True)
                (package / path.relative_to(studies.PACKAGE)).write_text(path.read_text())
        else:
            (package / name).write_text(source.read_text() + "\nCHANGED = 1\n")
    monkeypatch.setattr(studies, "PACKAGE", package)
    assert len(stale_rows("demo")) == 1
    with pytest.raises(ValueError, match="depends_on names modules"):
        run_study("demo", [{"seed": 1}], lambda s: {}, profile="smoke", depends_on=["no_such"], progress=False)


def test_the_fingerprint_is_the_same_on_every_python_version():
    """Newer Pythons add fields to old syntax nodes (3.12: ``type_params`` on every function and class, empty
    where the code uses none) and newer ``ast.dump`` leaves empty fields out (3.13); a study stored under one
    version must read as current under another (Colab runs 3.12, CI 3.11)."""
    import ast

    from fedlora_edu.studies import _canonical

    source = "def f(x: int = 1) -> int:\n    return x + 1\n\n\nclass C:\n    y = [f(i) for i in range(3)]\n"
    tree = ast.parse(source)
    newer = ast.parse(source)

    def with_new_field(node):  # the node as a newer Python builds it: one more field, empty in this code
        kind = type(node.__class__.__name__, (ast.AST,), {"_fields": (*node._fields, "type_params")})
        copy = kind()
        for name in node._fields:
            setattr(copy, name, getattr(node, name))
        copy.type_params = []
        return copy

    newer.body = [with_new_field(node) for node in newer.body]
    assert [type(node).__name__ for node in newer.body] == ["FunctionDef", "ClassDef"]
    assert ast.dump(newer) != ast.dump(tree)  # what the fingerprint was made of before: version-dependent
    assert _canonical(newer) == _canonical(tree)
    changed = ast.parse(source.replace("x + 1", "x + 2"))
    assert _canonical(changed) != _canonical(tree)


def _checkout_matches_head() -> bool:
    """Whether the package's files are as HEAD has them (true on CI's fresh clone; not mid-edit)."""
    status = studies._git("status", "--porcelain", "--", studies.PACKAGE.name)
    return status is not None and not status.strip()


@pytest.mark.skipif(not _checkout_matches_head(), reason="needs a git checkout whose package files are committed")
def test_the_fingerprint_at_a_commit_reads_the_code_as_git_has_it():
    for methods, depends_on in (([], []), (["FedIT"], ["testbed"]), (["mFedLoRU"], [])):
        assert fingerprint_at("HEAD", methods, depends_on) == code_fingerprint(methods, depends_on)
    assert fingerprint_at("no-such-commit", ["FedIT"]) is None


def test_carrying_forward_marks_only_rows_current_at_the_base_and_records_why(results, monkeypatch):
    runs = [{"method": "FedIT", "seed": seed} for seed in range(3)]
    run_study("demo", runs, lambda s: {"x": s["seed"]}, profile="smoke", progress=False)
    rows = read_rows("demo")
    current = rows[0]["code"]
    rows[1]["code"] = "b" * 16  # current at the base, stale now: to be carried
    rows[2]["code"] = "c" * 16  # stale at the base already: stays stale
    (results / "demo.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.setattr(studies, "fingerprint_at", lambda commit, methods=(), depends_on=(): "b" * 16)
    reason = "a hook whose default does nothing; checked by rerunning one run"
    with pytest.raises(ValueError, match="reason must say"):
        carry_forward("demo", "HEAD", "neutral")
    with pytest.raises(ValueError, match="base must be a commit"):
        carry_forward("demo", "no-such-commit", reason)
    assert carry_forward("demo", "HEAD", reason) == 1
    after = read_rows("demo")
    assert [row["code"] for row in after] == [current, current, "c" * 16]
    assert after[1]["provenance"]["carried"][0]["from"] == "b" * 16
    assert after[1]["provenance"]["carried"][0]["reason"] == reason and "carried" not in after[0]["provenance"]
    assert [row["measured"] for row in after] == [row["measured"] for row in rows]  # nothing measured changes
    assert [row["settings"] for row in stale_rows("demo")] == [runs[2]]
    assert carry_forward("demo", "HEAD", reason) == 0  # nothing more to carry
