"""Imports point one way (DESIGN.md section 1): domain is pure, workflows see only domain and their
contracts, the API never reaches into activities or the worker. Checked on the source, so a
convenient import across a layer fails here instead of surviving review.

Two edges beyond the design's list, both deliberate: the API uses psp/ (tokenizing cards, checking
webhook signatures), and core/refunds.py names the RefundWorkflow input it reserves refunds for.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = {"api", "core", "workflows", "domain", "activities", "psp", "worker", "cli", "bench", "tests"}

# package -> the packages (or single modules) of ours it may import, besides itself
ALLOWED: dict[str, set[str]] = {
    "domain": set(),
    "workflows": {"domain"},
    "core": {"domain", "workflows.contracts"},
    "psp": {"core", "domain"},
    "activities": {"core", "domain", "psp", "workflows.contracts"},
    "api": {"core", "domain", "psp", "workflows.contracts"},
}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # "from workflows import options" imports the module workflows.options
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in OURS}


def _allowed(package: str, name: str) -> bool:
    """name is a module, or a name imported from one: allowed if one of its prefixes is the
    package itself or a target the package may import ("workflows.contracts.Act" -> contracts)."""
    parts = name.split(".")
    prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return package in prefixes or bool(prefixes & ALLOWED[package])


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package: str) -> None:
    wrong = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        if "migrations" not in path.parts
        for name in _imports(path)
        if not _allowed(package, name)
    }
    assert not wrong, "\n".join(sorted(wrong))


def test_the_check_sees_a_wrong_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from activities.refunds import reserve_refund\nimport worker\nfrom workflows import options\n"
    )
    names = _imports(bad)
    assert {"activities.refunds", "worker", "workflows.options"} <= names
    assert [n for n in sorted(names) if _allowed("api", n)] == []
    assert _allowed("api", "workflows.contracts.Act") and _allowed("core", "domain.states")
