"""No import circle among the benchmarks, the tests' helpers or the docs' examples either (the package has its own test).

Every ``import`` of a module of the tree counts, at module level or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("benchmarks", "studies", "tests", "docs/examples")


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    files = {_name(p): p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for m in mods:
                while m and m not in files:
                    m = m.rpartition(".")[0]
                if m and m != name and not m.startswith(name + "."):
                    targets.add(m)
        graph[name] = targets
    return graph


def test_no_import_circle_outside_the_package():
    graph, state, stack = _graph(), {}, []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            assert state.get(t) != 1, "import circle: " + " -> ".join(stack[stack.index(t):] + [t])
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert "studies.small_batch" in graph
