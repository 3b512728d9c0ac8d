"""Composer Algorithms of amortize: the ones that change the run, each on its event.

An Algorithm changes the state of the run or the course of a step (Composer runs the Algorithms of
an event before its Callbacks, INIT excepted); what only reads the run or saves it is in
:mod:`amortize.train.callbacks`. The exact gradient cache and the guard that refuses Composer's own
microbatching (``FullBatchGuard``), Algorithms too, are in :mod:`amortize.train.gradcache`, with the
microbatch size they are about.

* :class:`EpochSchedules` (EPOCH_START): advances rho, beta, gamma and AmorLIP's per-epoch
  re-initialisation and previous-epoch networks, through ``loss_fn.start_epoch``.
* :class:`ClampLogitScale` (BATCH_END, after the optimiser step): ``s <= max_scale``.
* :class:`DivergenceGuard` (BEFORE_FORWARD to AFTER_BACKWARD; the recipe's ``divergence`` section):
  after the backward pass, checks that the loss and the gradient norm are finite. On a non-finite
  step it either *skips* it (gradients dropped, so the optimiser leaves parameters and its state
  alone; the estimator's state is rolled back to its value before the step) or *stops* the run:
  it saves a checkpoint of the last good state and raises :class:`DivergenceError` naming the
  batch and what was non-finite. Its options are declared without Composer in
  :mod:`amortize.train.guard_options`, so loading a recipe does not import this module.

Everything these Algorithms change lives in the model's ``state_dict``, so Composer's checkpoints
restore it. Only :class:`DivergenceGuard` keeps state of its own (the skipped batches, the count of
skips in a row, the snapshot of one step), for the process's run: it is not checkpointed.

>>> DivergenceGuard(policy="skip").policy
'skip'
"""

from __future__ import annotations

import copy
import logging
import math
import os
from typing import Any, Optional

import torch
from composer.core import Algorithm, Event, State, TimeUnit
from composer.loggers import Logger

from amortize import checks as K
from amortize.train.guard_options import DivergenceOptions
from amortize.train.model import unwrap

__all__ = [
    "EpochSchedules",
    "ClampLogitScale",
    "DivergenceGuard",
    "DivergenceError",
    "planned_epochs",
]

log = logging.getLogger(__name__)


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
        policy: one of :data:`~amortize.train.guard_options.DIVERGENCE_POLICIES`.
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
