"""The layers of DESIGN.md, checked on the source: no circles of modules, and each layer imports only below it.

Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tuning_magics

ROOT = Path(tuning_magics.__file__).parent
PACKAGE = "tuning_magics"


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that ``name`` imports (a package counts only when no submodule is named)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else (node.module or "")
            subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
            found.update(subs if subs else [base])
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _external(name: str) -> set[str]:
    path = _modules()[name]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return out


def test_the_graph_sees_imports():
    graph = _graph()
    assert f"{PACKAGE}.errors" in graph[f"{PACKAGE}.api"]
    assert f"{PACKAGE}.datasets.formats" in graph[f"{PACKAGE}.datasets.validate"]


def test_no_circles_of_modules():
    graph = _graph()
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


def _reachable(start: str, graph) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_dataset_layer_and_the_display_never_reach_a_backend_or_the_api():
    """They may reach the settings, which check a backend's name in the registry, but never a backend's code."""
    graph = _graph()
    for name in graph:
        if name.startswith((f"{PACKAGE}.datasets", f"{PACKAGE}.display")):
            reached = _reachable(name, graph)
            assert not {m for m in reached if m.startswith(f"{PACKAGE}.backends.")}, name
            assert f"{PACKAGE}.api" not in reached, name
            assert f"{PACKAGE}.backends" not in graph[name], name  # not even the registry, directly


def test_only_the_backends_themselves_import_a_backend_module():
    """api, magics, config and the rest know backends through the registry (tuning_magics.backends) alone."""
    graph = _graph()
    for name, imported in graph.items():
        if name.startswith(f"{PACKAGE}.backends"):
            continue
        assert not {m for m in imported if m.startswith(f"{PACKAGE}.backends.")}, name


def test_no_ipython_below_the_magics_and_no_widgets_below_the_display():
    for name in _modules():
        if name in (f"{PACKAGE}.magics", PACKAGE):
            continue
        external = _external(name)
        assert not {m for m in external if m.split(".")[0] == "IPython"} or name.startswith(f"{PACKAGE}.display"), name
        if not name.startswith(f"{PACKAGE}.display"):
            assert not {m for m in external if m.split(".")[0] == "ipywidgets"}, name


def test_a_backend_never_reaches_another_backend_or_the_api():
    """Adding or changing a backend touches no other backend: each imports only the shared layers."""
    graph = _graph()
    backends = {name.split(".")[2] for name in graph if name.startswith(f"{PACKAGE}.backends.") and name.count(".") >= 2}
    assert {"local", "vertex"} <= backends
    for name in graph:
        if not name.startswith(f"{PACKAGE}.backends.") or name.count(".") < 2:
            continue
        own = name.split(".")[2]
        reached = _reachable(name, graph)
        others = {m for m in reached if m.startswith(f"{PACKAGE}.backends.") and m.split(".")[2] != own}
        assert not others, (name, sorted(others))
        assert f"{PACKAGE}.api" not in reached, name
