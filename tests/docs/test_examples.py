"""Every Python example in the docs and the README runs.

Each fenced block whose info string is ``python`` (or ``py``) is collected from ``docs/**/*.md``
and ``README.md``. A page's blocks run in order in one namespace, so an example can build on the
ones above it, inside a fresh temporary working directory. Info strings:

* ``python notest``: shown, never run (pseudo-code, commands that need data or a cluster);
* ``python slow``: run, but the whole page is then marked ``slow`` (``make test`` skips it,
  ``make test-all`` runs it). Keep the examples of a page fast enough not to need it.

The blocks run with two environment variables set, for pages that use files of the repository or
start Python subprocesses: ``AMORTIZE_DOCS_ROOT`` is the repository root (a page reads
``docs/examples/...`` from there and falls back to the working directory for a reader who runs it
from a checkout), and ``PYTHONPATH`` starts with it, so that a subprocess imports the same
``amortize`` as the test.
"""

from __future__ import annotations

import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*?)\s*$")
RUN = {"python", "py"}


@dataclass
class Block:
    line: int
    info: str
    code: str

    @property
    def words(self) -> list[str]:
        return self.info.replace("{", " ").replace("}", " ").replace(".", " ").split()

    @property
    def language(self) -> str:
        return self.words[0].lower() if self.words else ""

    @property
    def runs(self) -> bool:
        return self.language in RUN and "notest" not in self.words[1:]

    @property
    def slow(self) -> bool:
        return self.runs and "slow" in self.words[1:]


def extract_blocks(text: str) -> list[Block]:
    """Fenced code blocks of a Markdown text (indented ones too, e.g. inside admonitions)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, start = m.group("fence"), i
        body: list[str] = []
        i += 1
        while i < len(lines):
            close = FENCE.match(lines[i])
            if close and close.group("fence").startswith(fence) and not close.group("info"):
                break
            body.append(lines[i])
            i += 1
        blocks.append(Block(line=start + 1, info=m.group("info"), code=textwrap.dedent("\n".join(body))))
        i += 1
    return blocks


def pages() -> list[Path]:
    found = sorted((ROOT / "docs").rglob("*.md"))
    if (ROOT / "README.md").is_file():
        found.insert(0, ROOT / "README.md")
    return [p for p in found if any(b.runs for b in extract_blocks(p.read_text(encoding="utf-8")))]


def _params():
    params = []
    for path in pages():
        rel = path.relative_to(ROOT).as_posix()
        blocks = extract_blocks(path.read_text(encoding="utf-8"))
        marks = [pytest.mark.slow] if any(b.slow for b in blocks) else []
        params.append(pytest.param(path, id=rel, marks=marks))
    return params


@pytest.mark.parametrize("path", _params())
def test_page_examples_run(path: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AMORTIZE_DOCS_ROOT", str(ROOT))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    rel = path.relative_to(ROOT).as_posix()
    namespace: dict = {"__name__": "__docs_example__"}
    for block in extract_blocks(path.read_text(encoding="utf-8")):
        if not block.runs:
            continue
        code = compile(block.code, f"{rel}:{block.line}", "exec")
        try:
            exec(code, namespace)
        except Exception as e:  # say which block failed; the traceback points into it
            raise AssertionError(f"the example at {rel}, line {block.line}, raised {type(e).__name__}: {e}") from e


def test_extract_blocks_reads_info_strings():
    text = "\n".join([
        "```python", "a = 1", "```",
        "```python notest", "raise SystemExit", "```",
        "!!! note", "    ```python", "    b = a + 1", "    ```",
        "```bash", "make test", "```",
        "````python slow", "```", "c = 3", "````",
    ])
    blocks = extract_blocks(text)
    assert [b.language for b in blocks] == ["python", "python", "python", "bash", "python"]
    assert [b.runs for b in blocks] == [True, False, True, False, True]
    assert blocks[2].code == "b = a + 1"
    assert blocks[4].slow and blocks[4].code == "```\nc = 3"
