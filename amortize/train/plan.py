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

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from amortize.train.config import Recipe, RecipeError, load_recipe_dict, recipe_to_dict
from amortize.train.sections import SECTIONS

__all__ = ["shown_folder", "untrained_data_note", "IDENTITY_KEYS", "NOT_COMPARED", "RESOLVED", "RESTORED_KEYS", "StartPlan", "resume_changes", "check_writable", "decide_start", "recipe_differences", "run_files",
           "stored_recipe"]

IDENTITY_KEYS = ("method", "model", "loss", "optimizer.name")
"""Recipe keys (and sections) a checkpoint must share with the recipe that resumes it."""

RESTORED_KEYS = ("seed", "optimizer", "scheduler", "data.batch_size")
"""Keys whose value a resumed run takes from its checkpoint (the random state, the optimizer's
state and learning rates, the schedule's position, the samples counted per batch): a change
would be stored but not applied, so resuming with one is refused, naming the key and both values."""

NOT_COMPARED = ("autoresume", "save_overwrite", "load_path", "load_mode")
"""Keys that say how a run starts, not what it trains; never compared on resume."""

RESOLVED = tuple(d.key for d in SECTIONS if d.resolved)
"""Sections a recipe stores resolved (every option of their constructor): an option present in one
checkpoint's recipe and absent from the other's came from a constructor of another version
(``optimizer.momentum`` of a 0.2 recipe), so it is not compared."""


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def stored_recipe(old: dict) -> tuple[dict, bool]:
    """A checkpoint's stored recipe as today's binding step resolves it, to compare with a new one.

    A recipe stored before every nested section was resolved (``loss.estimator`` as written, its
    defaults left out) is bound again, so that it holds every option a recipe stored now holds.

    Args:
        old: the stored recipe (plain data; not written to).

    Returns:
        ``(recipe, True)``: the recipe resolved; ``(old, False)``: it no longer loads (a component
        or an option today's code lacks), compared as it was written.
    """
    if not old:  # a checkpoint without a recipe: nothing to resolve, every key differs
        return old, True
    try:
        return recipe_to_dict(load_recipe_dict(copy.deepcopy(old))), True
    except Exception:  # noqa: BLE001 -- any failure to load an old recipe: compare it as written
        return old, False


def recipe_differences(old: dict, new: dict, keys: tuple[str, ...] = IDENTITY_KEYS, *,
                       resolved: bool = True) -> list[str]:
    """The dotted keys under ``keys`` whose values differ, as ``key: old -> new`` lines.

    Args:
        old: the stored recipe (:func:`stored_recipe` resolves one written before).
        new: the new recipe, resolved (:func:`~amortize.train.config.recipe_to_dict`).
        keys: the keys (and sections) compared.
        resolved: False: ``old`` could not be resolved today; a key present on one side only at
            any depth under a :data:`RESOLVED` section (a nested section stored as written) is
            not compared. True: only its direct options are skipped so.

    >>> recipe_differences({"loss": {"estimator": "moving_average"}}, {"loss": {"estimator": "amortized"}})
    ["loss.estimator: 'moving_average' -> 'amortized'"]
    """
    a, b = _flat(old), _flat(new)
    out = []
    for k in sorted(set(a) | set(b)):
        if (k in a) != (k in b) and (k.count(".") == 1 or not resolved) and k.split(".")[0] in RESOLVED:
            continue  # an option one version's constructor has and the other's lacks: nothing the recipe changed
        if any(k == p or k.startswith(p + ".") for p in keys) and a.get(k) != b.get(k):
            out.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


def run_files(recipe: Recipe) -> list[Path]:
    """Files of an earlier run in the recipe's save folder: its checkpoints, ``latest`` link, weights
    export (:data:`~amortize.weights_export.EXPORT_FILENAME`)."""
    from amortize.checkpoints import filename_regex
    from amortize.weights_export import EXPORT_FILENAME

    folder = Path(recipe.resolved_save_folder())
    if not folder.is_dir():
        return []
    rx = re.compile(filename_regex(recipe.save_filename, rank=0))
    latest = recipe.save_latest_filename.format(rank=0)
    return sorted(p for p in folder.iterdir()
                  if p.name in (latest, EXPORT_FILENAME) or rx.fullmatch(p.name))


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
        changed: ``key: old -> new`` lines of the recipe keys a resumed run changes and applies
            (``max_duration``, ``grad_clip_norm``, logging ...; see :func:`resume_changes`).
    """

    mode: str = "fresh"
    checkpoint: Optional[str] = None
    epoch: int = 0
    batch: int = 0
    replaced: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for the console."""
        where = f"{self.checkpoint} (epoch {self.epoch}, batch {self.batch})"
        applied = f"; applying the changed {'; '.join(self.changed)}" if self.changed else ""
        if self.mode == "autoresume":
            return f"resuming from {where}{applied}"
        if self.mode == "load":
            return f"continuing from {where}: weights, optimizer, schedules and step count{applied}"
        if self.mode == "weights":
            return f"starting from the encoder weights of {where}; optimizer, estimator and step count start fresh"
        if self.replaced:
            return f"starting fresh; save_overwrite=true replaces {len(self.replaced)} file(s) of the earlier run"
        return "starting fresh"


def _read(path: str) -> tuple[dict, dict]:
    """(recipe, timestamp) of a Composer checkpoint or weights export."""
    from amortize.checkpoints import safe_load
    from amortize.weights_export import EXPORT_FILENAME, is_weights_export

    ck = safe_load(path)
    if is_weights_export(ck):
        raise RecipeError(f"{path} is a weights export ({EXPORT_FILENAME}), which cannot be resumed or loaded by the "
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


def _read_any(path: str) -> tuple[dict, dict]:
    """(recipe, timestamp) of a Composer checkpoint or of a weights export (for messages)."""
    from amortize.checkpoints import safe_load
    from amortize.weights_export import is_weights_export

    ck = safe_load(path)
    if is_weights_export(ck):
        return ck.get("recipe") or {}, dict(ck.get("timestamp") or {})
    return _read(path)


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


def resume_changes(old: dict, new: dict, source: str, *, resolved: bool = True) -> list[str]:
    """Sort the keys a resumed run changes into applied ones (returned) and refused ones.

    The identity keys (:data:`IDENTITY_KEYS`) were compared before. A key of
    :data:`RESTORED_KEYS` is restored from the checkpoint, so a change is refused; every other
    key (``max_duration``, ``grad_clip_norm``, ``divergence``, ``data.num_workers``, logging and
    saving options ...) is read from the new recipe when the trainer is built, so its change is
    applied and returned for the start line.

    Args:
        resolved: whether ``old`` was resolved today (:func:`stored_recipe`; see :func:`recipe_differences`).

    Returns:
        ``key: old -> new`` lines of the applied changes.

    Raises:
        RecipeError: naming each refused key with its saved and its new value.
    """
    changed = [d for d in recipe_differences(old, new, keys=tuple(new), resolved=resolved)
               if not d.startswith(NOT_COMPARED)]
    refused = [d for d in changed if d.split(":")[0] == "seed" or d.startswith(tuple(k for k in RESTORED_KEYS))]
    if refused:
        raise RecipeError(
            f"{source} was saved with other values of keys a resumed run restores from the checkpoint "
            f"({'; '.join(refused)}); the new values would be stored but not applied. Resume with the saved "
            "values, or start a new run from its weights with load_path=CHECKPOINT load_mode=weights")
    return changed


def shown_folder(folder: str) -> str:
    """A save folder as messages name it, ending in ``/``: ``runs/mine/``; the empty ``save_folder``
    (Composer writes into the current folder) as the current folder's absolute path, not ``/``."""
    real = folder if folder not in ("", ".") else os.getcwd()
    return real if real.endswith("/") else real + "/"


def untrained_data_note(recipe: Recipe) -> Optional[str]:
    """A line saying that ``data.num_samples`` trains fewer samples an epoch than the shards hold, or None.

    With ``data.name: webdataset`` and ``sampling: split``, a ``num_samples`` below the shards' samples
    (their sizes from ``sizes.json``, img2dataset's ``*_stats.json`` or the cached count) makes an
    epoch one pass cut at ``num_samples // batch_size`` batches; the rest of the shards is not trained
    in that epoch, and never when ``shuffle_buffer: 0`` reads the shards in the same order every epoch.
    ``--dry-run`` and the start of training say it (a short epoch may be wanted: it is not refused).
    A map-style dataset's epoch is the whole dataset; ``sampling: resampled`` draws with replacement.
    """
    from amortize.train.sections import bindings

    data = bindings(recipe).get("data").resolved
    n, shards = data.get("num_samples"), data.get("shards")
    if data.get("name") != "webdataset" or data.get("sampling", "split") != "split" or not n or not shards:
        return None
    from amortize.data.webdataset import expand_shards, shard_sizes

    try:
        total = sum(shard_sizes(expand_shards(shards)).values())
    except (OSError, ValueError):
        return None  # the data's own checks name what is wrong with the pattern
    batch = int(data["batch_size"])
    batches = max(1, int(n) // batch)
    trained = min(total, batches * batch)
    if trained >= total:
        return None
    rest = total - trained
    if data.get("shuffle_buffer", 1000):
        fate = (f"the other {rest:,} are not trained in that epoch (each epoch reads the shards in another order, "
                "so another part of them)")
    else:
        fate = (f"the other {rest:,} are never trained (data.shuffle_buffer=0 reads the shards in the same order "
                "every epoch)")
    return (f"data.num_samples={n} trains {trained:,} of the {total:,} samples of the shards an epoch ({batches:,} "
            f"batches of {batch}); {fate}; leave data.num_samples out (null) to train every sample each epoch")


def check_writable(folder: str) -> None:
    """Refuse a save folder that cannot be created or written (checked without writing anything).

    Raises:
        RecipeError: ``save_folder: /data/ro/run cannot be written (/data/ro is read-only ...)``.
    """
    probe = Path(os.path.abspath(folder))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise RecipeError(f"save_folder: {folder} cannot be created: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "it is" if str(probe) == os.path.abspath(folder) else f"{probe} is"
        raise RecipeError(f"save_folder: {folder} cannot be written ({what} read-only for this user); choose "
                          "another save_folder or run_name")


def decide_start(recipe: Recipe) -> StartPlan:
    """Decide how ``recipe`` starts, or refuse a start that would lose or mix work.

    Raises:
        RecipeError: naming the folder or checkpoint, the differing recipe keys, and the ways out.
    """
    folder = recipe.resolved_save_folder()
    check_writable(folder)
    new = recipe_to_dict(recipe)
    outs = (f"keep it and train elsewhere with run_name=NEW or save_folder=DIR, "
            f"or replace it with save_overwrite=true")
    if recipe.autoresume:
        latest = _latest(recipe)
        if latest is not None:
            old, ts = _read(latest)
            old, resolved = stored_recipe(old)
            diff = recipe_differences(old, new, resolved=resolved)
            if diff:
                raise RecipeError(
                    f"autoresume: {folder} holds a checkpoint of another recipe ({'; '.join(diff)}); {outs} "
                    "autoresume=false")
            applied = resume_changes(old, new, f"autoresume: the checkpoint in {folder}", resolved=resolved)
            if _finished(recipe, ts):
                raise RecipeError(
                    f"autoresume: the run in {folder} already finished (epoch {ts.get('epoch', 0)}, batch "
                    f"{ts.get('batch', 0)}; max_duration={recipe.max_duration}); to train longer raise "
                    f"max_duration, or {outs} autoresume=false")
            return StartPlan("autoresume", os.path.realpath(latest), ts.get("epoch", 0), ts.get("batch", 0),
                             changed=applied)
    existing = run_files(recipe)
    replaced: list[str] = []
    if existing and not recipe.save_overwrite:
        # reached with autoresume only when the folder holds no checkpoint to resume (a lone weights export)
        from amortize.weights_export import EXPORT_FILENAME

        names = ", ".join(p.name for p in existing[:4]) + (" ..." if len(existing) > 4 else "")
        resumable = _latest(recipe) is not None
        differs = ""
        export = Path(folder) / EXPORT_FILENAME
        latest = _latest(recipe) or (str(export) if export.is_file() else None)
        if latest is not None:
            try:
                old, resolved = stored_recipe(_read_any(latest)[0])
                diff = recipe_differences(old, new, keys=tuple(new), resolved=resolved)
                diff = [d for d in diff if not d.startswith(("save_", "load_", "autoresume"))]
                differs = f"; its recipe differs in {'; '.join(diff[:6])}" if diff else "; same recipe"
            except Exception:  # unreadable files still belong to the earlier run
                differs = ""
        if recipe.autoresume:
            raise RecipeError(
                f"autoresume: {folder} holds no checkpoint to resume from, only files of an earlier run ({names}"
                f"{differs}); training would replace them. {outs[0].upper()}{outs[1:]}")
        cont = "continue it with autoresume=true, " if resumable else ""
        raise RecipeError(f"{folder} already holds a run ({names}{differs}); {cont}{outs}")
    if existing:
        replaced = [str(p) for p in existing]
    if recipe.load_path:
        if not os.path.isfile(recipe.load_path):
            raise RecipeError(f"load_path: {recipe.load_path} does not exist")
        old, ts = _read(recipe.load_path)
        old, resolved = stored_recipe(old)
        if recipe.load_mode == "weights":
            diff = recipe_differences(old, new, keys=("model",), resolved=resolved)
            if diff:
                raise RecipeError(f"load_path: {recipe.load_path} holds another model ({'; '.join(diff)}); "
                                  "its weights cannot be loaded into this recipe's model")
            return StartPlan("weights", recipe.load_path, ts.get("epoch", 0), ts.get("batch", 0), replaced)
        diff = recipe_differences(old, new, resolved=resolved)
        if diff:
            raise RecipeError(
                f"load_path: {recipe.load_path} was written by another recipe ({'; '.join(diff)}); resuming it "
                "would take over its step count and optimizer and mismatch the estimator. To start from its "
                "encoder weights only, add load_mode=weights")
        applied = resume_changes(old, new, f"load_path: {recipe.load_path}", resolved=resolved)
        if _finished(recipe, ts):
            raise RecipeError(f"load_path: {recipe.load_path} already reached max_duration={recipe.max_duration} "
                              f"(epoch {ts.get('epoch', 0)}, batch {ts.get('batch', 0)}); raise max_duration, "
                              "or add load_mode=weights to start a new run from its weights")
        return StartPlan("load", recipe.load_path, ts.get("epoch", 0), ts.get("batch", 0), replaced, changed=applied)
    return StartPlan("fresh", replaced=replaced)
