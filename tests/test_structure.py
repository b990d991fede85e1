"""The package's shape: data flows spec -> AST -> IR -> analysis -> kernels -> callable, with no
import cycles, and the reference backend (the oracle) imported by nothing that it checks."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PKG = Path(__file__).resolve().parent.parent / "attnc"


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
        pkg = pkg[:len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    # `from pkg import name` imports pkg.name when that is a module, else pkg itself.
    return [f"{base}.{a.name}" for a in node.names] + [base]


def _runtime_nodes(tree: ast.AST):
    """All nodes, except those under `if TYPE_CHECKING:` (annotations only, never imported)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> nx.DiGraph:
    """Every import anywhere in a module (function-level ones too: a lazy import is still a
    dependency). Edges go from importer to imported attnc module."""
    files = {_module(p): p for p in PKG.rglob("*.py")}
    g = nx.DiGraph()
    g.add_nodes_from(files)
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in _runtime_nodes(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = _resolve(mod, is_pkg, node)
            for t in targets:
                if t in files and t != mod:
                    g.add_edge(mod, t)
                    break  # the most specific module named by this import
    return g


def test_no_import_cycles():
    g = import_graph()
    # A package's __init__ re-exporting its submodules is the one allowed back edge.
    g.remove_edges_from([(a, b) for a, b in list(g.edges) if b.startswith(a + ".")])
    cycles = list(nx.simple_cycles(g))
    assert not cycles, f"import cycles: {cycles}"


def test_the_oracle_is_imported_only_by_the_reference_path():
    g = import_graph()
    oracle = {m for m in g if m.startswith("attnc.backends.reference")}
    production = [m for m in g if m.startswith(("attnc.ir", "attnc.analysis", "attnc.codegen",
                                                 "attnc.backends.triton", "attnc.pipeline", "attnc.settings"))]
    for m in production:
        reach = nx.descendants(g, m)
        assert not (reach & oracle), f"{m} reaches the reference backend: {sorted(reach & oracle)}"
    # The runtime reaches it only through its backend="reference" dispatch and routed_mask (routing
    # has no kernels yet), both lazy imports inside those methods.
    src = (PKG / "runtime.py").read_text()
    tree = ast.parse(src)
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any("reference" in ast.unparse(n) for n in top_level)


def test_layers_import_only_layers_below():
    order = ["attnc.errors", "attnc.frontend", "attnc.ir", "attnc.analysis", "attnc.codegen", "attnc.pipeline",
             "attnc.backends", "attnc.runtime", "attnc.explain", "attnc.cli"]

    def layer(m: str) -> int | None:
        for n, prefix in enumerate(order):
            if m == prefix or m.startswith(prefix + "."):
                return n
        return None

    g = import_graph()
    bad = [(a, b) for a, b in g.edges
           if layer(a) is not None and layer(b) is not None and layer(b) > layer(a)]
    assert not bad, f"imports from a higher layer: {bad}"


def test_modules_stay_small():
    big = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 550}
    assert not big, f"modules over ~500 lines: {big}"
