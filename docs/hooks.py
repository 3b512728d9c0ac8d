"""mkdocs hooks of the amortize site (``hooks:`` in mkdocs.yml).

* ``on_config``: the nav entry that points at ``reference/index.md`` becomes the generated
  reference section (one page per public module, see ``docs/gen_reference.py``), and pages found
  in a directory-backed section (``tutorials/``, ``concepts/``) but not listed in the nav are
  appended to it, so a new tutorial is never left out of the nav.
* ``on_files``: the reference pages are added as generated files (in memory; nothing is written
  into ``docs/``), and so is ``changelog.md``, the repository's ``CHANGELOG.md`` (one file, shown
  on GitHub and on the site). A hand-written file at the same path wins.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

_HERE = Path(__file__).resolve().parent


def _load_generator():
    name = "amortize_docs_gen_reference"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _HERE / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


gen = _load_generator()

#: nav sections backed by one directory of the docs: unlisted pages there are appended
AUTO_SECTIONS = {"Tutorials": "tutorials/", "Concepts": "concepts/"}


def _nav_uris(items) -> set[str]:
    found: set[str] = set()
    for item in items or []:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            found |= _nav_uris(value)
        elif isinstance(value, str):
            found.add(value)
    return found


def _complete_section(entries: list, directory: str, docs_dir: Path) -> list:
    listed = _nav_uris(entries)
    extra = [
        f"{directory}{p.name}"
        for p in sorted((docs_dir / directory).glob("*.md"))
        if f"{directory}{p.name}" not in listed
    ]
    return entries + extra


def on_config(config, **kwargs):
    root = Path(config["config_file_path"]).resolve().parent
    docs_dir = Path(config["docs_dir"])
    gen._discover.cache_clear()  # `mkdocs serve` reloads the config: see new modules
    nav = config.get("nav")
    if nav is None:
        return config
    reference = gen.reference_nav(root)
    placed = False
    new_nav = []
    for item in nav:
        if isinstance(item, dict):
            (title, value), = item.items()
            if value == gen.INDEX_URI or (isinstance(value, list) and gen.INDEX_URI in value):
                item = {title: reference}
                placed = True
            elif title in AUTO_SECTIONS and isinstance(value, list):
                item = {title: _complete_section(value, AUTO_SECTIONS[title], docs_dir)}
        new_nav.append(item)
    if not placed:
        new_nav.append({"API reference": reference})
    config["nav"] = new_nav
    return config


#: pages of the site that are files at the repository root: site path -> root file
ROOT_PAGES = {"changelog.md": "CHANGELOG.md"}


def on_files(files: Files, config, **kwargs) -> Files:
    root = Path(config["config_file_path"]).resolve().parent
    pages = dict(gen.reference_pages(root))
    for uri, name in ROOT_PAGES.items():
        if (root / name).is_file():
            pages[uri] = (root / name).read_text(encoding="utf-8")
    for uri, content in pages.items():
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, content=content))
    return files
