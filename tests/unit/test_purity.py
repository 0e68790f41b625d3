"""The core does no I/O: model/ and policy/ import nothing that touches the host."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "pciguard"
FORBIDDEN = {"os", "pathlib", "subprocess", "socket", "shutil", "io", "sqlite3", "glob"}
PURE = sorted((SRC / "model").glob("*.py")) + sorted((SRC / "policy").glob("*.py"))


@pytest.mark.parametrize("path", PURE, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_core_module_imports_no_io(path: Path) -> None:
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "open":
            pytest.fail(f"{path.name} calls open()")
    assert not imported & FORBIDDEN, f"{path.name} imports {imported & FORBIDDEN}"
