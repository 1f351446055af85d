"""The layering of ``src/recnorm`` (CONTRIBUTING.md): kernels at the bottom import nothing from the layers
or the engine, the layers nothing from the engine, and no module imports one that imports it back, at
any depth. Imports are read from the source (module level and inside functions alike), so a circle hidden
in a function-level import counts too."""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Set

import pytest

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")


def _modules() -> Dict[str, str]:
    found = {}
    for folder, _dirs, files in os.walk(os.path.join(SRC, "recnorm")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, SRC)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = path
    return found


def _target(name: str, modules: Dict[str, str]) -> str:
    """The module a dotted name refers to: itself, or the nearest enclosing module."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str, path: str, modules: Dict[str, str]) -> Set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        out.update(t for t in (_target(n, modules) for n in names if n.startswith("recnorm")) if t and t != module)
    return out


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_reader_sees_imports_and_circles():
    """The checker itself can fail: a made-up circle is found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = _graph()
    assert "recnorm.kernels.contract" in graph["recnorm.kernels"] or graph["recnorm.kernels"]
    assert "recnorm.kernels" in {_target(t, graph) for t in graph["recnorm.nn.rnn"]} | graph["recnorm.nn.rnn"]


def test_no_import_circle_in_src_recnorm():
    assert _cycles(_graph()) == []


@pytest.mark.parametrize("lower,higher", [("recnorm.kernels", "recnorm.nn"), ("recnorm.kernels", "recnorm.experiments"),
                                          ("recnorm.nn", "recnorm.experiments"), ("recnorm.kernels", "recnorm.cli"),
                                          ("recnorm.nn", "recnorm.cli"), ("recnorm.experiments", "recnorm.cli")])
def test_lower_layers_do_not_import_higher_ones(lower, higher):
    graph = _graph()
    wrong = sorted(f"{m} -> {t}" for m, targets in graph.items() if m == lower or m.startswith(lower + ".")
                   for t in targets if t == higher or t.startswith(higher + "."))
    assert wrong == []


def _long_functions(limit: int):
    found = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit:
                found.append(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    return sorted(found)


def test_every_python_function_is_at_most_80_lines():
    """Issue 15: long functions hide the story; the C++ kernels' inner loops are the only exception."""
    assert _long_functions(80) == []
    assert _long_functions(40), "the length reader must see the longer functions"
