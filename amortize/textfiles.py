"""Reading a user's text file (a recipe, a caption CSV, a sidecar caption) as UTF-8, naming the first bad byte.

This module imports neither torch nor Composer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

__all__ = ["NotUTF8", "read_utf8"]


class NotUTF8(ValueError):
    """A file that is not UTF-8 text; the message names it, the first bad byte and its line."""


def read_utf8(path: Union[str, Path], *, bom: bool = False) -> str:
    """The text of ``path`` decoded as UTF-8.

    Args:
        path: the file.
        bom: drop a leading byte-order mark (spreadsheet programs save "CSV UTF-8" with one).

    Raises:
        NotUTF8: ``PATH is not UTF-8 text (byte N, line L: b'\\xff')``.
    """
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise NotUTF8(f"{path} is not UTF-8 text (byte {e.start}, line {line}: {data[e.start:e.start + 1]!r})") from None
