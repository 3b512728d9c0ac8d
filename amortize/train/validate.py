"""Recipe checks on the parsed recipe that need more than one option's range: values that are not
finite, and values whose valid set depends on another option (the model's patch size, the name
template's fields). The file's text and its keys are read and checked before, by
:mod:`amortize.train.yaml_input`.

Each check raises :class:`~amortize.options.RecipeError` with one line naming the key, so
``amortize train --dry-run`` refuses the recipe before anything is built or written:

* :func:`check_finite`: ``.nan``, ``.inf`` anywhere in the recipe;
* :func:`check_values`: ``model.image_size``, ``model.context_length``, ``seed``, the file-name
  templates.

This module does not import Composer.
"""

from __future__ import annotations

import math
import string
from typing import Any, Optional

from amortize.options import RecipeError

__all__ = ["MAX_SEED", "NAME_FIELDS", "check_finite", "check_retention", "check_values"]

MAX_SEED = 2**32 - 1
"""The largest ``seed``: Composer seeds NumPy, whose seeds are 32-bit."""

NAME_FIELDS = ("run_name", "rank", "local_rank", "world_size", "local_world_size", "node_rank", "epoch", "batch",
               "sample", "token", "batch_in_epoch", "sample_in_epoch", "token_in_epoch")
"""The ``{fields}`` Composer fills in ``save_filename`` and ``save_latest_filename``."""


def check_finite(data: Any, prefix: str = "") -> None:
    """Refuse a NaN or infinite float anywhere in a parsed recipe, naming its dotted key.

    >>> check_finite({"optimizer": {"lr": float("inf")}})
    Traceback (most recent call last):
    ...
    amortize.options.RecipeError: optimizer.lr: must be a finite number, got inf
    """
    if isinstance(data, float) and not math.isfinite(data):
        raise RecipeError(f"{prefix or 'recipe'}: must be a finite number, got {data!r}")
    if isinstance(data, dict):
        for k, v in data.items():
            check_finite(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            check_finite(v, f"{prefix}[{i}]")


def _template_fields(template: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        return [f"<{e}>"]


def check_values(recipe: Any) -> None:
    """Refuse values whose valid set depends on another option; one line naming the key.

    * ``model.image_size``: >= 1, and a multiple of the vision tower's patch size;
    * ``model.context_length``: >= 2 (the start and end tokens);
    * ``seed``: in ``[0, MAX_SEED]``;
    * ``save_filename`` / ``save_latest_filename``: only the fields of :data:`NAME_FIELDS`;
    * ``save_num_checkpoints_to_keep`` with ``autoresume`` (:func:`check_retention`).
    """
    m = recipe.model  # resolved by the binding step (build_model's options and defaults)
    size, name, length = m.get("image_size"), m.get("name"), m.get("context_length")
    if size is not None:
        patch = _patch_size(name)
        if size < max(1, patch or 1) or (patch and size % patch):
            need = f"a multiple of the patch size {patch}" if patch else ">= 1"
            raise RecipeError(f"model.image_size: must be {need} (model {name!r}), got {size}")
    if length is not None and length < 2:
        raise RecipeError(f"model.context_length: must be >= 2 (the start and end tokens), got {length}")
    if not 0 <= int(recipe.seed) <= MAX_SEED:
        raise RecipeError(f"seed: must be in [0, {MAX_SEED}] (NumPy's seeds are 32-bit), got {recipe.seed}")
    check_retention(recipe)
    for key in ("save_filename", "save_latest_filename"):
        unknown = [f for f in _template_fields(getattr(recipe, key)) if f.split(".")[0].split("[")[0] not in NAME_FIELDS]
        if unknown:
            raise RecipeError(f"{key}: unknown field {{{unknown[0]}}} in {getattr(recipe, key)!r}; "
                              f"valid: {', '.join('{' + f + '}' for f in NAME_FIELDS)}")


def check_retention(recipe: Any) -> None:
    """Refuse ``save_num_checkpoints_to_keep=0`` with ``autoresume=true``: Composer then keeps no
    checkpoint, so a stopped run would have nothing to resume from (its work lost).

    Raises:
        RecipeError: naming both keys and the values that keep the latest checkpoint.
    """
    if recipe.autoresume and recipe.save_num_checkpoints_to_keep == 0:
        raise RecipeError("save_num_checkpoints_to_keep=0 with autoresume=true keeps no checkpoint to resume from, "
                          "so a stopped run would lose its work; keep the latest with save_num_checkpoints_to_keep=1 "
                          "(-1 keeps all), or set autoresume=false")


def _patch_size(name: str) -> Optional[int]:
    try:
        from amortize.models import model_config

        return model_config(name).get("vision_cfg", {}).get("patch_size")
    except Exception:  # an unknown model is named by the model check itself
        return None
