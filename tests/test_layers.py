"""The house is one-way: no import cycles among tokensieve's modules, and no module imports a higher layer.

The graph is read from the source (every `import` / `from … import`, at module level or inside a function: a lazy
import is still a dependency), with the folders mapped as pyproject's package-dir maps them. The layer order below is
the architecture; changing it is a design decision, not a test fix.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"core": "tokensieve", "exporter": "tokensieve.exporter", "graph_passes": "tokensieve.graph_passes",
                "targets": "tokensieve.targets", "runtime": "tokensieve.runtime", "scripts": "tokensieve.scripts"}

# Bottom to top. A module belongs to the first layer with a matching prefix (exact module or `prefix.`-subtree), most
# specific prefix wins. A module may import its own layer or lower ones.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("tokensieve.errors", "tokensieve.fileio", "tokensieve.manifest", "tokensieve.trust")),
    ("methods", ("tokensieve.graph_passes.methods",)),                     # pure torch math
    ("recipe", ("tokensieve.recipe",)),                                    # the one stage grammar -> typed stages
    ("runtime", ("tokensieve.runtime",)),                                  # loads and runs artifacts
    ("passes", ("tokensieve.graph_passes", "tokensieve.flops")),
    ("exporter", ("tokensieve.exporter",)),
    ("targets", ("tokensieve.targets",)),
    ("api", ("tokensieve.models", "tokensieve.measure", "tokensieve.api", "tokensieve.vlm_api",
             "tokensieve.vlm_qwen2")),
    ("tools", ("tokensieve.benchmark", "tokensieve.tune", "tokensieve.visualize", "tokensieve.cli",
               "tokensieve.cli_vlm", "tokensieve")),                       # `tokensieve` itself: the lazy facade
    ("scripts", ("tokensieve.scripts",)),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([package, *parts])] = path
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The tokensieve modules `name` imports (a `from pkg import sub` names the submodule when there is one)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - (0 if is_package else 1)]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            subs = {f"{module}.{a.name}" for a in node.names} & known
            out |= subs if subs else ({module} & known)
    return out - {name}


def _layer(module: str) -> int:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{module} is in no layer; add it to LAYERS in tests/test_layers.py"
    return best


GRAPH = {name: _imports(name, path, set(_modules())) for name, path in _modules().items()}


def test_every_module_has_a_layer():
    for module in GRAPH:
        _layer(module)


def test_no_upward_imports():
    upward = [f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
              for m, targets in sorted(GRAPH.items()) for t in sorted(targets) if _layer(t) > _layer(m)]
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


# Stages hand plain artifacts forward and never import each other (STYLE.md 1); the method math is shared by all.
NEVER = [
    ("tokensieve.targets", "tokensieve.graph_passes"),    # ONNX lowering for TensorRT is a rule list under targets/
    ("tokensieve.targets", "tokensieve.exporter"),
    ("tokensieve.exporter", "tokensieve.graph_passes.fx"),
    ("tokensieve.exporter", "tokensieve.graph_passes.blocks"),
    ("tokensieve.runtime", "tokensieve.graph_passes.fx"),
    ("tokensieve.graph_passes", "tokensieve.exporter"),
]


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_stages_do_not_import_each_other():
    bad = [f"{m} imports {t}" for m, targets in sorted(GRAPH.items()) for t in sorted(targets)
           for src, dst in NEVER if _under(m, src) and _under(t, dst)
           and not _under(t, "tokensieve.graph_passes.methods")]
    assert not bad, "imports between stages:\n" + "\n".join(bad)


def test_the_checks_can_fail():
    """The walker sees a lazy import inside a function, and the two checks flag a planted cycle and upward import."""
    assert "tokensieve.api" in GRAPH["tokensieve.cli"]  # `from tokensieve import api` inside Tool.run
    planted = {**GRAPH, "tokensieve.errors": {"tokensieve.api"}}
    assert _cycles(planted)
    assert _layer("tokensieve.api") > _layer("tokensieve.errors")


@pytest.mark.parametrize("module", ["tokensieve.runtime"])
def test_runtime_loads_no_compiler(module):
    """runtime/ runs artifacts: it never imports onnx, the torch.export tracer, targets or the exporter."""
    bad = []
    for name, path in _modules().items():
        if name != module and not name.startswith(module + "."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{name}: {n}" for n in names if n == "onnx" or n.startswith("onnx.")]
    assert not bad, "runtime imports onnx:\n" + "\n".join(bad)
