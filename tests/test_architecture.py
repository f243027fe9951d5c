"""The layout's rules, checked on the source: DESIGN.md's import rules, no import cycles, a complete map.

Imports are read with `ast` from every module of `src/mednets` (function-level imports count too:
a rule broken lazily is still broken). `docs/architecture.md` must name every source file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "mednets"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

# Largest module allowed, and the cohesive model and phantom files that may exceed it.
MAX_LINES = 500
LONG_FILES_ALLOWED = {"models/sadaan.py", "models/lhanet.py", "data/phantoms.py"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _source_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Every `mednets` module `path` imports (an imported name that is a module counts as that module)."""
    modules = {_module_name(p) for p in _source_files()}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("mednets"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target.startswith("mednets"):
                continue
            submodules = {f"{target}.{alias.name}" for alias in node.names} & modules
            found.update(submodules)
            if len(submodules) < len(node.names):  # a name defined in `target` itself, not a submodule
                found.add(target)
    return {name for name in found if name in modules and name != _module_name(path)}


GRAPH = {_module_name(path): _imports(path) for path in _source_files()}


def _layer(module: str) -> str:
    """The part of the package a module belongs to: `models`, `data`, `engine`, ... or the module itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mednets"


# (importer's layer, imported layer or module) pairs DESIGN.md forbids; "mednets" is the package root.
FORBIDDEN = [
    ("models", "data"),
    ("models", "engine"),
    ("models", "cli"),
    ("models", "tasks"),
    ("data", "models"),
    ("data", "engine"),
    ("data", "tasks"),
    ("data", "mednets"),
    ("tasks", "engine"),
    ("tasks", "data"),
    ("losses", "engine"),
    ("metrics", "engine"),
    ("engine", "cli"),
    ("engine", "reports"),
    ("models", "reports"),
    ("data", "reports"),
    ("tasks", "reports"),
]
REPORTS_MAY_IMPORT_FROM_ENGINE = {"mednets.engine.run"}


def _violations() -> list[str]:
    problems = []
    for module, imported in GRAPH.items():
        for target in imported:
            pair = (_layer(module), _layer(target))
            if pair in FORBIDDEN:
                problems.append(f"{module} imports {target}")
            if (
                _layer(module) == "reports"
                and _layer(target) == "engine"
                and target not in REPORTS_MAY_IMPORT_FROM_ENGINE
            ):
                problems.append(f"{module} imports {target} (reports may read engine.run only)")
            if _layer(target) == "reports" and _layer(module) not in ("reports", "cli", "demo"):
                problems.append(f"{module} imports {target} (only the cli and the demo import reports)")
    return problems


def _cycles() -> list[list[str]]:
    """Import cycles between modules (a package's `__init__` re-exporting its own modules is not one)."""
    cycles, state, stack = [], {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if target.startswith(module + ".") or module.startswith(target + "."):
                continue  # a package and its own submodules
            if state.get(target) == "open":
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    return cycles


def test_design_import_rules_hold() -> None:
    assert _violations() == []


def test_no_import_cycles() -> None:
    assert _cycles() == []


def test_the_rule_check_catches_a_broken_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(GRAPH, "mednets.models.unet", {*GRAPH["mednets.models.unet"], "mednets.data.io"})
    monkeypatch.setitem(GRAPH, "mednets.data.io", {*GRAPH["mednets.data.io"], "mednets.data.volume"})
    monkeypatch.setitem(GRAPH, "mednets.data.volume", {*GRAPH["mednets.data.volume"], "mednets.data.io"})
    assert "mednets.models.unet imports mednets.data.io" in _violations()
    assert any(set(cycle) >= {"mednets.data.io", "mednets.data.volume"} for cycle in _cycles())


def test_architecture_map_names_every_source_file() -> None:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    missing = [str(p.relative_to(PACKAGE)) for p in _source_files() if f"`{p.relative_to(PACKAGE)}`" not in text]
    assert missing == []


def test_no_twin_pipelines_and_no_oversized_modules() -> None:
    assert [p.name for p in PACKAGE.rglob("*2d*")] == []
    oversized = {
        str(p.relative_to(PACKAGE)): n
        for p in _source_files()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert set(oversized) <= LONG_FILES_ALLOWED, oversized
