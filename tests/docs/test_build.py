"""The docs site builds with ``mkdocs build --strict`` (no warnings), offline, and renders the API.

One build (a few seconds) is shared by the tests of this file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs.reference_generator import load_generator

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings")

ROOT = Path(__file__).resolve().parents[2]


gen = load_generator()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    assert "WARNING" not in log, log
    return out


def _html(site: Path, uri: str) -> str:
    stem = uri[: -len(".md")]
    path = site / (stem[: -len("index")] if stem.endswith("index") else stem + "/") / "index.html"
    return path.read_text(encoding="utf-8")


def test_every_reference_page_is_built_with_its_module_anchor(site):
    for module in gen.discover_modules(ROOT):
        uri = gen.page_uri(module, ROOT)
        if uri == gen.INDEX_URI:
            continue
        assert f'id="{module}"' in _html(site, uri), module


def test_rendered_members_have_anchors(site):
    for module in gen.discover_modules(ROOT):
        uri = gen.page_uri(module, ROOT)
        if uri == gen.INDEX_URI:
            continue
        html = _html(site, uri)
        for name in gen.rendered_members(module, ROOT) or []:
            assert f'id="{module}.{name}"' in html, f"{module}.{name} is not rendered on {uri} (no docstring?)"


def test_nothing_is_fetched_from_the_internet(site):
    remote = re.compile(r"""<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=["'](?:https?:)?//""", re.I)
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        bad = [m.group(0) for m in remote.finditer(text)]
        assert not bad, f"{page.relative_to(site)} loads remote resources: {bad[:3]}"
        assert "fonts.googleapis" not in text and "fonts.gstatic" not in text
    for css in site.rglob("*.css"):
        text = css.read_text(encoding="utf-8", errors="replace")
        assert not re.search(r"""(?:@import|url\()\s*["']?https?://""", text), css


def test_math_renders_with_the_vendored_katex(site):
    assert (site / "assets/katex/katex.min.js").is_file()
    assert (site / "assets/katex/contrib/auto-render.min.js").is_file()
    assert (site / "assets/katex/fonts/KaTeX_Main-Regular.woff2").is_file()
    ebm = _html(site, "concepts/ebm.md")
    assert 'class="arithmatex"' in ebm
    assert "assets/katex/katex.min.js" in ebm and "assets/katex-init.js" in ebm
