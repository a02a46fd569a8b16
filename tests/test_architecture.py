"""Imports flow one way (docs/architecture.md): cli -> pipeline -> train -> module /
teachers / methods / data / models -> small helpers. The import graph is read from the source
with ``ast``: imports inside functions count (a lazy import that dodges a circle is still a
circle), and so do imports under ``if TYPE_CHECKING:`` (a type-only circle still ties two
modules' designs together)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import kdlab

PACKAGE = Path(kdlab.__file__).parent

# Circles tolerated for now (none).
KNOWN_CIRCLES: set[frozenset[str]] = set()


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in its body)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, one level up per dot
                    base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                    base_name = ".".join(base + ([node.module] if node.module else []))
                else:
                    base_name = node.module or ""
                # `from pkg import sub` imports the submodule pkg.sub when there is one
                targets = [f"{base_name}.{alias.name}" if f"{base_name}.{alias.name}" in files
                           else base_name for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles (a -> b -> ... -> a): in each group of modules that import one
    another, the shortest circle through each of them (each circle once)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found: list[list[str]] = []
    for group in groups:
        for start in sorted(group):
            circle = _shortest_circle(graph, group, start)
            if not any(set(circle) == set(c) and len(circle) == len(c) for c in found):
                found.append(circle)
    return found


def _shortest_circle(graph: dict[str, set[str]], group: set[str], start: str) -> list[str]:
    """A shortest path from ``start`` back to itself inside ``group`` (breadth first)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no circle through {start} in {sorted(group)}")


def test_the_graph_is_read_from_the_source(tmp_path):
    """A toy package: relative imports (one and two dots, `from . import x`), imports inside
    functions, imports for annotations only (under `if TYPE_CHECKING:`) and `import a.b` all
    make edges; a circle is found and named."""
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("import toy.a\nimport os\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nfrom .sub.b import f\n"
                              "if TYPE_CHECKING:\n    from .a import x\n")
    graph = import_graph(pkg)
    assert graph == {"toy": set(), "toy.a": {"toy.sub.b"}, "toy.sub": {"toy.sub.b"},
                     "toy.sub.b": {"toy.c"}, "toy.c": {"toy.a"},
                     "toy.d": {"toy.sub.b", "toy.a"}}
    assert circles(graph) == [["toy.a", "toy.sub.b", "toy.c", "toy.a"]]
    # two circles through one module: each is named
    graph["toy.c"].add("toy.d")
    assert circles(graph) == [["toy.a", "toy.sub.b", "toy.c", "toy.a"],
                              ["toy.d", "toy.sub.b", "toy.c", "toy.d"]]


def test_no_import_circles():
    found = [c for c in circles(import_graph()) if frozenset(c) not in KNOWN_CIRCLES]
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_nothing_below_the_pipeline_calls_back_up():
    """train is one run: it, the teachers and the generations never import the pipeline,
    and teachers/generations never import train (a run of theirs is the pipeline's)."""
    graph = import_graph()
    below = ("kdlab.train", "kdlab.teachers", "kdlab.teacher_config", "kdlab.generations",
             "kdlab.module", "kdlab.preflight")
    assert not any("kdlab.pipeline" in graph[m] for m in below)
    assert not any("kdlab.train" in graph[m] for m in below if m != "kdlab.train")


def test_config_imports_only_errors_hydra_and_omegaconf():
    tree = ast.parse((PACKAGE / "config.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and not node.level}
    ours = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and node.level}
    assert imported - set(sys.stdlib_module_names) == {"hydra", "omegaconf"}
    assert ours == {"errors"}
