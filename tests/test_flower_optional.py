"""Flower stays optional: only fedlora_edu.flower imports flwr, and without it that part says how to install it.

These run with or without the ``flower`` extra (Colab and the floor environment have no Flower).
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fedlora_edu"


def flwr_importers() -> list[str]:
    """The package's modules with an import of flwr, as paths relative to the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(name.split(".")[0] == "flwr" for name in names):
                found.append(str(path.relative_to(PACKAGE)))
                break
    return found


def test_only_the_flower_part_imports_flwr():
    importers = flwr_importers()
    assert importers, "fedlora_edu.flower should import flwr"
    assert all(path.startswith("flower/") for path in importers), importers


def test_without_flower_the_part_names_the_install_line(monkeypatch):
    for name in [m for m in sys.modules if m == "fedlora_edu.flower" or m.startswith("fedlora_edu.flower.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "flwr", None)  # as if Flower were not installed
    with pytest.raises(ImportError, match=r"pip install fedlora-edu\[flower\]"):
        importlib.import_module("fedlora_edu.flower")
