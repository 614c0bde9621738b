"""The package's layout: imports point one way, nothing imports the package inside a function, no
cycles, one registry, and the README's map of the methods matches the registry.

The rule (the package docstring says it in prose): every module belongs to one part of the
package, its top-level subpackage (``core``, ``assets``, ``foundations``, ``distributed``,
``heterogeneity``, ``efficiency``, ``simulation``, ``teaching``) or a top-level module
(``registry``, and the front door ``__init__``), and may import only the parts ``ALLOWED`` names
for it. So the core imports nothing of the package; a method branch imports the core, the
foundations and the branches before it, never the simulation; the simulation sees methods only
through the Strategy interface; only the registry (and the teaching tools and the front door,
which sit on top like a chapter) import the methods.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from fedlora_edu.registry import METHOD_CLASSES, METHODS, method_map, method_map_markdown, methods_in_branch

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fedlora_edu"

BRANCHES = ("distributed", "heterogeneity", "efficiency")
ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "assets": {"core", "assets"},
    "foundations": {"core", "foundations"},
    "distributed": {"core", "foundations", "distributed"},
    "heterogeneity": {"core", "foundations", "distributed", "heterogeneity"},
    "efficiency": {"core", "foundations", "distributed", "heterogeneity", "efficiency"},
    "registry": {"core", *BRANCHES},
    "simulation": {"core", "foundations", "assets", "simulation"},
    "studies": {"core", "assets", "foundations", "registry", "simulation", "studies"},
    "testbed": {"core", "assets", "foundations", "simulation", "testbed"},
    "federations": {"core", "assets", "foundations", "simulation", "federations"},
    "teaching": {"core", "assets", "foundations", *BRANCHES, "registry", "simulation", "studies", "testbed",
                 "federations", "teaching"},
    # Flower (an optional extra): the only part that imports flwr; nothing of the package imports it.
    "flower": {"core", "foundations", "registry", "simulation", "flower"},
    "__init__": {"core", "assets", "foundations", *BRANCHES, "registry", "simulation", "studies", "testbed",
                 "federations", "teaching"},
}
EXCEPTIONS: dict[str, set[str]] = {
    # FedBiOT's server distils its emulator on public text: the one method that reads an embedded data set itself.
    "fedlora_edu.efficiency.offsite": {"assets"},
    # Split learning on Flower replays run_split's steps with split learning's own model-cutting helpers.
    "fedlora_edu.flower.split": {"efficiency"},
}


def module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def part_of(name: str, package_name: str) -> str:
    """The part of the package a dotted module name belongs to (``"__init__"`` for the package itself)."""
    parts = name.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def imported_modules(node: ast.AST, current: str, is_package: bool, package_name: str) -> list[str]:
    """The package modules an import statement names, resolved (relative imports included)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == package_name]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = current.split(".") if is_package else current.split(".")[:-1]
            base = base[:len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if target.split(".")[0] != package_name:
            return []
        # "from pkg.sub import name": name may be a submodule or an attribute; both point into pkg.sub
        return [target] + [f"{target}.{alias.name}" for alias in node.names]
    return []


def import_violations(package: Path) -> list[str]:
    """Every breach of the layout rule in the package at ``package``: direction, cycles, imports in functions."""
    package_name = package.name
    modules = {module_name(path, package): path for path in sorted(package.rglob("*.py"))}
    problems, graph = [], {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        top_level = set(map(id, tree.body))
        for node in ast.walk(tree):
            targets = imported_modules(node, name, is_package, package_name)
            if not targets:
                continue
            where = f"{path.relative_to(package.parent)}:{node.lineno}"
            if id(node) not in top_level:
                problems.append(f"{where}: imports {targets[0]} inside a function or block; import at the top")
            for target in targets:
                if target not in modules:
                    continue  # an attribute, not a module
                graph[name].add(target)
                source_part, target_part = part_of(name, package_name), part_of(target, package_name)
                allowed = ALLOWED.get(source_part)
                if allowed is None:
                    problems.append(f"{where}: {source_part} is not a known part of the package (add it to ALLOWED)")
                elif target_part not in allowed | EXCEPTIONS.get(name, set()) and not target.startswith(name + "."):
                    problems.append(f"{where}: {source_part} may not import {target_part} ({name} imports {target})")
    problems.extend(f"import cycle: {' -> '.join(cycle)}" for cycle in find_cycles(graph))
    return problems


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (or a self-import)."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                cycles.append(sorted(component) + [sorted(component)[0]])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_package_keeps_its_import_rule():
    assert import_violations(PACKAGE) == []


def plant(tmp_path: Path, files: dict[str, str]) -> Path:
    package = tmp_path / "pkg"
    for relative, text in {"__init__.py": "", "core/__init__.py": "", "distributed/__init__.py": "",
                           "simulation/__init__.py": "", **files}.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


def test_a_planted_upward_import_is_caught(tmp_path):
    package = plant(tmp_path, {"core/factors.py": "from pkg.distributed.method import Method\n",
                               "distributed/method.py": "X = 1\n"})
    problems = import_violations(package)
    assert len(problems) == 1 and "core may not import distributed" in problems[0]


def test_a_method_importing_the_federation_loop_is_caught(tmp_path):
    package = plant(tmp_path, {"distributed/method.py": "from pkg.simulation import federation\n",
                               "simulation/federation.py": "X = 1\n"})
    assert any("distributed may not import simulation" in p for p in import_violations(package))


def test_a_planted_cycle_is_caught(tmp_path):
    package = plant(tmp_path, {"core/a.py": "from pkg.core import b\n", "core/b.py": "from pkg.core.a import X\n"})
    problems = import_violations(package)
    assert problems == ["import cycle: pkg.core.a -> pkg.core.b -> pkg.core.a"]


def test_an_import_inside_a_function_is_caught(tmp_path):
    package = plant(tmp_path, {"simulation/loop.py": "def run():\n    from pkg.core import a\n    return a\n",
                               "core/a.py": "X = 1\n"})
    problems = import_violations(package)
    assert len(problems) == 1 and "inside a function" in problems[0]


def test_relative_imports_are_resolved(tmp_path):
    package = plant(tmp_path, {"core/a.py": "from ..distributed import m\n", "distributed/m.py": "X = 1\n"})
    assert any("core may not import distributed" in p for p in import_violations(package))


def test_one_registry_holds_every_method_once():
    assert len(METHOD_CLASSES) == len(METHODS) == len({cls.name for cls in METHOD_CLASSES})
    for cls in METHOD_CLASSES:
        part = cls.__module__.split(".")[1]
        assert part in BRANCHES, f"{cls.name} lives in {cls.__module__}, outside the method branches"
        assert cls.paper and cls.chapter, f"{cls.name} must declare its paper and chapter"
        assert (ROOT / f"{cls.chapter}.ipynb").exists(), f"{cls.name}'s chapter {cls.chapter} does not exist"


def test_the_branches_partition_the_registry():
    found = [name for branch in BRANCHES for name in methods_in_branch(branch)]
    assert sorted(found) == sorted(METHODS) and len(found) == len(set(found))
    distributed = methods_in_branch("distributed")
    assert all(cls.__module__.startswith("fedlora_edu.distributed.") for cls in distributed.values())
    with pytest.raises(ValueError, match="branch must be one of"):
        methods_in_branch("hardware")


def readme_map_rows() -> list[dict[str, str]]:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- method-map:start.*?-->\n(.*?)<!-- method-map:end -->", text, re.S)
    assert match, "README.md has no method map between <!-- method-map:start --> and <!-- method-map:end -->"
    lines = [line for line in match.group(1).strip().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        cells = [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def test_the_readme_map_matches_the_registry():
    assert readme_map_rows() == method_map(), (
        "README.md's method map is stale; replace the table between the method-map markers with:\n\n"
        + method_map_markdown())

