"""No import cycle inside core/, counting imports inside functions too.

A cycle hidden in a function body still couples two modules both ways (each needs the
other to be read and tested), so the graph is built from every import statement in the
source, wherever it sits, not from what happens to run at import time.
"""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "core"


def _module_name(path: Path, top: Path) -> str:
    parts = list(path.relative_to(top).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The core module ``name`` refers to: itself, or its closest enclosing package."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(root: Path = CORE) -> dict[str, set[str]]:
    files = {_module_name(p, root.parent): p for p in root.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            deps: list[str | None] = []
            if isinstance(node, ast.Import):
                deps = [_resolve(a.name, modules) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    up = parts[: len(parts) - (node.level - 1)]
                    base = ".".join([*up, base] if base else up)
                # ``from core import checkpoint`` imports the submodule core.checkpoint;
                # ``from core.pruned import X`` the package core.pruned
                deps = [_resolve(f"{base}.{a.name}", modules) for a in node.names]
            graph[mod].update(d for d in deps if d is not None and d != mod)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (iterative DFS, three colours)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        path = [start]
        state[start] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                state[node] = 2
                stack.pop()
                path.pop()
                continue
            nxt = todo.pop(0)
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(graph[nxt])))
    return None


def test_core_has_no_import_cycle():
    graph = import_graph()
    assert {"core.train", "core.rundir", "core.package", "core.artifacts"} <= set(graph)
    assert "core.rundir" in graph["core.package"]  # the parser sees function-level imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_check_finds_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "core"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from core.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("import os\n\ndef g():\n    from core import a, sub\n")
    graph = import_graph(pkg)
    assert graph["core.a"] == {"core.sub.b"} and graph["core.sub.b"] == {"core.c"}
    assert graph["core.c"] == {"core.a", "core.sub"}
    assert find_cycle(graph) == ["core.a", "core.sub.b", "core.c", "core.a"]
    graph["core.c"].clear()
    assert find_cycle(graph) is None
