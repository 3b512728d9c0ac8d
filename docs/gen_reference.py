"""Generate the API reference: one Markdown page per public module of ``amortize``, and its nav.

Each page is a title and a mkdocstrings directive (``::: amortize.<module>``); the reference index
lists every module with the first line of its docstring. Modules are found by walking the package
directory, so a module added to the package appears in the docs with no edit here. A module or
package whose name starts with ``_`` is private and skipped, and so is everything inside it; a
directory without ``__init__.py`` is data, not a package.

Nothing is imported: docstrings are read with :mod:`ast`, so generating the pages needs neither
torch nor the optional dependencies.

``docs/hooks.py`` calls :func:`reference_pages` and :func:`reference_nav` on every ``mkdocs build``
and serves the pages as generated files (nothing is written into ``docs/``). To look at the pages
on disk, run ``python docs/gen_reference.py OUTDIR``.
"""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path
from typing import Optional, Union

PACKAGE = "amortize"
REFERENCE_DIR = "reference"
INDEX_URI = f"{REFERENCE_DIR}/index.md"
REPO_ROOT = Path(__file__).resolve().parent.parent

NavItem = Union[str, dict]


def _is_private(name: str) -> bool:
    return name.startswith("_")


def discover_modules(root: Path = REPO_ROOT, package: str = PACKAGE) -> list[str]:
    """Dotted names of the public modules and packages under ``root/package``, in walk order.

    A package comes before its submodules; siblings are sorted by name. The top-level package
    itself is included first.
    """
    return list(_discover(Path(root), package))


@functools.lru_cache(maxsize=None)
def _discover(root: Path, package: str) -> tuple[str, ...]:
    top = root / package
    if not (top / "__init__.py").is_file():
        return ()
    found: list[str] = []

    def walk(directory: Path, dotted: str) -> None:
        found.append(dotted)
        for path in sorted(directory.iterdir(), key=lambda p: p.name):
            if _is_private(path.name) or path.name.startswith("."):
                continue
            if path.is_dir():
                if (path / "__init__.py").is_file():
                    walk(path, f"{dotted}.{path.name}")
            elif path.suffix == ".py":
                found.append(f"{dotted}.{path.stem}")

    walk(top, package)
    return tuple(found)


def module_path(module: str, root: Path = REPO_ROOT) -> Path:
    """The source file of a dotted module name (``__init__.py`` for a package)."""
    base = root.joinpath(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return base.with_suffix(".py")


def is_package(module: str, root: Path = REPO_ROOT) -> bool:
    """Whether ``module`` is a package (a directory with ``__init__.py``)."""
    return module_path(module, root).name == "__init__.py"


def page_uri(module: str, root: Path = REPO_ROOT) -> str:
    """Where a module's page lives inside the docs directory.

    ``amortize.functional`` -> ``reference/functional.md``; a package such as ``amortize.eval`` ->
    ``reference/eval/index.md`` so that its submodules sit next to it; ``amortize`` itself has no
    page of its own (the reference index stands for it).
    """
    parts = module.split(".")[1:]
    if not parts:
        return INDEX_URI
    if is_package(module, root):
        return "/".join([REFERENCE_DIR, *parts, "index.md"])
    return "/".join([REFERENCE_DIR, *parts]) + ".md"


def summary(module: str, root: Path = REPO_ROOT) -> str:
    """The first line of a module's docstring ('' if it has none or does not parse)."""
    tree = _tree(module, root)
    if tree is None:
        return ""
    doc = ast.get_docstring(tree) or ""
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""


def _tree(module: str, root: Path) -> Optional[ast.Module]:
    path = module_path(module, root)
    try:
        return _parse(path, path.stat().st_mtime_ns)
    except OSError:
        return None


@functools.lru_cache(maxsize=None)
def _parse(path: Path, mtime_ns: int) -> Optional[ast.Module]:
    try:
        return ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return None


def module_all(module: str, root: Path = REPO_ROOT) -> Optional[list[str]]:
    """The literal ``__all__`` of a module (``__all__ = [...]`` and ``__all__ += [...]``), or None."""
    tree = _tree(module, root)
    if tree is None:
        return None
    names: Optional[list[str]] = None
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if not any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                continue
            try:
                value = [str(v) for v in ast.literal_eval(node.value)]
            except (ValueError, TypeError, SyntaxError):
                continue
            names = (names or []) + value if isinstance(node, ast.AugAssign) else value
    return names


def imported_names(module: str, root: Path = REPO_ROOT) -> dict[str, tuple[str, str]]:
    """Names a module binds with ``from X import name [as alias]`` at top level: alias -> (X, name).

    Relative imports are made absolute.
    """
    tree = _tree(module, root)
    if tree is None:
        return {}
    package = module if is_package(module, root) else module.rpartition(".")[0]
    found: dict[str, tuple[str, str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ImportFrom):
            continue
        source = node.module or ""
        if node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([source] if source else []))
        for alias in node.names:
            found[alias.asname or alias.name] = (source, alias.name)
    return found


def home(module: str, name: str, root: Path = REPO_ROOT, _depth: int = 0) -> tuple[str, str]:
    """The public module that defines ``module.name`` and the name there, following re-exports
    (``from amortize.x import name``) through public modules of the package."""
    public = set(discover_modules(root))
    source = imported_names(module, root).get(name)
    if source is None or _depth > 20:
        return module, name
    src_module, src_name = source
    if src_module in public:
        return home(src_module, src_name, root, _depth + 1)
    if f"{src_module}.{src_name}" in public:  # ``from package import submodule``
        return f"{src_module}.{src_name}", ""
    return module, name


def reexports(module: str, root: Path = REPO_ROOT) -> dict[str, str]:
    """Names of ``__all__`` that another public module defines: name -> full path of its home."""
    found: dict[str, str] = {}
    for name in module_all(module, root) or []:
        where, there = home(module, name, root)
        if where != module:
            found[name] = f"{where}.{there}" if there else where
    return found


def rendered_members(module: str, root: Path = REPO_ROOT) -> Optional[list[str]]:
    """The members a module's page renders in full: ``__all__`` minus what is re-exported from
    another public module (documented on that module's page), or None when the module has no
    ``__all__`` (mkdocstrings then renders every public, documented member)."""
    names = module_all(module, root)
    if names is None:
        return None
    moved = reexports(module, root)
    return [n for n in names if n not in moved]


def module_page(module: str, root: Path = REPO_ROOT) -> str:
    """The Markdown of one module's page.

    The mkdocstrings directive's root heading (the module's dotted name, level 1) is the page
    title and the anchor that cross-references to the module land on. Names the module re-exports
    from another public module are listed with a link to where they are documented, not rendered
    twice.
    """
    lines = [
        f"::: {module}",
        "    options:",
        "      show_root_heading: true",
        "      show_root_full_path: true",
        "      heading_level: 1",
    ]
    members = rendered_members(module, root)
    if members is not None:
        lines.append(f"      members: [{', '.join(members)}]" if members else "      members: false")
    moved = reexports(module, root)
    if moved:
        here = page_uri(module, root)
        lines += ["", "## Re-exported names", "", f"Also importable from `{module}`:", ""]
        for name, target in moved.items():
            target_module = target if target in set(discover_modules(root)) else target.rpartition(".")[0]
            link = _relative(here, page_uri(target_module, root))
            anchor = "" if target_module == target else f"#{target}"
            lines.append(f"- [`{name}`]({link}{anchor}): `{target}`")
    return "\n".join(lines) + "\n"


def _relative(from_uri: str, to_uri: str) -> str:
    """A relative link between two pages of the docs directory."""
    src = from_uri.split("/")[:-1]
    dst = to_uri.split("/")
    common = 0
    while common < len(src) and common < len(dst) - 1 and src[common] == dst[common]:
        common += 1
    return "/".join([".."] * (len(src) - common) + dst[common:])


def index_page(modules: list[str], root: Path = REPO_ROOT) -> str:
    """The reference index: the package docstring's summary and a table of every module."""
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings of the package, one page per public module. The pure math",
        "lives in `amortize.functional`; the estimators of the partition function in",
        "`amortize.estimators`; `amortize.losses` joins the two into a module that returns a dict of",
        "named terms.",
        "",
        "| module | what it holds |",
        "|---|---|",
    ]
    for module in modules:
        uri = page_uri(module, root)
        if uri == INDEX_URI:
            continue
        text = summary(module, root).replace("|", "\\|")
        lines.append(f"| [`{module}`]({_relative(INDEX_URI, uri)}) | {text} |")
    return "\n".join(lines) + "\n"


def reference_pages(root: Path = REPO_ROOT) -> dict[str, str]:
    """Every reference page: docs-relative path -> Markdown (the index included)."""
    modules = discover_modules(root)
    pages = {INDEX_URI: index_page(modules, root)}
    for module in modules:
        uri = page_uri(module, root)
        if uri != INDEX_URI:
            pages[uri] = module_page(module, root)
    return pages


def reference_nav(root: Path = REPO_ROOT) -> list[NavItem]:
    """The nav of the reference section: the index, then modules nested as the package is."""
    modules = discover_modules(root)

    def children(parent: str) -> list[NavItem]:
        items: list[NavItem] = []
        for module in modules:
            if module.rpartition(".")[0] != parent:
                continue
            if is_package(module, root):
                items.append({module: [page_uri(module, root), *children(module)]})
            else:
                items.append({module: page_uri(module, root)})
        return items

    if not modules:
        return [INDEX_URI]
    return [INDEX_URI, *children(PACKAGE)]


def write_pages(out_dir: Path, root: Path = REPO_ROOT) -> list[Path]:
    """Write the reference pages under ``out_dir`` (e.g. a docs directory); returns the files."""
    written = []
    for uri, text in reference_pages(root).items():
        path = out_dir / uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/gen_reference.py OUTDIR")
    for p in write_pages(Path(sys.argv[1])):
        print(p)
