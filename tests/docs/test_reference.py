"""The API reference covers the package: every public module has a page, every public symbol a
docstring and a place where it is rendered in full.

The package is read statically with griffe (what mkdocstrings renders from), so this imports
neither torch nor the optional dependencies and runs in about a second.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs.reference_generator import load_generator

griffe = pytest.importorskip("griffe")

ROOT = Path(__file__).resolve().parents[2]


gen = load_generator()
MODULES = gen.discover_modules(ROOT)
PACKAGE = griffe.load("amortize", search_paths=[str(ROOT)], resolve_aliases=False)


def _griffe(path: str):
    head, _, rest = path.partition(".")
    assert head == "amortize", path
    return PACKAGE[rest] if rest else PACKAGE


def public_names(module: str) -> list[str]:
    """``__all__``, or every non-underscored name the module itself defines (imports excluded)."""
    names = gen.module_all(module, ROOT)
    if names is not None:
        return names
    obj = _griffe(module)
    return [n for n, m in obj.members.items() if not n.startswith("_") and not m.is_alias and not m.is_module]


SYMBOLS = [(m, n) for m in MODULES for n in public_names(m)]


def test_walk_finds_every_public_source_file():
    package_dir = ROOT / "amortize"
    expected = set()
    for path in package_dir.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if any(p.startswith("_") for p in parts[:-1]) or "__pycache__" in parts:
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        elif parts[-1].startswith("_"):
            continue
        # a module counts only if every directory above it is a package
        if all((ROOT.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(1, len(parts))):
            expected.add(".".join(parts))
    assert set(MODULES) == expected
    assert "amortize.functional" in MODULES


def test_every_module_has_a_page_and_a_nav_entry():
    pages = gen.reference_pages(ROOT)
    nav_uris = set()

    def collect(items):
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            if isinstance(value, list):
                collect(value)
            else:
                nav_uris.add(value)

    collect(gen.reference_nav(ROOT))
    assert gen.INDEX_URI in pages and gen.INDEX_URI in nav_uris
    for module in MODULES:
        uri = gen.page_uri(module, ROOT)
        assert uri in pages, module
        assert uri in nav_uris, module
        if uri != gen.INDEX_URI:
            assert pages[uri].startswith(f"::: {module}\n"), pages[uri]
    assert set(pages) == nav_uris


def test_page_paths_are_unique():
    uris = [gen.page_uri(m, ROOT) for m in MODULES]
    assert len(uris) == len(set(uris))


@pytest.mark.parametrize("module,name", SYMBOLS, ids=[f"{m}.{n}" for m, n in SYMBOLS])
def test_public_symbol_is_documented_and_rendered(module, name):
    where, there = gen.home(module, name, ROOT)
    assert where in MODULES, f"{module}.{name} is defined in {where}, which has no reference page"
    if not there:  # a submodule re-exported by name: it has its own page
        return
    try:
        obj = _griffe(f"{where}.{there}")
    except KeyError:
        pytest.fail(f"{module}.__all__ names {name!r}, which {where} does not define")
    if obj.is_alias:
        try:
            obj = obj.final_target
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            pytest.fail(f"{where}.{there} is imported from outside the package; define or document it here")
    doc = obj.docstring.value.strip() if obj.docstring else ""
    assert doc, f"{where}.{there} has no docstring"
    members = gen.rendered_members(where, ROOT)
    if members is not None:
        assert there in members, f"{where}.{there} is not rendered on {gen.page_uri(where, ROOT)}"
    else:
        assert not there.startswith("_")


def test_reexports_link_to_their_home():
    for module in MODULES:
        page = gen.reference_pages(ROOT)[gen.page_uri(module, ROOT)]
        for name, target in gen.reexports(module, ROOT).items():
            assert f"`{target}`" in page
            assert name not in (gen.rendered_members(module, ROOT) or [])
