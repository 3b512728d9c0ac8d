"""Composer Callbacks of amortize: the ones that read the run or save it.

A Callback here changes no weight and no step: it logs, reports and writes files, and may end the
run (a stop signal, an epoch that trained no batch, weights that are not finite at an export).
What changes the run is in :mod:`amortize.train.algorithms`; the evaluation during training is
:class:`amortize.eval.callback.EvalCallback`, beside the evaluation it runs.

* :class:`LogLossTerms` (BATCH_END): logs every named loss term as ``loss/train/<term>``.
* :class:`EstimatorMonitorCallback` (EPOCH_START, EPOCH_END): runs
  :class:`amortize.diagnostics.EstimatorMonitor` on the loss's estimator, logs ``estimator/*`` and
  prints its warnings (on by default for a stateful estimator; recipe name ``estimator_monitor``).
* :class:`DataSkipReport` (EPOCH_END, FIT_END): logs the webdataset pipeline's skip counts
  (``data/kept``, ``data/skipped/<reason>``) and says how many samples of an epoch were not
  trained (skipped, or lost in a truncated shard) and why.
* :class:`ExportWeights` (EPOCH_CHECKPOINT, FIT_END): writes the run's weights export
  (:mod:`amortize.weights_export`: the recipe, the towers and the estimator state), refusing
  weights that are not finite (:class:`NonFiniteWeightsError`).
* :class:`SaveOnInterrupt` (BATCH_CHECKPOINT): on Ctrl-C or SIGTERM, finishes the batch, saves a
  checkpoint and the export, and stops the run with :class:`TrainingInterrupted`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any, Optional

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger

from amortize import checks as K
from amortize.checkpoints import atomic_save
from amortize.train.guard_options import EstimatorMonitorOptions
from amortize.train.model import unwrap
from amortize.weights_export import EXPORT_FILENAME, export_payload

__all__ = [
    "LogLossTerms",
    "EstimatorMonitorCallback",
    "monitors_estimator",
    "DataSkipReport",
    "ExportWeights",
    "NonFiniteWeightsError",
    "check_finite_weights",
    "SaveOnInterrupt",
    "TrainingInterrupted",
    "STOP_SIGNALS",
]

log = logging.getLogger(__name__)


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


class EstimatorMonitorCallback(EstimatorMonitorOptions, Callback):
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


class DataSkipReport(Callback):
    """Log the data pipeline's skip counts at the end of every epoch and of the run.

    Logs ``data/kept``, ``data/shards``, ``data/skipped/<reason>`` (see
    :data:`amortize.data.webdataset.SKIP_REASONS`) and ``data/skipped/lost``, and a one-line summary
    when anything was skipped. An epoch in which samples of the data were not trained (skipped, or
    lost in a missing or truncated shard, whose size the shard's stats say) ends with a warning
    saying how many of the epoch's samples and why: ``data: epoch 0: 6 of 36 samples not trained
    (1 corrupt shard: 6 samples lost)``.

    Args:
        counter: the pipeline's :class:`~amortize.data.webdataset.SkipCounter`.
    """

    def __init__(self, counter: Any):
        self.counter = counter
        self._epoch_start_batch: Optional[int] = None
        self._epoch_start_counts: dict[str, int] = {}
        self._epoch_rows = 0

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        """Composer hook (EPOCH_START, AFTER_DATALOADER, EPOCH_END, FIT_END)."""
        if event == Event.EPOCH_START:
            self._epoch_start_batch = int(state.timestamp.batch)
            self._epoch_start_counts, self._epoch_rows = self.counter.as_dict(), 0
            return
        if event == Event.AFTER_DATALOADER:
            self._epoch_rows += _rows(state.batch)
            return
        if event not in (Event.EPOCH_END, Event.FIT_END):
            return
        if event == Event.EPOCH_END and self._epoch_start_batch == int(state.timestamp.batch):
            # before EPOCH_CHECKPOINT: no untrained checkpoint or export is written
            from amortize.data.webdataset import TooManySkippedError

            raise TooManySkippedError(
                f"data: epoch {int(state.timestamp.epoch) - 1} yielded no batch ({self.counter.summary()}); "
                "every sample was skipped or the shards hold fewer samples than one batch")
        counts = self.counter.as_dict()
        metrics = {f"data/{k}" if k in ("kept", "shards") else f"data/skipped/{k}": float(v) for k, v in counts.items()}
        logger.log_metrics(metrics)
        if event == Event.EPOCH_END:
            line = self.epoch_line(int(state.timestamp.epoch) - 1, counts)
            if line:
                log.warning("%s", line)
        if self.counter.skipped_samples or self.counter.bad_shards:
            f_samples, f_shards = self.counter.fractions()
            log.warning("data: %s (%.2f%% of samples, %.2f%% of shards skipped; limit %.2f%%)",
                        self.counter.summary(), 100 * f_samples, 100 * f_shards,
                        100 * self.counter.max_skip_fraction)

    def epoch_line(self, epoch: int, counts: dict[str, int]) -> Optional[str]:
        """``data: epoch E: N of M samples not trained (why)`` of the epoch that ends, or None when every
        sample it reached was trained. ``M`` is the samples trained plus those not trained (by this process)."""
        d = {k: v - self._epoch_start_counts.get(k, 0) for k, v in counts.items()}
        skipped = {k: d.get(k, 0) for k in ("missing_field", "undecodable_image", "empty_caption") if d.get(k, 0)}
        lost = d.get("lost", 0)
        missed = lost + sum(skipped.values())
        if missed <= 0:
            return None
        why = []
        if lost:
            shards = [f"{n} {kind} shard{'s' if n > 1 else ''}" for kind, n in
                      (("corrupt", d.get("corrupt_shard", 0)), ("missing", d.get("missing_shard", 0))) if n]
            why.append(f"{' and '.join(shards) or 'truncated or missing shards'}: {lost} sample{'s' if lost > 1 else ''} "
                       "lost, never read")
        if skipped:
            why.append(f"{sum(skipped.values())} skipped: " + " ".join(f"{k}={n}" for k, n in skipped.items()))
        return (f"data: epoch {epoch}: {missed} of {self._epoch_rows + missed} samples not trained "
                f"({'; '.join(why)})")


def _rows(batch: Any) -> int:
    """Rows of a batch (the first dimension of its first tensor; 0 when it holds none)."""
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else [batch]
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return 0


class NonFiniteWeightsError(RuntimeError):
    """The run's weights hold NaN or infinite values; nothing is exported. The message names how
    many tensors and the first ones."""


def check_finite_weights(state_dict: dict, where: str) -> None:
    """Raise :class:`NonFiniteWeightsError` when a floating tensor of ``state_dict`` is not finite.

    Args:
        state_dict: the towers' (and loss module's) state.
        where: what is being written, for the message (the export's path, ``at epoch 2, batch 40``).
    """
    bad = K.non_finite_tensors(state_dict)
    if bad:
        raise NonFiniteWeightsError(
            f"the weights are not finite ({len(bad)} of the tensors hold NaN or Inf, first: {', '.join(bad[:3])}); "
            f"refusing to write {where}. Lower optimizer.lr, keep divergence.policy=skip or stop, and resume "
            "from an earlier checkpoint")


class ExportWeights(Callback):
    """Write the weights export ``<folder>/<filename>`` (rank 0) at the end of every epoch and at FIT_END.

    What the file holds, and how it is read, is :mod:`amortize.weights_export`'s.

    Weights that hold NaN or Inf are never written: the callback raises
    :class:`NonFiniteWeightsError` instead, and the run stops with it.

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
        m = unwrap(state.model)
        export = export_payload(m.recipe, m.model.state_dict(), m.loss_fn.state_dict(),
                                int(state.timestamp.epoch), int(state.timestamp.batch))
        ts = export["timestamp"]
        # the towers only: a moving-average table holds -inf for samples not seen yet
        check_finite_weights(export["model"],
                             f"{self.path} at epoch {ts['epoch']}, batch {ts['batch']}")
        atomic_save(export, self.path)


STOP_SIGNALS = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}
"""The signals :class:`SaveOnInterrupt` turns into a checkpoint, the export and a clean stop."""


class TrainingInterrupted(Exception):
    """A stop signal (Ctrl-C or SIGTERM) ended training after a checkpoint and the weights export were written.

    Attributes:
        checkpoint: the checkpoint written at the interrupted batch.
        export: the path of the weights export (:mod:`amortize.weights_export`).
        epoch: the epoch count of the checkpoint.
        batch: the batch count of the checkpoint.
        signum: the signal that stopped the run (``signal.SIGINT`` or ``signal.SIGTERM``); the
            command line exits with ``128 + signum`` (130, 143), as the shell reports a signal.
    """

    def __init__(self, checkpoint: str, export: str, epoch: int, batch: int, signum: int = signal.SIGINT):
        what = STOP_SIGNALS.get(signum, f"signal {signum}")
        super().__init__(f"interrupted at epoch {epoch}, batch {batch}; saved {checkpoint} and {export} ({what})")
        self.checkpoint, self.export, self.epoch, self.batch = checkpoint, export, epoch, batch
        self.signum = int(signum)

    @property
    def exit_status(self) -> int:
        """``128 + signum``: 130 for Ctrl-C, 143 for SIGTERM."""
        return 128 + self.signum


def _world_size() -> int:
    from composer.utils import dist

    return dist.get_world_size()


def _die_with_parent() -> None:
    """Under a launcher, ask Linux to send this process SIGTERM when the launcher dies.

    A scheduler that sends SIGTERM to the launcher only (not to the whole process group) kills
    Composer's launcher at once, without forwarding the signal; the workers would train on,
    orphaned, until killed without a checkpoint. With ``PR_SET_PDEATHSIG`` they get SIGTERM and
    save. Elsewhere than Linux this does nothing.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # not Linux
        pass


class SaveOnInterrupt(Callback):
    """SIGINT (Ctrl-C) or SIGTERM (what a scheduler sends before preempting a job) finishes the
    current batch, saves a checkpoint and the export, then stops the run.

    The signal only sets a flag; at the next BATCH_CHECKPOINT (after the optimiser and scheduler
    step: the state a periodic checkpoint holds) the callback writes ``save_folder/save_filename``
    (atomically), points the ``latest`` link at it, writes the weights export and raises
    :class:`TrainingInterrupted`, which ``amortize train`` turns into the resume command and exit
    status ``128 + signum`` (130 for Ctrl-C, 143 for SIGTERM). Resuming with ``autoresume=true``
    continues bit-identically: the checkpoint holds what a periodic one would.

    Several processes (Composer's launcher): every process installs the handlers, and the
    processes agree at every BATCH_CHECKPOINT on whether any of them was signalled (one
    max-reduction of one number per batch), so all of them save the same batch together. Ctrl-C
    reaches every process of the terminal's process group, and the launcher then sends SIGTERM
    to its workers: a second signal while a stop is pending is ignored there (the launcher
    kills the workers with SIGKILL 30 s later if they hang). A worker also asks for SIGTERM when
    the launcher dies (see :func:`_die_with_parent`). In a single process, the same signal
    twice stops at once (a second Ctrl-C raises ``KeyboardInterrupt``).

    The handlers are installed for the duration of ``fit``, in the main thread only.

    Args:
        save_folder: the run's folder.
        save_filename: Composer's checkpoint name template.
        latest_filename: Composer's latest-link name template.
        export: the run's :class:`ExportWeights` callback.
    """

    def __init__(self, save_folder: str, save_filename: str, latest_filename: str, export: Any):
        self.save_folder, self.save_filename, self.latest_filename = save_folder, save_filename, latest_filename
        self.export = export
        self.requested = 0  # the signal number asked for, 0: none
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.requested:
            if signum == self.requested and len(self._previous) and _world_size() == 1:
                self._restore()  # the same signal twice in one process: stop at once
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                os.kill(os.getpid(), signum)
            return
        self.requested = int(signum)
        from composer.utils import dist

        if dist.get_global_rank() == 0:
            more = "; Ctrl-C again to stop at once" if signum == signal.SIGINT and _world_size() == 1 else ""
            text = f"\n{STOP_SIGNALS.get(signum, signum)}: finishing this batch, then saving a checkpoint{more}\n"
            try:  # a raw write: print() here could re-enter a buffered write the signal interrupted
                os.write(sys.stderr.fileno(), text.encode())
            except (OSError, ValueError):
                pass

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self.requested = 0
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        if _world_size() > 1:
            _die_with_parent()

    def _restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._previous.items():
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _agreed(self, state: State) -> int:
        """The signal any process was given (the largest number), the same on every process."""
        if _world_size() == 1:
            return self.requested
        from composer.utils import dist

        flag = state.device.tensor_to_device(torch.tensor([float(self.requested)]))
        dist.all_reduce(flag, reduce_operation="MAX")
        return int(flag.item())

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        """Composer hook (FIT_START, BATCH_CHECKPOINT, FIT_END)."""
        if event == Event.FIT_START:
            self._install()
        elif event == Event.FIT_END:
            self._restore()
        elif event == Event.BATCH_CHECKPOINT:
            signum = self._agreed(state)
            if not signum:
                return
            from composer.utils import dist
            from composer.utils.checkpoint import save_checkpoint

            from amortize.checkpoints import atomic_symlink
            from amortize.train.compat import install_atomic_checkpoint_writes

            install_atomic_checkpoint_writes()
            path = save_checkpoint(state, os.path.join(self.save_folder, self.save_filename))
            if dist.get_global_rank() == 0:
                path = str(path or "")
                atomic_symlink(os.path.basename(path), os.path.join(self.save_folder,
                                                                    self.latest_filename.format(rank=0)))
            self.export.run_event(Event.FIT_END, state, logger)
            dist.barrier()  # rank 0's export is whole before any process reports
            raise TrainingInterrupted(str(path), self.export.path, int(state.timestamp.epoch),
                                      int(state.timestamp.batch), signum)

    def close(self, state: State, logger: Logger) -> None:
        """Put the previous signal handlers back."""
        self._restore()
