"""Where a run starts from: a fresh folder, its own latest checkpoint, or another checkpoint.

:func:`decide_start` looks at the save folder and ``load_path`` before anything is trained and
refuses, with the keys that differ and the ways out, every start that would silently lose or mix
work:

* the save folder already holds a run and neither ``autoresume=true`` (continue it) nor
  ``save_overwrite=true`` (replace it) was given;
* ``autoresume`` finds a checkpoint written by another recipe (method, model or loss differ), or
  a run that already reached ``max_duration``;
* ``load_path`` names a checkpoint of another recipe and ``load_mode`` is not ``weights``.

This module does not import Composer: ``amortize train --dry-run`` shows the same decision.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from amortize.train.config import Recipe, RecipeError, recipe_to_dict

__all__ = ["IDENTITY_KEYS", "StartPlan", "decide_start", "recipe_differences", "run_files"]

IDENTITY_KEYS = ("method", "model", "loss", "optimizer.name")
"""Recipe keys (and sections) a checkpoint must share with the recipe that resumes it."""


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def recipe_differences(old: dict, new: dict, keys: tuple[str, ...] = IDENTITY_KEYS) -> list[str]:
    """The dotted keys under ``keys`` whose values differ, as ``key: old -> new`` lines.

    >>> recipe_differences({"loss": {"estimator": "moving_average"}}, {"loss": {"estimator": "amortized"}})
    ["loss.estimator: 'moving_average' -> 'amortized'"]
    """
    a, b = _flat(old), _flat(new)
    out = []
    for k in sorted(set(a) | set(b)):
        if any(k == p or k.startswith(p + ".") for p in keys) and a.get(k) != b.get(k):
            out.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


def run_files(recipe: Recipe) -> list[Path]:
    """Files of an earlier run in the recipe's save folder: its checkpoints, ``latest`` link, ``model.pt``."""
    from amortize.checkpoints import filename_regex

    folder = Path(recipe.resolved_save_folder())
    if not folder.is_dir():
        return []
    rx = re.compile(filename_regex(recipe.save_filename, rank=0))
    latest = recipe.save_latest_filename.format(rank=0)
    return sorted(p for p in folder.iterdir()
                  if p.name in (latest, "model.pt") or rx.fullmatch(p.name))


@dataclass
class StartPlan:
    """How a run starts.

    Attributes:
        mode: ``fresh``, ``autoresume`` (its own latest checkpoint), ``load`` (``load_path``, whole
            state) or ``weights`` (``load_path``, encoder weights only).
        checkpoint: the checkpoint file it starts from (None for ``fresh``).
        epoch: the checkpoint's epoch count.
        batch: the checkpoint's batch count.
        replaced: files of an earlier run that ``save_overwrite=true`` removes before training.
    """

    mode: str = "fresh"
    checkpoint: Optional[str] = None
    epoch: int = 0
    batch: int = 0
    replaced: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for the console."""
        where = f"{self.checkpoint} (epoch {self.epoch}, batch {self.batch})"
        if self.mode == "autoresume":
            return f"resuming from {where}"
        if self.mode == "load":
            return f"continuing from {where}: weights, optimizer, schedules and step count"
        if self.mode == "weights":
            return f"starting from the encoder weights of {where}; optimizer, estimator and step count start fresh"
        if self.replaced:
            return f"starting fresh; save_overwrite=true replaces {len(self.replaced)} file(s) of the earlier run"
        return "starting fresh"


def _read(path: str) -> tuple[dict, dict]:
    """(recipe, timestamp) of a Composer checkpoint or weights export."""
    from amortize.checkpoints import safe_load

    ck = safe_load(path)
    if isinstance(ck, dict) and str(ck.get("format", "")).startswith("amortize-weights/"):
        raise RecipeError(f"{path} is a weights export (model.pt), which cannot be resumed or loaded by the "
                          "trainer; point load_path at a Composer checkpoint of the run (its latest-rank0.pt or "
                          "an ep*-ba*-rank0.pt file)")
    if isinstance(ck, dict) and "state" in ck:
        model = ck["state"].get("model", {})
        extra = next((v for k, v in model.items() if k.endswith("_extra_state")), None)
        recipe = extra.get("recipe") if isinstance(extra, dict) else None
        ts = ck["state"].get("timestamp", {})
        ts = ts.get("Timestamp", ts)  # Composer nests it under its class name
        return recipe or {}, {"epoch": int(ts.get("epoch", 0)), "batch": int(ts.get("batch", 0)),
                              "sample": int(ts.get("sample", 0))}
    raise RecipeError(f"{path} is not a checkpoint written by `amortize train`")


def _finished(recipe: Recipe, ts: dict) -> bool:
    m = re.fullmatch(r"\s*([0-9]+)\s*(ep|ba|sp)\s*", recipe.max_duration)
    if not m:
        return False
    unit = {"ep": "epoch", "ba": "batch", "sp": "sample"}[m.group(2)]
    return int(ts.get(unit, 0)) >= int(m.group(1))


def _latest(recipe: Recipe) -> Optional[str]:
    folder = Path(recipe.resolved_save_folder())
    from amortize.checkpoints import filename_regex, is_complete

    link = folder / recipe.save_latest_filename.format(rank=0)
    if link.is_file() and is_complete(link):
        return str(link)
    # a missing or partial latest: the newest complete checkpoint (what recover_latest re-points it to)

    rx = re.compile(filename_regex(recipe.save_filename, rank=0))
    found = [p for p in folder.glob("*") if rx.fullmatch(p.name) and is_complete(p)] if folder.is_dir() else []
    if not found:
        return None
    return str(max(found, key=lambda p: (int((re.search(r"ba(\d+)", p.name) or [0, -1])[1]), p.stat().st_mtime)))


def decide_start(recipe: Recipe) -> StartPlan:
    """Decide how ``recipe`` starts, or refuse a start that would lose or mix work.

    Raises:
        RecipeError: naming the folder or checkpoint, the differing recipe keys, and the ways out.
    """
    folder = recipe.resolved_save_folder()
    new = recipe_to_dict(recipe)
    outs = (f"keep it and train elsewhere with run_name=NEW or save_folder=DIR, "
            f"or replace it with save_overwrite=true")
    if recipe.autoresume:
        latest = _latest(recipe)
        if latest is not None:
            old, ts = _read(latest)
            diff = recipe_differences(old, new)
            if diff:
                raise RecipeError(
                    f"autoresume: {folder} holds a checkpoint of another recipe ({'; '.join(diff)}); {outs} "
                    "autoresume=false")
            if _finished(recipe, ts):
                raise RecipeError(
                    f"autoresume: the run in {folder} already finished (epoch {ts.get('epoch', 0)}, batch "
                    f"{ts.get('batch', 0)}; max_duration={recipe.max_duration}); to train longer raise "
                    f"max_duration, or {outs} autoresume=false")
            return StartPlan("autoresume", os.path.realpath(latest), ts.get("epoch", 0), ts.get("batch", 0))
    existing = run_files(recipe)
    replaced: list[str] = []
    if existing and not recipe.autoresume:
        if not recipe.save_overwrite:
            names = ", ".join(p.name for p in existing[:4]) + (" ..." if len(existing) > 4 else "")
            differs = ""
            latest = _latest(recipe) or (str(Path(folder) / "model.pt") if (Path(folder) / "model.pt").is_file() else None)
            if latest is not None:
                try:
                    old, _ = _read(latest)
                    diff = recipe_differences(old, new, keys=tuple(new))
                    diff = [d for d in diff if not d.startswith(("save_", "load_", "autoresume"))]
                    differs = f"; its recipe differs in {'; '.join(diff[:6])}" if diff else "; same recipe"
                except Exception:  # unreadable files still belong to the earlier run
                    differs = ""
            raise RecipeError(
                f"{folder} already holds a run ({names}{differs}); continue it with autoresume=true, {outs}")
        replaced = [str(p) for p in existing]
    if recipe.load_path:
        if not os.path.isfile(recipe.load_path):
            raise RecipeError(f"load_path: {recipe.load_path} does not exist")
        old, ts = _read(recipe.load_path)
        if recipe.load_mode == "weights":
            diff = recipe_differences(old, new, keys=("model",))
            if diff:
                raise RecipeError(f"load_path: {recipe.load_path} holds another model ({'; '.join(diff)}); "
                                  "its weights cannot be loaded into this recipe's model")
            return StartPlan("weights", recipe.load_path, ts.get("epoch", 0), ts.get("batch", 0), replaced)
        diff = recipe_differences(old, new)
        if diff:
            raise RecipeError(
                f"load_path: {recipe.load_path} was written by another recipe ({'; '.join(diff)}); resuming it "
                "would take over its step count and optimizer and mismatch the estimator. To start from its "
                "encoder weights only, add load_mode=weights")
        if _finished(recipe, ts):
            raise RecipeError(f"load_path: {recipe.load_path} already reached max_duration={recipe.max_duration} "
                              f"(epoch {ts.get('epoch', 0)}, batch {ts.get('batch', 0)}); raise max_duration, "
                              "or add load_mode=weights to start a new run from its weights")
        return StartPlan("load", recipe.load_path, ts.get("epoch", 0), ts.get("batch", 0), replaced)
    return StartPlan("fresh", replaced=replaced)
