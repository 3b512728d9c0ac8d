"""A griffe extension that lets the package's docstrings render cleanly in the API reference.

The package's docstrings are Google style with two habits from Sphinx that Markdown does not
understand, so this rewrites them before mkdocstrings parses them (the source is untouched):

* Bare doctest runs (``>>>`` lines and their output up to a blank line) become ``pycon`` code
  fences. Left alone, an output line such as ``['a', 'b']`` reads as a Markdown reference link.
* Sphinx roles (``:func:`name```, ``:class:``, ``:meth:``, ``:data:``, ``:attr:``, ``:mod:``,
  ``:obj:``) become cross-references when the name resolves to an object of the package (looked
  up as written, then relative to the object's class, module and enclosing packages), and plain
  code otherwise, so that a stale name never breaks ``mkdocs build --strict``.

Loaded by mkdocstrings through ``extensions:`` in mkdocs.yml.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|data|attr|mod|obj|exc|const):`~?([^`<>]+?)`")
_FENCE = re.compile(r"^\s*(```|~~~)")


def fence_doctests(text: str) -> str:
    """Wrap every run of doctest lines that is not already in a code fence in a ``pycon`` fence."""
    lines = text.splitlines()
    out: list[str] = []
    in_fence = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if _FENCE.match(line):
            in_fence = not in_fence
        if in_fence or not line.lstrip().startswith(">>>"):
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(line.lstrip())]
        out.append(f"{indent}```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append(f"{indent}```")
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def _lookup(root: griffe.Module, path: str) -> Optional[Any]:
    head, _, rest = path.partition(".")
    if head != root.name:
        return None
    try:
        return root[rest] if rest else root
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _rendered(target: Any) -> bool:
    """Whether the reference renders ``target``: public, documented, in public modules."""
    try:
        if target.is_alias:
            target = target.final_target
        node = target
        while node is not None:
            if node.name.startswith("_") and not (node.name.startswith("__") and node.name.endswith("__")):
                return False
            node = node.parent
        return target.is_module or bool(target.docstring and target.docstring.value.strip())
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return False


def _scopes(obj: Any) -> list[str]:
    scopes = []
    node = obj
    while node is not None:
        if not node.is_function and not node.is_attribute:
            scopes.append(node.path)
        node = node.parent
    return scopes


def resolve_roles(text: str, obj: Any, root: griffe.Module) -> str:
    """Replace Sphinx roles with autorefs links (name resolved) or inline code (not resolved)."""

    def replace(match: re.Match) -> str:
        name = match.group(1).strip().rstrip("()")
        short = name.rsplit(".", 1)[-1]
        candidates = [name] + [f"{scope}.{name}" for scope in _scopes(obj)]
        for candidate in candidates:
            target = _lookup(root, candidate)
            if target is not None and _rendered(target):
                return f"[`{short}`][{candidate}]"
        return f"`{name}`"

    return _ROLE.sub(replace, text)


class DocstringFixes(griffe.Extension):
    """Fence doctests and resolve Sphinx roles in every docstring of a loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._visit(pkg, pkg, set())

    def _visit(self, obj: Any, root: griffe.Module, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            value = fence_doctests(obj.docstring.value)
            obj.docstring.value = resolve_roles(value, obj, root)
        for member in obj.members.values():
            if member.is_alias:
                continue
            self._visit(member, root, seen)
