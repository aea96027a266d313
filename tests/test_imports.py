"""The package's import graph, read with `ast` (function-level and TYPE_CHECKING imports included): no cycle,
and no module imports one of a higher layer. A new module gets its layer in LAYERS."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mor_pretrain"

# Lowest first. A module may import modules of its own layer or of lower ones; a name covers a package's
# submodules too. Layers, not a list of allowed edges: where a module sits says what it may depend on.
LAYERS: list[tuple[str, ...]] = [
    ("models",),  # single-device model code
    ("config",),
    ("flops", "distributed", "optim", "parallel", "generate"),
    ("data", "serving"),
    ("folders",),  # every model folder, written and read: the home below everything that reads one
    ("checkpoint",),  # training-time save and resume, on folders' format
    ("convert", "evaluate", "metrics"),
    ("trainer",),
    ("estimate",),  # traces the trainer's step
    ("isoflop", "bench", "integrations"),
    ("gpu_check",),
]
LAYER = {f"mor_pretrain.{name}": i for i, names in enumerate(LAYERS) for name in names}


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under `root` (a package's __init__.py is the package)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _packages_of(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, known: set[str]) -> set[str]:
    """The package modules one import statement loads by name (a `from X import m` of a submodule m: X.m)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
        return {max((k for k in known if n == k or n.startswith(k + ".")), key=len, default=n) for n in names}
    base = node.module or ""
    if node.level:  # relative: from the importer's package, one level up per extra dot
        package = importer if is_package else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file, with the packages whose __init__ such an
    import runs (except the importer's own, which are already loading)."""
    modules = module_names(root)
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        own = {name, *_packages_of(name)}
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(node, name, is_package, known):
                if target not in known:
                    continue
                edges |= {t for t in (target, *_packages_of(target)) if t in known and t not in own}
        graph[name] = edges
    return graph


def layer(name: str) -> int | None:
    matches = [k for k in LAYER if name == k or name.startswith(k + ".")]
    return LAYER[max(matches, key=len)] if matches else None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every edge from a module to one of a higher layer, in words."""
    found = []
    for a in sorted(graph):
        for b in sorted(graph[a]):
            la, lb = layer(a), layer(b)
            if la is not None and lb is not None and lb > la:
                found.append(f"{a} (layer {la}) imports {b} (layer {lb})")
    return found


def test_every_module_has_a_layer():
    unplaced = [m for m in module_names(PACKAGE) if m != "mor_pretrain" and layer(m) is None]
    assert not unplaced, f"give these modules a layer in tests/test_imports.py LAYERS: {unplaced}"


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph(PACKAGE))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_imports_a_higher_layer():
    assert upward_imports(import_graph(PACKAGE)) == []


def test_the_reader_sees_function_level_and_submodule_imports():
    """The graph is only as good as its reading: a lazy import inside a function, `from package import
    submodule` and the package __init__ an import runs are all edges."""
    graph = import_graph(PACKAGE)
    assert "mor_pretrain.folders" in graph["mor_pretrain.evaluate"]
    assert "mor_pretrain.trainer" in graph["mor_pretrain.estimate"]  # inside a function
    assert "mor_pretrain.data" in graph["mor_pretrain.folders"]  # data/__init__ runs first
    assert "mor_pretrain.integrations.lm_eval" in graph["mor_pretrain.integrations.lm_eval_cli"]
