"""Printing evaluation rows: a markdown table, or JSON lines.

A row is a dict with at least ``task``, ``metric`` and ``value`` (a float, or ``None`` when the
task could not run); any other keys (``error``, ``n_tasks`` ...) are kept in the JSON output. A
row's ``label``, when set, is printed in the table instead of its metric name (DataComp's partial
averages: ``Average (2 of 38)``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_markdown(rows: Iterable[dict]) -> str:
    """A markdown table with columns task | metric | value (| note, when any row has an error).

    Args:
        rows: dicts with ``task``, ``metric``, ``value``.

    Returns:
        The table as one string ending in a newline.
    """
    rows = list(rows)
    with_note = any(r.get("error") for r in rows)
    head = ["task", "metric", "value"] + (["note"] if with_note else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["task"]), str(r.get("label") or r["metric"]), _fmt(r["value"])]
        if with_note:
            cells.append(str(r.get("error", "")).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _jsonable(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    return value


def format_jsonl(rows: Iterable[dict]) -> str:
    """One JSON object per row and line (NaN written as null), ending in a newline."""
    return "".join(json.dumps({k: _jsonable(v) for k, v in r.items()}) + "\n" for r in rows)
