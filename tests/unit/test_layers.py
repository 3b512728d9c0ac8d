"""The package's import graph: no circle among its modules, and no lower layer importing a higher one.

Every ``import amortize...`` counts, at module level or inside a function (a lazy import is still a
dependency). The layers, lowest first; a module may import its own layer or lower ones:
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "amortize"

LAYERS: list[tuple[str, ...]] = [
    ("amortize", "amortize.registry", "amortize.checks"),                             # 0 plumbing
    ("amortize.kernels", "amortize.comm", "amortize.schedules", "amortize.amortizers"),  # 1 math and processes
    ("amortize.objectives",),                                                          # 2 objectives
    ("amortize.estimators",),                                                          # 3 estimators
    ("amortize.losses", "amortize.functional", "amortize.gradcache"),                  # 4 composition, faces
    ("amortize.models", "amortize.checkpoints", "amortize.weights_export", "amortize.data",
     "amortize.interop"),                                                              # 5 towers, files, data
    ("amortize.eval",),                                                                # 6 evaluation
    ("amortize.train",),                                                               # 7 Composer glue
    ("amortize.cli",),                                                                 # 8 command line
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The amortize modules ``path`` imports (resolved to the longest known module name)."""
    out = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t.startswith("amortize") and t != name:
                out.add(t)
    return out


def _layer(module: str) -> int:
    best, level = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    assert level is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return level


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(path, name, known) for name, path in mods.items()}


def test_every_module_is_in_a_layer():
    for name in _graph():
        _layer(name)


def test_no_lower_layer_imports_a_higher_one():
    bad = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
           for m, targets in _graph().items() for t in sorted(targets)
           if _layer(t) > _layer(m) and not (m == "amortize" or t.startswith(m + "."))]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_circle():
    graph = _graph()
    # a package's __init__ may import its own submodules (re-exports); any other circle is a bug
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_the_checker_sees_a_planted_upward_import(tmp_path):
    """The parser resolves relative and lazy imports (so the tests above can fail)."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from amortize.train import builders\n")
    known = set(_modules())
    assert "amortize.train.builders" in _imports(src, "amortize.kernels", known)
    assert _layer("amortize.train.builders") > _layer("amortize.kernels")
