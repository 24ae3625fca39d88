"""The import graph: floors import only downward, nothing imports in a circle, and the core
(reading COCO, building, the shard-set format, synthetic data) needs neither torch nor DALI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UPPER = ("pipelines", "trainer", "experiments", "benchmarks")
FLOORS = ("base", "shardset", "coco", "build", "synthetic", "pipelines", "trainer", "experiments", "benchmarks", "cli")
"""Lowest first: a module may import its own floor and the ones before it."""


def _modules() -> dict[str, Path]:
    found = {}
    for folder in ("jigsawdata", *UPPER):
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts if parts[0] == "jigsawdata" else ["jigsawdata", *parts])] = path
    found["jigsawdata.cli"] = ROOT / "cli.py"
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The jigsawdata modules ``name`` imports, lazily or not (``TYPE_CHECKING`` blocks excluded)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for child in node.body
        for n in ast.walk(child)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            submodules = {f"{base}.{a.name}" for a in node.names} & set(modules)
            found.update(submodules or {base})
    return {m for m in found if m in modules and m != name}


def _floor(name: str) -> str:
    parts = name.split(".")
    if name in ("jigsawdata.cli", "jigsawdata.__main__"):
        return "cli"  # the entry points
    if len(parts) > 1 and parts[1] in FLOORS:
        return parts[1]
    return "base"  # jigsawdata.errors, files, layout, settings, ...


def test_floors_import_only_downward_and_nothing_in_a_circle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    upward = [
        f"{a} imports {b}"
        for a, deps in graph.items()
        for b in deps
        if FLOORS.index(_floor(b)) > FLOORS.index(_floor(a))
    ]
    assert not upward, upward
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(dep) :] + [node, dep]))
            if dep not in state:
                visit(dep, path + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


_BLOCKED = """
import sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision") or name.startswith("nvidia.dali"):
            raise ImportError("blocked: " + name)

sys.meta_path.insert(0, Blocked())
import importlib
for name in sys.argv[1:]:
    importlib.import_module(name)
print("imported", len(sys.argv) - 1)
"""


def test_the_core_imports_without_torch_and_dali():
    core = [name for name in _modules() if _floor(name) not in UPPER + ("cli",)]
    assert "jigsawdata.shardset.open" in core and "jigsawdata.build.run" in core
    done = subprocess.run(
        [sys.executable, "-c", _BLOCKED, *core], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == f"imported {len(core)}"
