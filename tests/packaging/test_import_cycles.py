"""The import graph of `adapterhub_server`, `trainer` and `client`, read with `ast` (nothing is
imported): no cycles among module-level imports, and model code never imports serving code.

Graph conventions:

- A node is a module; a package is its `__init__.py` (`x/__init__.py` is node `x`).
- `import a.b.c` is an edge to `a.b.c`; `from a.b import c` is an edge to `a.b.c` when that is
  a module, else to `a.b`. Relative imports are resolved against the importing file. Only
  targets inside the three packages count.
- The parents Python initialises on the way (`a`, `a.b` for `import a.b.c`) are not edges:
  they are already in `sys.modules` before any of their submodules runs, so `x/__init__.py`
  importing `x.y`, and `x.y` importing `x.z`, is normal. `x.y` importing a name from `x` (an
  edge to `x`'s `__init__`) while `x/__init__.py` imports `x.y` is a cycle.
- Each edge has a kind: "module" runs when the importing module is imported (top level, class
  bodies, `try`/`if` blocks); "function" sits inside a function and runs when called;
  "type-checking" sits under `if TYPE_CHECKING:` and never runs. Cycles are reported over
  module-level edges only (asserted) and over all edges (reported, since a deferred import is
  the usual way to break a cycle).

Run this file as a script to print both reports.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("adapterhub_server", "trainer", "client")

KNOWN_CYCLES: set[tuple[str, ...]] = set()
"""Strongly connected components (sorted module names) of the module-level import graph that
exist today. Must match exactly: a new cycle fails, and a removed one means deleting it here."""

MODELS = "adapterhub_server.models"
SERVING = (
    "adapterhub_server.api",
    "adapterhub_server.server",
    "adapterhub_server.engine.async_engine",
    "adapterhub_server.cluster",
)
"""Model code (`adapterhub_server/models/`) imports none of these, nor their submodules."""

KNOWN_MODEL_TO_SERVING: set[tuple[str, str]] = set()
"""(importer, imported) pairs that break the rule today; must match exactly."""


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    kind: str  # "module", "function" or "type-checking"
    path: str  # relative to the repository root
    line: int
    text: str

    def where(self) -> str:
        return f"{self.path}:{self.line} [{self.kind}] {self.text}"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def discover(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Every module of `packages` under `root`, by dotted name."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                modules[module_name(path, root)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement in `tree` with its kind (see the module docstring)."""
    found: list[tuple[ast.Import | ast.ImportFrom, str]] = []

    def visit(node: ast.AST, kind: str) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append((node, kind))
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inner = "type-checking" if kind == "type-checking" else "function"
            for child in ast.iter_child_nodes(node):
                visit(child, inner)
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, "type-checking")
            for child in node.orelse:
                visit(child, kind)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, kind)

    visit(tree, "module")
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """`name` if it is a module, else its longest prefix that is one (`a.b.C` -> `a.b`)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _base(node: ast.ImportFrom, importer: str, is_package: bool) -> str | None:
    """The absolute module `from <base> import ...` names; None if it climbs out of the tree."""
    if node.level == 0:
        return node.module
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    if node.level > len(package):  # beyond the top-level package: Python refuses it too
        return None
    anchor = package[: len(package) - (node.level - 1)]
    return ".".join([*anchor, *([node.module] if node.module else [])])


def edges_of(name: str, path: Path, modules: dict[str, Path], root: Path) -> list[Edge]:
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    rel = path.relative_to(root).as_posix()
    is_package = path.name == "__init__.py"
    edges: list[Edge] = []
    for node, kind in _imports(tree):
        text = " ".join((ast.get_source_segment(source, node) or "").split())
        targets: list[str | None] = []
        if isinstance(node, ast.Import):
            targets = [_resolve(alias.name, modules) for alias in node.names]
        else:
            base = _base(node, name, is_package)
            if base is None:
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.append(submodule if submodule in modules else _resolve(base, modules))
        for target in dict.fromkeys(targets):
            # A module importing a name from itself (`from . import x` in `x/__init__.py`
            # when `x` names no submodule) is no edge.
            if target is not None and target != name:
                edges.append(Edge(name, target, kind, rel, node.lineno, text))
    return edges


def build_graph(root: Path = REPO, packages: Iterable[str] = PACKAGES) -> list[Edge]:
    modules = discover(root, packages)
    return [e for name, path in modules.items() for e in edges_of(name, path, modules, root)]


def strongly_connected(nodes: Iterable[str], edges: Iterable[Edge]) -> list[list[str]]:
    """Tarjan's algorithm (iterative). Components with a cycle only: two or more modules, or
    one that imports itself. Each sorted; the list sorted."""
    graph: dict[str, list[str]] = {n: [] for n in nodes}
    self_loops: set[str] = set()
    for e in edges:
        graph.setdefault(e.src, []).append(e.dst)
        graph.setdefault(e.dst, [])
        if e.src == e.dst:
            self_loops.add(e.src)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(set(graph[start]))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(set(graph[succ])))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in self_loops:
                    components.append(sorted(component))
    return sorted(components)


def module_level(edges: Iterable[Edge]) -> list[Edge]:
    return [e for e in edges if e.kind == "module"]


def describe(components: list[list[str]], edges: list[Edge]) -> str:
    """Each component and the import lines between its members."""
    lines: list[str] = []
    for component in components:
        members = set(component)
        lines.append(f"cycle among {', '.join(component)}:")
        inside = [e for e in edges if e.src in members and e.dst in members]
        for e in sorted(inside, key=lambda e: (e.path, e.line, e.dst)):
            lines.append(f"  {e.src} -> {e.dst}  at {e.where()}")
    return "\n".join(lines) or "no cycles"


def model_to_serving(edges: Iterable[Edge]) -> list[Edge]:
    def within(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    return [
        e
        for e in edges
        if within(e.src, MODELS) and any(within(e.dst, serving) for serving in SERVING)
    ]


# --- the repository ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> list[Edge]:
    return build_graph()


def test_every_package_is_parsed(graph: list[Edge]) -> None:
    modules = discover(REPO, PACKAGES)
    assert {m.split(".")[0] for m in modules} == set(PACKAGES)
    assert len(graph) > len(modules)  # a sanity floor: the packages do import each other


def test_no_cycles_among_module_level_imports(graph: list[Edge]) -> None:
    edges = module_level(graph)
    components = strongly_connected(discover(REPO, PACKAGES), edges)
    found = {tuple(c) for c in components}
    assert found == KNOWN_CYCLES, (
        f"module-level import cycles changed\n"
        f"new: {sorted(found - KNOWN_CYCLES)}\ngone: {sorted(KNOWN_CYCLES - found)}\n"
        + describe(components, edges)
    )


def test_cycles_over_all_imports_are_reported(graph: list[Edge]) -> None:
    """Deferred imports may close a cycle (that is how cycles get broken), so this reports them
    (see them with `pytest -rP` or `-s`) without failing; every module-level cycle must show
    up inside one of these."""
    modules = discover(REPO, PACKAGES)
    everything = strongly_connected(modules, graph)
    print("import cycles over all imports (function-level and TYPE_CHECKING included):")
    print(describe(everything, graph))
    for component in strongly_connected(modules, module_level(graph)):
        assert any(set(component) <= set(c) for c in everything)


def test_model_code_never_imports_serving_code(graph: list[Edge]) -> None:
    violations = model_to_serving(graph)
    found = {(e.src, e.dst) for e in violations}
    assert found == KNOWN_MODEL_TO_SERVING, "\n".join(e.where() for e in violations)


# --- the checker itself, on a synthetic tree ---------------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_resolution_and_kinds(tmp_path: Path) -> None:
    _tree(
        tmp_path,
        {
            "p/__init__.py": "from .a import A\nfrom . import sub\nfrom . import A as again\n",
            "p/a.py": (
                "import p.b\n"
                "from p.sub.c import X\n"
                "from .sub import c\n"
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n"
                "    from p import b\n"
                "def f():\n"
                "    from . import B\n"
                "    import os\n"
                "class K:\n"
                "    from p.sub import c as cc\n"
            ),
            "p/b.py": "",
            "p/sub/__init__.py": "from ..b import *\n",
            "p/sub/c.py": "from . import a_name\nfrom .. import b\nfrom ... import beyond\n",
        },
    )
    edges = {(e.src, e.dst, e.kind, e.line) for e in build_graph(tmp_path, ["p"])}
    assert edges == {
        ("p", "p.a", "module", 1),
        ("p", "p.sub", "module", 2),  # line 3 names `p` itself: no edge
        ("p.a", "p.b", "module", 1),
        ("p.a", "p.sub.c", "module", 2),
        ("p.a", "p.sub.c", "module", 3),
        ("p.a", "p.b", "type-checking", 6),
        ("p.a", "p", "function", 8),  # a name from the package: its `__init__`
        ("p.a", "p.sub.c", "module", 11),  # a class body runs at import
        ("p.sub", "p.b", "module", 1),
        ("p.sub.c", "p.sub", "module", 1),
        ("p.sub.c", "p.b", "module", 2),
    }


def test_tarjan_finds_cycles_and_self_loops() -> None:
    def e(src: str, dst: str) -> Edge:
        return Edge(src, dst, "module", "x.py", 1, "")

    edges = [e("a", "b"), e("b", "c"), e("c", "a"), e("c", "d"), e("d", "d"), e("e", "a")]
    assert strongly_connected("abcdef", edges) == [["a", "b", "c"], ["d"]]
    assert strongly_connected("ab", [e("a", "b")]) == []


def test_a_package_init_importing_its_submodules_is_not_a_cycle(tmp_path: Path) -> None:
    _tree(
        tmp_path,
        {
            "q/__init__.py": "from .x import X\nfrom .y import Y\n",
            "q/x.py": "from .y import Y\n",
            "q/y.py": "",
        },
    )
    graph = build_graph(tmp_path, ["q"])
    assert strongly_connected(discover(tmp_path, ["q"]), graph) == []
    # ...but a submodule taking a name from its package's `__init__` is one.
    (tmp_path / "q/y.py").write_text("from q import X\n")
    graph = build_graph(tmp_path, ["q"])
    assert strongly_connected(discover(tmp_path, ["q"]), graph) == [["q", "q.x", "q.y"]]


if __name__ == "__main__":
    all_edges = build_graph()
    nodes = discover(REPO, PACKAGES)
    print("== module-level imports")
    print(describe(strongly_connected(nodes, module_level(all_edges)), module_level(all_edges)))
    print("\n== all imports")
    print(describe(strongly_connected(nodes, all_edges), all_edges))
    print("\n== model code importing serving code")
    print("\n".join(e.where() for e in model_to_serving(all_edges)) or "none")
