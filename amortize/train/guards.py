"""Run guards for long Composer runs: divergence, bad-data reports, atomic checkpoint files.

* :class:`DivergenceGuard` (Algorithm): after the backward pass, checks that the loss and the
  gradient norm are finite. On a non-finite step it either *skips* it (gradients dropped, so the
  optimiser leaves parameters and its state alone; the estimator's state is rolled back to its
  value before the step) or *stops* the run: it saves a checkpoint of the last good state and
  raises :class:`DivergenceError` naming the batch and what was non-finite.
* :class:`DataSkipReport` (Callback): logs the webdataset pipeline's skip counts
  (``data/kept``, ``data/skipped/<reason>``) every epoch and at the end of the run, and says
  how many samples of an epoch were not trained (skipped, or lost in a truncated shard) and why.
* (moved to :mod:`amortize.train.compat`) :func:`~amortize.train.compat.install_atomic_checkpoint_writes`: makes Composer write each checkpoint to a temporary
  file and rename it into place, so a process killed during a save never leaves a truncated
  checkpoint under a real checkpoint name.

>>> DivergenceGuard(policy="skip").policy
'skip'
"""

from __future__ import annotations

import copy
import logging
import math
import os
import signal
import sys
import threading
from typing import Any, Optional

import torch
from composer.core import Algorithm, Callback, Event, State
from composer.loggers import Logger

from amortize import checks as K
from amortize.train.guard_options import DIVERGENCE_POLICIES, DivergenceOptions, Policy  # noqa: F401 (re-exported)
from amortize.train.model import unwrap

__all__ = [
    "DIVERGENCE_POLICIES",
    "DivergenceError",
    "DivergenceGuard",
    "NonFiniteWeightsError",
    "check_finite_weights",
    "DataSkipReport",
    "STOP_SIGNALS",
    "SaveOnInterrupt",
    "TrainingInterrupted",
]

log = logging.getLogger(__name__)

class DivergenceError(RuntimeError):
    """Training stopped on a non-finite loss or gradient; the message names the batch, what was
    non-finite and the checkpoint of the last good state.

    Attributes:
        batch: the 1-based number of the batch that diverged.
        checkpoint: path of the checkpoint written before stopping (None if none could be written).
    """

    def __init__(self, message: str, batch: int, checkpoint: Optional[str]):
        super().__init__(message)
        self.batch = batch
        self.checkpoint = checkpoint


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


def _params_with_grad(state: State) -> list[torch.nn.Parameter]:
    out = []
    for opt in state.optimizers:
        for group in opt.param_groups:
            out.extend(p for p in group["params"] if p.grad is not None)
    return out


def _grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    if not params:
        return torch.zeros(())
    norms = [p.grad.detach().float().norm() for p in params]
    return torch.linalg.vector_norm(torch.stack(norms))


class DivergenceGuard(DivergenceOptions, Algorithm):
    """Detect a non-finite loss or gradient and skip the step or stop the run.

    Runs on BEFORE_FORWARD (snapshot of the state the step may corrupt) and AFTER_BACKWARD (the
    check, before gradient clipping and the optimiser step). Between BEFORE_LOSS and AFTER_LOSS it
    lowers the loss module's own checks (``ContrastiveLoss.checks``) from ``full`` to ``shapes``, so a batch with NaN
    or Inf features reaches the check as a non-finite loss instead of raising ``ValueError``. The check costs one device-to-host
    copy of two numbers per step (the loss and the total gradient norm, stacked); under
    ``torch.distributed`` the flags are max-reduced so every process takes the same decision.

    ``skip``: every gradient is set to None, so the optimiser (AdamW included) moves neither the
    parameters nor its moments, step counts or weight decay; the loss module's state (moving
    averages, amortizer networks and their Adam) and the towers' buffers are restored from the
    snapshot. The learning-rate schedule and the data still advance. After
    ``max_consecutive_skips`` non-finite steps in a row the guard stops as with ``stop``.

    ``stop``: same roll-back, then a Composer checkpoint ``diverged-ep{epoch}-ba{batch}-rank{rank}.pt``
    of the last good state is written to ``save_folder`` and :class:`DivergenceError` is raised.

    Args:
        policy: one of :data:`DIVERGENCE_POLICIES`.
        max_consecutive_skips: consecutive skipped steps after which the run stops (0: never).
        restore_estimator: snapshot and restore the loss module's state and the towers' buffers
            (costs one copy of that state per step: cheap for AmorLIP, a copy of the per-sample
            tables for SogCLR/FastCLIP).
        check_grads: also check the gradient norm (None: yes, except under ``amp_fp16``, where
            Composer's gradient scaler already skips steps with inf gradients).
        save_folder: where ``stop`` writes its checkpoint (None: no checkpoint).

    Attributes:
        skipped: batch numbers (1-based) of the skipped steps.
    """

    def match(self, event: Event, state: State) -> bool:
        """Run on BEFORE_FORWARD, BEFORE_LOSS, AFTER_LOSS and AFTER_BACKWARD unless the policy is ``none``."""
        return self.policy != "none" and event in (Event.BEFORE_FORWARD, Event.BEFORE_LOSS, Event.AFTER_LOSS,
                                                  Event.AFTER_BACKWARD)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        """Snapshot (BEFORE_FORWARD), relax value checks around the loss, check and act (AFTER_BACKWARD)."""
        if event in (Event.BEFORE_LOSS, Event.AFTER_LOSS):
            # the guard owns the non-finite case: the loss's value checks would raise on a NaN
            # batch (and read values back from the device); keep the shape and dtype checks of
            # this run's loss module only (nothing process-wide changes)
            loss_fn = unwrap(state.model).loss_fn
            if event == Event.BEFORE_LOSS:
                self._checks = loss_fn.checks
                if K.resolve(loss_fn.checks) == "full":
                    loss_fn.checks = "shapes"
            else:
                loss_fn.checks = self._checks
            return
        if event == Event.BEFORE_FORWARD:
            if self.restore_estimator:
                self._snapshot = self._take_snapshot(state)
            return
        what = self._non_finite(state)
        if not what:
            self._consecutive = 0
            return
        batch = int(state.timestamp.batch) + 1
        for p in _params_with_grad(state):
            p.grad = None
        if self._snapshot is not None:
            self._restore(state, self._snapshot)
        self._consecutive += 1
        stop = self.policy == "stop" or (0 < self.max_consecutive_skips <= self._consecutive)
        logger.log_metrics({"divergence/non_finite_steps": float(len(self.skipped) + 1)})
        if not stop:
            self.skipped.append(batch)
            log.warning("divergence guard: batch %d has a non-finite %s; step skipped (%d in a row, %d in all)",
                        batch, what, self._consecutive, len(self.skipped))
            return
        reason = what if self.policy == "stop" else f"{what} ({self._consecutive} non-finite steps in a row)"
        checkpoint = self._save(state)
        where = f"; the last good state is in {checkpoint}" if checkpoint else ""
        message = (f"training diverged at batch {batch} (epoch {int(state.timestamp.epoch)}): non-finite {reason}; "
                   f"policy {self.policy!r} stopped the run before the optimiser step{where}")
        log.error("divergence guard: %s", message)
        raise DivergenceError(message, batch, checkpoint)

    # ------------------------------------------------------------------ helpers

    def _wants_grads(self, state: State) -> bool:
        if self.check_grads is not None:
            return self.check_grads
        return "fp16" not in str(getattr(state.precision, "value", state.precision))

    def _non_finite(self, state: State) -> str:
        loss = state.loss
        if isinstance(loss, dict):
            loss = loss.get("total", next(iter(loss.values())))
        if isinstance(loss, (tuple, list)):
            loss = sum(loss)
        loss_t = torch.as_tensor(loss).detach().float().sum().reshape(())
        if self._wants_grads(state):
            norm = _grad_norm(_params_with_grad(state)).to(loss_t.device)
        else:
            norm = torch.zeros((), device=loss_t.device)
        vals = torch.stack([loss_t, norm])
        flags = (~torch.isfinite(vals)).float()
        from composer.utils import dist

        if dist.get_world_size() > 1:
            dist.all_reduce(flags, reduce_operation="MAX")
        bad_loss, bad_grad = (bool(v) for v in flags.tolist())  # the one host sync per step
        parts = []
        if bad_loss:
            parts.append(f"loss ({float(loss_t)})" if not math.isfinite(float(loss_t)) else "loss (on another process)")
        if bad_grad:
            parts.append(f"gradient norm ({float(norm)})" if not math.isfinite(float(norm))
                         else "gradient norm (on another process)")
        return " and ".join(parts)

    @staticmethod
    def _take_snapshot(state: State) -> dict[str, Any]:
        from amortize.train.compat import rollback_keys

        m = unwrap(state.model)
        sd = m.loss_fn.state_dict()
        return {
            "loss_fn": copy.deepcopy({k: sd[k] for k in rollback_keys(m.loss_fn)}),
            "buffers": {n: b.detach().clone() for n, b in m.model.named_buffers()},
        }

    @staticmethod
    def _restore(state: State, snapshot: dict[str, Any]) -> None:
        m = unwrap(state.model)
        m.loss_fn.load_state_dict(snapshot["loss_fn"], strict=False)  # state declared resume="reset" stays
        with torch.no_grad():
            for n, b in m.model.named_buffers():
                if n in snapshot["buffers"]:
                    b.copy_(snapshot["buffers"][n])

    def _save(self, state: State) -> Optional[str]:
        if self.save_folder is None:
            return None
        from composer.utils.checkpoint import save_checkpoint

        from amortize.train.compat import install_atomic_checkpoint_writes

        install_atomic_checkpoint_writes()
        name = os.path.join(self.save_folder, "diverged-ep{epoch}-ba{batch}-rank{rank}.pt")
        try:
            return save_checkpoint(state, name)
        except Exception as e:  # the run is stopping anyway: report, do not mask the divergence
            log.error("divergence guard: could not save a checkpoint: %s", e)
            return None


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
        export: the run's :class:`~amortize.train.algorithms.ExportWeights` callback.
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
