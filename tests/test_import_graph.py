"""The package's import graph: no cycles, and the stages import only earlier stages.

Read statically with ``ast`` so that every import counts, also those inside functions and
under ``TYPE_CHECKING``: a function-local import hides a cycle from the interpreter but
not from a reader, and the next refactor that moves it to the top turns it into an
``ImportError``. The stage order is the one of ``docs/architecture.md``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "bulkfm"


@dataclass
class ImportGraph:
    """Modules of ``bulkfm`` and, for each, the ``bulkfm`` modules it imports."""

    edges: dict[str, set[str]] = field(default_factory=dict)


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterable[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import statement in the tree."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                yield target, alias.name


def build_graph(src: Path = SRC) -> ImportGraph:
    files = sorted((src / ROOT).rglob("*.py"))
    trees = {
        module_name(f, src): (ast.parse(f.read_text(), str(f)), f.name == "__init__.py")
        for f in files
    }
    graph = ImportGraph()
    modules = set(trees)

    # What a package re-exports: `from bulkfm.models import BulkRNABert` depends on the
    # module defining BulkRNABert, not on the package's (lazy) __init__.
    exports: dict[str, dict[str, str]] = {}
    for name, (tree, is_package) in trees.items():
        if is_package:
            exports[name] = {
                alias: target
                for target, alias in _imports(tree, name, True)
                if alias is not None and target in modules
            }

    def resolve(target: str, alias: str | None) -> str | None:
        if alias is not None and f"{target}.{alias}" in modules:
            return f"{target}.{alias}"
        seen = set()
        while alias is not None and target in exports and alias in exports[target]:
            if (target, alias) in seen:
                break
            seen.add((target, alias))
            target = exports[target][alias]
            if f"{target}.{alias}" in modules:
                return f"{target}.{alias}"
        while target and target not in modules:  # `import bulkfm.x.y` of a name, not a file
            target = target.rpartition(".")[0]
        return target or None

    for name, (tree, is_package) in trees.items():
        deps = set()
        for target, alias in _imports(tree, name, is_package):
            if target != ROOT and not target.startswith(ROOT + "."):
                continue
            dep = resolve(target, alias)
            # a package's __init__ gathering its own submodules is how packages work
            if dep is None or dep == name or (is_package and dep.startswith(name + ".")):
                continue
            deps.add(dep)
        graph.edges[name] = deps
    return graph


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan; the graph has ~150 nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:
        start = min(component)
        # breadth-first back to start within the component: the shortest cycle through it
        parents: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in parents:
            nxt = []
            for v in frontier:
                for w in sorted(edges[v] & component):
                    if w not in parents:
                        parents[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        v = parents[start]
        while v != start:
            path.append(v)
            v = parents[v]
        path.append(start)
        cycles.append(path[::-1])
    return cycles


# --------------------------------------------------------------------------- rules
def _in(module: str, packages: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


_EMBED = ("bulkfm.embed", "bulkfm.embedders", "bulkfm.adapters")
_ORCHESTRATORS = ("bulkfm.bench", "bulkfm.evaluate", "bulkfm.pipeline")
_CLI = ("bulkfm.cli",)

# stage -> later stages it must not import (docs/architecture.md: data -> tokenize ->
# models -> train -> embed/embedders -> tasks -> evaluate/bench; the CLI over all).
# Every stage: what a foundation module must not import.
_STAGES: tuple[str, ...] = (
    "bulkfm.data",
    "bulkfm.tokenize",
    "bulkfm.models",
    "bulkfm.train",
    "bulkfm.tasks",
    "bulkfm.impute",
    *_EMBED,
    *_ORCHESTRATORS,
    *_CLI,
)

LAYERS: dict[str, tuple[str, ...]] = {
    "bulkfm.schema": ("bulkfm",),
    "bulkfm.errors": ("bulkfm",),
    # foundations: the console and log-once helpers, and the process-group helpers
    "bulkfm.distributed": _STAGES,
    "bulkfm.logs": _STAGES,
    "bulkfm.data": (
        "bulkfm.tokenize",
        "bulkfm.models",
        "bulkfm.train",
        "bulkfm.tasks",
        "bulkfm.impute",
        *_EMBED,
        *_ORCHESTRATORS,
        *_CLI,
    ),
    "bulkfm.tokenize": (
        "bulkfm.models",
        "bulkfm.train",
        "bulkfm.tasks",
        *_EMBED,
        *_ORCHESTRATORS,
        *_CLI,
    ),
    "bulkfm.models": ("bulkfm.train", "bulkfm.tasks", *_EMBED, *_ORCHESTRATORS, *_CLI),
    "bulkfm.train": (*_EMBED, *_ORCHESTRATORS, *_CLI),
    "bulkfm.embedders": (*_ORCHESTRATORS, *_CLI),
    "bulkfm.adapters": (*_ORCHESTRATORS, *_CLI),
    "bulkfm.embed": (*_ORCHESTRATORS, *_CLI),
    "bulkfm.tasks": (*_ORCHESTRATORS, *_CLI),
    "bulkfm.bench": ("bulkfm.evaluate", *_CLI),
    "bulkfm.evaluate": ("bulkfm.bench", *_CLI),
}


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return build_graph()


def test_graph_sees_the_package(graph: ImportGraph) -> None:
    """Not vacuous: the walk found the modules and their imports."""
    assert {"bulkfm.data.build", "bulkfm.cli", "bulkfm.tasks.cox"} <= set(graph.edges)
    assert "bulkfm.schema" in graph.edges["bulkfm.data.build"]


def test_no_import_cycles(graph: ImportGraph) -> None:
    cycles = find_cycles(graph.edges)
    assert not cycles, (
        "import cycles (including function-local and TYPE_CHECKING imports):\n"
        + "\n".join("  " + " -> ".join(c) for c in cycles)
    )


def violations(edges: dict[str, set[str]], stage: str, forbidden: Iterable[str]) -> list[str]:
    """``module -> dep`` for each import from inside ``stage`` into ``forbidden``."""
    return sorted(
        f"{module} -> {dep}"
        for module, deps in edges.items()
        if _in(module, [stage])
        for dep in deps
        if _in(dep, forbidden) and not _in(dep, [stage])
    )


def outside_importers(edges: dict[str, set[str]], packages: Iterable[str]) -> list[str]:
    """``module -> dep`` for each import of ``packages`` from a module outside them."""
    return sorted(
        f"{module} -> {dep}"
        for module, deps in edges.items()
        if not _in(module, packages)
        for dep in deps
        if _in(dep, packages)
    )


@pytest.mark.parametrize("stage", sorted(LAYERS))
def test_stage_imports_no_later_stage(graph: ImportGraph, stage: str) -> None:
    bad = violations(graph.edges, stage, LAYERS[stage])
    assert not bad, f"{stage} must not import {', '.join(LAYERS[stage])}:\n  " + "\n  ".join(bad)


def test_only_the_cli_imports_the_cli(graph: ImportGraph) -> None:
    bad = outside_importers(graph.edges, _CLI)
    assert not bad, "library modules must not import bulkfm.cli:\n  " + "\n  ".join(bad)


# --------------------------------------------------------------------------- the tools
def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / ROOT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_cycle_through_a_function_local_import_is_found(tmp_path: Path) -> None:
    src = _write(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from bulkfm.b import f\n",
            "b.py": "def f():\n    from . import c\n",
            "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import bulkfm.a\n",
        },
    )
    cycles = find_cycles(build_graph(src).edges)
    assert cycles == [["bulkfm.a", "bulkfm.b", "bulkfm.c", "bulkfm.a"]]


def test_package_reexports_resolve_to_the_defining_module(tmp_path: Path) -> None:
    src = _write(
        tmp_path,
        {
            "__init__.py": "",
            "p/__init__.py": "from bulkfm.p.impl import Thing\nfrom .other import helper\n",
            "p/impl.py": "from bulkfm.q import g\n",
            "p/other.py": "",
            "q.py": "from bulkfm.p import Thing\nfrom bulkfm import p\n",
        },
    )
    edges = build_graph(src).edges
    assert edges["bulkfm.p"] == set()  # its own submodules do not count
    assert edges["bulkfm.q"] == {"bulkfm.p.impl", "bulkfm.p"}
    assert find_cycles(edges) == [["bulkfm.p.impl", "bulkfm.q", "bulkfm.p.impl"]]


def test_a_later_stage_import_is_a_violation() -> None:
    edges = {
        "bulkfm.data.readers": {"bulkfm.errors", "bulkfm.models.bulkrnabert"},
        "bulkfm.schema": set(),
        "bulkfm.tasks.cox": {"bulkfm.cli.common"},
        "bulkfm.cli.bench": {"bulkfm.cli.common"},
    }
    assert violations(edges, "bulkfm.data", LAYERS["bulkfm.data"]) == [
        "bulkfm.data.readers -> bulkfm.models.bulkrnabert"
    ]
    assert outside_importers(edges, _CLI) == ["bulkfm.tasks.cox -> bulkfm.cli.common"]
    assert violations(edges, "bulkfm.schema", LAYERS["bulkfm.schema"]) == []
