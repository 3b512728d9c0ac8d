"""Composer algorithms and callbacks that drive the contrastive loss: one event, one small apply.

* :class:`EpochSchedules` (EPOCH_START): advances rho, beta, gamma and AmorLIP's per-epoch
  re-initialisation and previous-epoch networks, through ``loss_fn.start_epoch``.
* :class:`ClampLogitScale` (BATCH_END, after the optimiser step): ``s <= max_scale``.
* :class:`FullBatchGuard` (AFTER_DATALOADER): refuses Composer's own microbatching, which shrinks
  the negatives (the exact alternative is the gradient cache of :mod:`amortize.train.gradcache`).
* :class:`LogLossTerms` (BATCH_END): logs every named loss term as ``loss/train/<term>``.
* :class:`ExportWeights` (EPOCH_CHECKPOINT, FIT_END): writes the run's weights export
  (:mod:`amortize.weights_export`: the recipe, the towers and the estimator state).
* :class:`EstimatorMonitorCallback` (EPOCH_START, EPOCH_END): runs
  :class:`amortize.diagnostics.EstimatorMonitor` on the loss's estimator, logs ``estimator/*`` and
  prints its warnings (on by default for a stateful estimator; recipe name ``estimator_monitor``).

The algorithms hold no state of their own: everything they change lives in the model's
``state_dict``, so Composer's checkpoints restore it.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Literal, Optional

import torch
from composer.core import Algorithm, Callback, Event, State, TimeUnit
from composer.loggers import Logger

from amortize.checkpoints import atomic_save
from amortize.diagnostics import EstimatorMonitor
from amortize.train.model import unwrap
from amortize.weights_export import EXPORT_FILENAME, export_payload

__all__ = [
    "EpochSchedules",
    "ClampLogitScale",
    "FullBatchGuard",
    "LogLossTerms",
    "ExportWeights",
    "EstimatorMonitorCallback",
    "monitors_estimator",
    "planned_epochs",
]


def planned_epochs(state: State) -> int:
    """The number of epochs the run will start, from ``max_duration`` and the epoch length.

    ``30ep`` gives 30; ``20ba`` with 8 batches per epoch gives 3; an unknown epoch length gives 1.
    """
    md = state.max_duration
    if md is None:
        return 1
    if md.unit == TimeUnit.EPOCH:
        return max(1, int(md.value))
    n = state.dataloader_len
    per_epoch = int(n) if n is not None else 0
    if per_epoch <= 0:
        return 1
    if md.unit == TimeUnit.BATCH:
        return max(1, math.ceil(int(md.value) / per_epoch))
    if md.unit == TimeUnit.SAMPLE:
        batch = state.train_dataloader.batch_size if hasattr(state.train_dataloader, "batch_size") else None
        if batch:
            return max(1, math.ceil(int(md.value) / (per_epoch * batch)))
    return 1


class EpochSchedules(Algorithm):
    """On EPOCH_START, call ``loss_fn.start_epoch(epoch, planned_epochs)``.

    ``start_epoch`` is idempotent for a repeated epoch, so a run resumed inside an epoch neither
    re-initialises the amortizer nor overwrites the previous-epoch networks.
    """

    def match(self, event: Event, state: State) -> bool:
        """Run on EPOCH_START."""
        return event == Event.EPOCH_START

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        """Advance the per-epoch schedules to the current epoch."""
        unwrap(state.model).loss_fn.start_epoch(int(state.timestamp.epoch), planned_epochs(state))


class ClampLogitScale(Algorithm):
    """After every optimiser step (BATCH_END), clamp the logit scale to ``s <= max_scale``.

    Args:
        max_scale: the largest inverse temperature, > 0: the recipe's ``max_scale``, whose default
            (100 as in CLIP) and range are declared once, on :class:`amortize.train.schema.Recipe`,
            and checked when the recipe loads.
    """

    def __init__(self, max_scale: float):
        self.max_scale = float(max_scale)

    def match(self, event: Event, state: State) -> bool:
        """Run on BATCH_END."""
        return event == Event.BATCH_END

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        """Clamp ``log s`` in place."""
        with torch.no_grad():
            unwrap(state.model).model.logit_scale.clamp_(max=math.log(self.max_scale))


class FullBatchGuard(Algorithm):
    """Refuse Composer's own microbatching: contrastive objectives need the whole per-process batch as negatives.

    A ``Trainer`` whose ``device_train_microbatch_size`` is below the batch splits each batch and
    runs the loss on each microbatch separately, so every sample would contrast only against its
    own microbatch: that cannot be made exact, and is an error. :func:`~amortize.train.builders.build_trainer`
    never asks Composer to split; a recipe's ``device_train_microbatch_size`` runs the exact
    gradient cache inside one Composer microbatch instead (:mod:`amortize.train.gradcache`).
    Composer's automatic microbatching (``auto``) is refused too: after an out-of-memory error it
    retries the batch, which would update the estimator's state twice.
    """

    def match(self, event: Event, state: State) -> bool:
        """Run on AFTER_DATALOADER."""
        return event == Event.AFTER_DATALOADER

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        """Raise if the batch would be split."""
        batch = state.batch.get("image") if isinstance(state.batch, dict) else None
        n = int(batch.shape[0]) if batch is not None else None
        mb = state.device_train_microbatch_size
        if getattr(state, "auto_microbatching", False) or (n is not None and mb is not None and int(mb) < n):
            raise ValueError(
                f"Composer's device_train_microbatch_size={mb} is smaller than the batch ({n}): Composer's "
                "microbatching splits the batch and so shrinks the negatives of the contrastive objective (each "
                "microbatch would contrast only against itself; 'auto' would also retry a batch after running out "
                "of memory and update the estimator twice). Pass the microbatch size to the recipe instead "
                "(device_train_microbatch_size=N with build_trainer), which runs the exact gradient cache "
                "(amortize.train.gradcache.GradientCache) inside one Composer microbatch."
            )


class LogLossTerms(Callback):
    """Log the named loss terms of every training batch as ``loss/train/<term>``."""

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        """Composer hook (BATCH_END)."""
        if event != Event.BATCH_END:
            return
        terms = {k: v for k, v in unwrap(state.model).last_terms.items() if k != "loss" and v.numel() == 1}
        if not terms:
            return
        # one device-to-host copy for all terms, not one synchronising float() per term
        device = next(iter(terms.values())).device
        values = torch.stack([v.detach().reshape(()).to(device, torch.float32) for v in terms.values()]).tolist()
        logger.log_metrics({f"loss/train/{k}": v for k, v in zip(terms, values)})


def monitors_estimator(loss_fn: torch.nn.Module) -> bool:
    """Whether ``loss_fn`` has an estimator that keeps state (not in-batch, not none): the monitor's default."""
    from amortize.estimators.in_batch import InBatchEstimator

    estimator = getattr(loss_fn, "estimator", None)
    return estimator is not None and not isinstance(estimator, InBatchEstimator)


class EstimatorMonitorCallback(Callback):
    """Per-epoch :class:`~amortize.diagnostics.EstimatorMonitor` verdicts on the loss's estimator.

    At FIT_START it hooks the estimator of the (possibly DDP-wrapped) model's loss; each epoch it
    logs ``estimator/r2_first``, ``estimator/r2_last`` and ``estimator/r_mean`` to the run's loggers
    and prints each warning as one ``EstimatorWarning: ...`` line on stderr (rank 0). It only reads
    detached tensors the loss already computes and synchronises with the host once per epoch, so
    training is unchanged. A recipe sets its options, or turns it off, as a ``callbacks:`` entry::

        callbacks: [{name: estimator_monitor, max_bias: 0.5}]   # or {name: estimator_monitor, policy: none}

    Args:
        policy: ``warn`` (log the statistics and print the warnings) or ``none`` (do nothing).
        growth: warn when the last quarter's mean ``r^2`` exceeds ``growth`` x the first quarter's ...
        floor: ... and exceeds ``floor`` (nats squared).
        max_bias: warn when ``|mean r|`` over the epoch exceeds this (nats).
        min_steps: epochs with fewer steps are not judged (see :class:`~amortize.diagnostics.EstimatorMonitor`).
    """

    def __init__(self, policy: Literal["warn", "none"] = "warn", growth: float = 2.0, floor: float = 0.25,
                 max_bias: float = 1.0, min_steps: int = 40):
        if policy not in ("warn", "none"):
            raise ValueError(f"unknown policy {policy!r}; valid: warn, none")
        self.policy = policy
        self.monitor = EstimatorMonitor(growth=growth, floor=floor, max_bias=max_bias, min_steps=min_steps,
                                        warn=False)
        self._handle = None

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        """Composer hook (FIT_START, EPOCH_START, EPOCH_END, FIT_END)."""
        if self.policy == "none":
            return
        if event == Event.FIT_START:
            loss_fn = unwrap(state.model).loss_fn
            if monitors_estimator(loss_fn) and self._handle is None:
                self._handle = self.monitor.attach(loss_fn.estimator)
                self.monitor.start_epoch(int(state.timestamp.epoch))  # a run resumed mid-epoch
        elif self._handle is None:
            return
        elif event == Event.EPOCH_START:
            self.monitor.start_epoch(int(state.timestamp.epoch))
        elif event == Event.EPOCH_END:
            self._report(self.monitor.end_epoch(), logger)
        elif event == Event.FIT_END:
            self._handle.remove()
            self._handle = None

    def _report(self, stats: Optional[dict[str, float]], logger: Logger) -> None:
        if stats is None:
            return
        logger.log_metrics({f"estimator/{k}": stats[k] for k in ("r2_first", "r2_last", "r_mean")})
        from composer.utils import dist

        if dist.get_global_rank() == 0:
            for msg in self.monitor.warnings:
                print(f"EstimatorWarning: {msg}", file=sys.stderr, flush=True)
        self.monitor.warnings.clear()  # each printed once


class ExportWeights(Callback):
    """Write the weights export ``<folder>/<filename>`` (rank 0) at the end of every epoch and at FIT_END.

    What the file holds, and how it is read, is :mod:`amortize.weights_export`'s.

    Weights that hold NaN or Inf are never written: the callback raises
    :class:`~amortize.train.guards.NonFiniteWeightsError` instead, and the run stops with it.

    The file loads with ``torch.load(path, weights_only=True)`` and is what ``amortize eval``
    reads when given a run folder.

    Args:
        folder: where to write (usually the run's ``save_folder``).
        filename: the file name (:data:`~amortize.weights_export.EXPORT_FILENAME` unless given).
    """

    def __init__(self, folder: str, filename: str = EXPORT_FILENAME):
        self.folder = folder
        self.filename = filename

    @property
    def path(self) -> str:
        """The export's path."""
        return os.path.join(self.folder, self.filename)

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        """Composer hook."""
        if event not in (Event.EPOCH_CHECKPOINT, Event.FIT_END):
            return
        from composer.utils import dist

        if dist.get_global_rank() != 0:
            return
        from amortize.train.guards import check_finite_weights

        m = unwrap(state.model)
        export = export_payload(m.recipe, m.model.state_dict(), m.loss_fn.state_dict(),
                                int(state.timestamp.epoch), int(state.timestamp.batch))
        ts = export["timestamp"]
        # the towers only: a moving-average table holds -inf for samples not seen yet
        check_finite_weights(export["model"],
                             f"{self.path} at epoch {ts['epoch']}, batch {ts['batch']}")
        atomic_save(export, self.path)

