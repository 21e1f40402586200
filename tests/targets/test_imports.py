"""targets/ and runtime/ import one way: no module of either imports graph_passes.fx, the exporter or the api, and
runtime/ imports nothing from targets/ and no onnx (read from the source with ast, so lazy imports inside functions
count); no import cycle among them."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"targets": "tokensieve.targets", "runtime": "tokensieve.runtime"}
FORBIDDEN = ("tokensieve.graph_passes.fx", "tokensieve.exporter", "tokensieve.api")


def _modules():
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            yield ".".join((package, *parts)), path, path.name == "__init__.py"


def _imports(name: str, path: Path, is_package: bool) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved against `name`)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            if node.module:  # `from . import builder` imports the submodule, not (again) the package
                out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}  # `from pkg import module`
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                out.add(arg.value)
    return out


MODULES = list(_modules())


def test_every_module_found():
    names = {m for m, _, _ in MODULES}
    assert {"tokensieve.targets.base", "tokensieve.targets.tensorrt.builder", "tokensieve.targets.tensorrt.lowering",
            "tokensieve.runtime.base", "tokensieve.runtime.engine_metadata"} <= names


@pytest.mark.parametrize("name, path, is_package", MODULES, ids=[m for m, _, _ in MODULES])
def test_one_way_imports(name, path, is_package):
    imported = _imports(name, path, is_package)
    bad = sorted(m for m in imported if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
    assert not bad, f"{name} imports {bad}"
    if name.startswith("tokensieve.runtime"):
        assert not [m for m in imported if m.startswith("tokensieve.targets")], f"{name} imports targets"
        assert not [m for m in imported if m == "onnx" or m.startswith("onnx.")], f"{name} imports onnx"


def test_resolves_relative_imports():
    """The checker itself: `from ..base import X` in targets/tensorrt/builder.py is tokensieve.targets.base."""
    name, path, is_package = next(m for m in MODULES if m[0] == "tokensieve.targets.tensorrt.builder")
    assert "tokensieve.targets.base" in _imports(name, path, is_package)
    name, path, is_package = next(m for m in MODULES if m[0] == "tokensieve.targets.tensorrt")
    assert "tokensieve.targets.tensorrt.target" in _imports(name, path, is_package)


def test_no_cycle():
    """No import cycle among these modules (every import counts, lazy ones inside functions too)."""
    names = {m for m, _, _ in MODULES}
    graph = {m: {i for i in _imports(m, p, pkg) if i in names and i != m} for m, p, pkg in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path[path.index(n):] + [m, n] if n in path else [m, n])
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
