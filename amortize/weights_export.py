"""The weights export of a run: its file name, its format tag, what it holds, how it is recognised and read.

``amortize train`` writes the export into its save folder at every epoch end and when the run ends
(:class:`~amortize.train.callbacks.ExportWeights` saves :func:`export_payload`). It holds tensors
and plain Python only, so it loads with ``torch.load(path, weights_only=True)``; unlike a Composer
checkpoint it cannot resume a run. Its readers recognise it with :func:`is_weights_export`:
``amortize eval`` and ``amortize export`` (:func:`amortize.cli.load_checkpoint`), ``model.pretrained``
(:func:`amortize.interop.pretrained.read_state_dict`) and the start decision of ``amortize train``
(:mod:`amortize.train.plan`, which refuses to resume from it).

This module is the one place that spells the name and the tag. It imports neither Composer nor
torch (torch is imported when a payload is built or a file read), so the command line can name the
file without loading either.

>>> is_weights_export({"format": EXPORT_FORMAT, "model": {}})
True
>>> is_weights_export({"state": {"model": {}}})  # a Composer checkpoint
False
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Union

__all__ = ["EXPORT_FILENAME", "EXPORT_FORMAT", "export_payload", "is_weights_export", "load_weights_export"]

_TAG = "amortize-weights/"  # the family; a reader accepts every version of it

EXPORT_FORMAT = _TAG + "1"
"""The ``format`` entry of the exports written now (:func:`is_weights_export` accepts any version)."""

EXPORT_FILENAME = "model.pt"
"""The export's file name in a run's save folder (the default of
:class:`~amortize.train.callbacks.ExportWeights`); a run folder is read through it first."""


def export_payload(recipe: dict, model_state: Mapping[str, Any], loss_state: Mapping[str, Any],
                   epoch: int, batch: int) -> dict:
    """What the export file holds.

    Args:
        recipe: the run's recipe, resolved, as plain Python (what rebuilds the towers).
        model_state: the two-tower model's ``state_dict``.
        loss_state: the loss module's ``state_dict`` (the estimator's state); entries that are not
            tensors are left out.
        epoch: the run's epoch count at the export.
        batch: the run's batch count at the export.

    Returns:
        ``{"format": EXPORT_FORMAT, "recipe": dict, "model": state_dict, "loss_fn": state_dict,
        "timestamp": {"epoch": int, "batch": int}}``, every tensor detached and on the CPU.
    """
    import torch

    return {
        "format": EXPORT_FORMAT,
        "recipe": recipe,
        "model": {k: v.detach().cpu() for k, v in model_state.items()},
        "loss_fn": {k: v.detach().cpu() for k, v in loss_state.items() if isinstance(v, torch.Tensor)},
        "timestamp": {"epoch": int(epoch), "batch": int(batch)},
    }


def is_weights_export(obj: Any) -> bool:
    """Whether a loaded object is a weights export: a dict whose ``format`` is of the
    ``amortize-weights/`` family (of any version; :data:`EXPORT_FORMAT` is the one written now)."""
    return isinstance(obj, dict) and str(obj.get("format", "")).startswith(_TAG)


def load_weights_export(path: Union[str, os.PathLike]) -> dict:
    """Read a weights export with ``torch.load(..., weights_only=True)`` (:func:`amortize.checkpoints.safe_load`:
    no code in the file runs).

    Returns:
        The payload described by :func:`export_payload`.

    Raises:
        FileNotFoundError: if nothing is at ``path``.
        UnsafeCheckpointError: if the file asks for a type outside the allowed data types.
        CorruptCheckpointError: if the file is truncated, not a torch file, or another checkpoint
            (a Composer checkpoint is not an export).
    """
    from amortize.checkpoints import CorruptCheckpointError, safe_load

    ck = safe_load(path)
    if not is_weights_export(ck):
        raise CorruptCheckpointError(f"{path} is not an amortize weights export (its format is not {_TAG}*)")
    return ck
