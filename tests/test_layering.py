"""Packages depend one way: ``recipes`` may import ``callbacks`` and ``datamodules``; those never import upward."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> top-level packages of this project it must not import
FORBIDDEN = {"callbacks": {"recipes", "datamodules"}, "datamodules": {"recipes", "callbacks"}}


def upward_imports(path: Path, forbidden: set[str]) -> list[str]:
    """``file:line module`` for every import in ``path`` whose top-level package is in ``forbidden``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in forbidden]
    return sorted(found, key=lambda hit: int(hit.split(":")[1].split()[0]))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_packages_never_import_upward(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    bad = [hit for f in files for hit in upward_imports(f, FORBIDDEN[package])]
    assert not bad, "lower package imports a higher one:\n" + "\n".join(bad)


def test_checker_sees_plain_and_nested_imports(tmp_path, monkeypatch):
    monkeypatch.setattr("tests.test_layering.ROOT", tmp_path)
    bad = tmp_path / "bad.py"
    bad.write_text("import os\ndef f():\n    from recipes.grpo.loss import aggregate\n"
                   "import datamodules.rewards\n")
    assert upward_imports(bad, {"recipes", "datamodules"}) == ["bad.py:3 recipes.grpo.loss",
                                                                 "bad.py:4 datamodules.rewards"]


def module_imports(path: Path) -> set[str]:
    """The project modules ``path`` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in PACKAGES}


PACKAGES = ("recipes", "callbacks", "datamodules")


def import_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of the module graph (``[a, b, ..., a]``), or ``[]``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return []


def test_no_import_cycle():
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph = {name: {m for m in module_imports(path) if m in modules and m != name} for name, path in modules.items()}
    assert "recipes.cli" in graph and "recipes.commands.demo" in graph
    assert import_cycle(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert import_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
