"""The layers, read from the source: apps -> dsstream -> engine -> kernels, and
no import running back up; no import circle beyond those still being taken
apart (listed here, so that a new one fails and a removed one must be struck)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"kernels": 0, "engine": 1, "dsstream": 2, "apps": 3}  # lower may not import higher
# Circles left to remove (the redesign's later steps); each a set of modules.
KNOWN_CIRCLES: list[set[str]] = []


def project_modules() -> dict[str, Path]:
    mods = {}
    for pkg in LAYERS:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _imported(node: ast.AST, mods: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        # "from pkg import mod" depends on pkg.mod when that is a module (or a
        # compiled extension), else on pkg itself.
        full = [f"{node.module}.{a.name}" for a in node.names]
        return [f if f in mods or f.endswith("._native") else node.module for f in full]
    return []


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports, anywhere in its source (imports
    inside functions count: they are the same dependency, only later).
    Compiled extensions (``_native``) are leaves, not their package."""
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for target in _imported(node, mods):
                if target.split(".")[0] not in LAYERS or target.endswith("._native"):
                    continue
                while target and target not in mods:  # "pkg.mod.attr" -> "pkg.mod"
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    graph = import_graph(project_modules())
    upward = sorted(
        f"{a} -> {b}"
        for a, targets in graph.items()
        for b in targets
        if LAYERS[b.split(".")[0]] > LAYERS[a.split(".")[0]]
    )
    assert not upward, upward


def test_no_import_circle_but_those_being_removed():
    found = circles(import_graph(project_modules()))
    assert [c for c in found if c not in KNOWN_CIRCLES] == []
    assert [c for c in KNOWN_CIRCLES if c not in found] == [], "a circle is gone: strike it"


def test_the_checks_see_a_circle_and_an_upward_import():
    graph = {"engine.a": {"dsstream.b"}, "dsstream.b": {"engine.a"}, "dsstream.c": set()}
    assert circles(graph) == [{"engine.a", "dsstream.b"}]
    assert circles({"a.x": {"a.y"}, "a.y": set()}) == []
