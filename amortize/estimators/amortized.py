"""AmorLIP's estimator: amortizer networks fitted online to the in-batch partition sums.

Per step (spec section 7): blend the batch targets with the previous epoch's network (Eq. 12),
run ``inner_steps`` Adam steps of the Stage I objective every ``update_every`` steps, read the
encoder normaliser (``normalizer``), and every ``ema_every`` steps move the EMA target network.
At the start of every epoch the EMA network becomes the previous-epoch network and the online
network, its optimiser and its EMA are re-initialised (``reinit="every_epoch"``, the authors' code).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor, nn

from amortize.amortizers import build_amortizer
from amortize.estimators.base import PartitionEstimate, PartitionEstimator
from amortize.functional import AMORTIZATION_OBJECTIVES, amortization_loss
from amortize.schedules import BetaWarmup, Schedule, build_schedule

__all__ = ["AmortizedEstimator", "blend_log_targets", "NORMALIZERS", "REINIT_POLICIES"]

MODALITIES = ("image", "text")

NORMALIZERS = ("previous_blend", "ema_target")
"""Encoder normaliser modes: ``previous_blend`` divides by ``Z_comb`` (the authors' released
command, ``fit_w_prev``); ``ema_target`` divides by the EMA target network's ``lambda`` (paper Eq. 6)."""

REINIT_POLICIES = ("every_epoch", "never")
"""When the online amortizer, its optimiser and its EMA are re-initialised."""


def blend_log_targets(log_prev: Tensor, log_batch: Tensor, beta: float) -> Tensor:
    """``log(beta * exp(log_prev) + (1 - beta) * exp(log_batch))``: Eq. 12 in log space.

    Args:
        log_prev: (B,) log partition predicted by the previous-epoch network.
        log_batch: (B,) in-batch log partition sums.
        beta: blending weight in [0, 1].

    Returns:
        (B,) blended log targets.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return log_batch
    if beta == 1.0:
        return log_prev
    return torch.logaddexp(log_prev + math.log(beta), log_batch + math.log1p(-beta))


class AmortizedEstimator(PartitionEstimator):
    """Amortized partition functions: one small network per modality predicts ``log Z``.

    Submodules: ``online`` (trained by the inner optimiser), ``target`` (EMA of ``online``) and
    ``previous`` (the EMA network frozen at the start of the epoch), each a
    ``ModuleDict(image=..., text=...)``. Buffers: ``step``, ``epoch``, ``max_epochs``,
    ``has_previous``. The inner Adam optimiser's state is saved in the module's extra state.
    None of the amortizer parameters require grad outside the inner loop, so an outer optimiser,
    DDP and gradient clipping of the encoders never see them.

    Args:
        dim: embedding width ``d``.
        amortizer: a name in :data:`amortize.amortizers.AMORTIZERS`.
        amortizer_options: keyword options of the amortizer (e.g. ``{"width_factor": 0.5}``).
        objective: Stage I objective, a name in :data:`amortize.functional.AMORTIZATION_OBJECTIVES`.
        log_l2_weight: weight of the log-L2 regulariser added to ``objective`` (paper: 0.1 for f-div).
        lr: the inner Adam's learning rate (constant, no weight decay).
        inner_steps: ``T_lambda``, Adam steps per fit.
        update_every: ``T_online``, encoder steps between fits.
        ema_decay: ``alpha`` of the target network.
        ema_every: ``T_target``, encoder steps between EMA updates.
        beta: schedule (over epochs) of the previous-epoch blending weight; a float is constant.
        normalizer: ``"previous_blend"`` (authors' code, default) or ``"ema_target"`` (paper Eq. 6).
        reinit: ``"every_epoch"`` (authors' code) or ``"never"``.
        clip_norm: gradient-norm clip of the inner steps (None: no clipping).
        seed: seeds the (re-)initialisation of the online networks, so runs and resumes agree.
    """

    def __init__(
        self,
        dim: int,
        amortizer: str = "residual_mlp",
        amortizer_options: Optional[dict[str, Any]] = None,
        objective: str = "log_l2",
        log_l2_weight: float = 0.0,
        lr: float = 1e-3,
        inner_steps: int = 3,
        update_every: int = 1,
        ema_decay: float = 0.92,
        ema_every: int = 2,
        beta: Union[float, dict, Schedule] = BetaWarmup(0.8, 16),
        normalizer: Literal["previous_blend", "ema_target"] = "previous_blend",
        reinit: Literal["every_epoch", "never"] = "every_epoch",
        clip_norm: Optional[float] = 1.0,
        seed: int = 0,
    ):
        super().__init__()
        if normalizer not in NORMALIZERS:
            raise ValueError(f"unknown normalizer {normalizer!r}; valid: {', '.join(NORMALIZERS)}")
        if reinit not in REINIT_POLICIES:
            raise ValueError(f"unknown reinit {reinit!r}; valid: {', '.join(REINIT_POLICIES)}")
        if objective not in AMORTIZATION_OBJECTIVES:
            raise ValueError(
                f"unknown amortization objective {objective!r}; valid: {', '.join(sorted(AMORTIZATION_OBJECTIVES))}"
            )
        for name, v in (("inner_steps", inner_steps), ("update_every", update_every), ("ema_every", ema_every)):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")
        self.dim = int(dim)
        self.amortizer_name = amortizer
        self.amortizer_options = dict(amortizer_options or {})
        self.objective = objective
        self.log_l2_weight = float(log_l2_weight)
        self.lr = float(lr)
        self.inner_steps = int(inner_steps)
        self.update_every = int(update_every)
        self.ema_decay = float(ema_decay)
        self.ema_every = int(ema_every)
        self.beta_schedule = build_schedule(beta)
        self.normalizer = normalizer
        self.reinit = reinit
        self.clip_norm = clip_norm
        self.seed = int(seed)

        self.online = self._fresh_nets(epoch=0)
        self.target = copy.deepcopy(self.online)
        self.previous = copy.deepcopy(self.online)
        for net in (self.online, self.target, self.previous):
            net.requires_grad_(False)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("epoch", torch.full((), -1, dtype=torch.long))
        self.register_buffer("max_epochs", torch.ones((), dtype=torch.long))
        self.register_buffer("has_previous", torch.zeros((), dtype=torch.bool))
        self._optimizer = self._new_optimizer()

    # ---------------------------------------------------------------- construction helpers

    def _fresh_nets(self, epoch: int) -> nn.ModuleDict:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + epoch)
            return nn.ModuleDict(
                {m: build_amortizer(self.amortizer_name, self.dim, **self.amortizer_options) for m in MODALITIES}
            )

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.online.parameters(), lr=self.lr, weight_decay=0.0)

    def get_extra_state(self) -> dict:
        """The inner optimiser's state, saved with the module's ``state_dict``."""
        return {"optimizer": self._optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        """Restore the inner optimiser's state."""
        self._optimizer = self._new_optimizer()
        self._optimizer.load_state_dict(state["optimizer"])

    # ---------------------------------------------------------------- schedule

    @property
    def beta(self) -> float:
        """The previous-epoch blending weight of the current epoch."""
        return self.beta_schedule(max(0, int(self.epoch)), int(self.max_epochs))

    def start_epoch(self, epoch: int, max_epochs: int) -> None:
        """Epoch start: the EMA network becomes ``previous``; re-initialise online, its Adam and EMA.

        Idempotent: calling it again for the current epoch (as a resumed run does) changes nothing.
        """
        if epoch == int(self.epoch):
            return
        self.max_epochs.fill_(max(1, max_epochs))
        with torch.no_grad():
            if int(self.epoch) >= 0:
                self.previous.load_state_dict(self.target.state_dict())
                self.has_previous.fill_(True)
            if self.reinit == "every_epoch" or int(self.epoch) < 0:
                device = self.step.device
                fresh = self._fresh_nets(epoch).to(device)
                self.online.load_state_dict(fresh.state_dict())
                self.target.load_state_dict(fresh.state_dict())
                self._optimizer = self._new_optimizer()
        self.epoch.fill_(epoch)

    # ---------------------------------------------------------------- per step

    def _predict(self, nets: nn.ModuleDict, u: dict[str, Tensor]) -> dict[str, Tensor]:
        return {m: nets[m](u[m]) for m in MODALITIES}

    def _fit(self, u: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
        params = [p for p in self.online.parameters()]
        loss = torch.zeros(())
        self.online.requires_grad_(True)
        try:
            with torch.enable_grad(), torch.autocast(device_type=u["image"].device.type, enabled=False):
                for _ in range(self.inner_steps):
                    loss = sum(
                        amortization_loss(self.online[m](u[m]), targets[m], self.objective, self.log_l2_weight)
                        for m in MODALITIES
                    )
                    grads = torch.autograd.grad(loss, params)
                    for p, g in zip(params, grads):
                        p.grad = g
                    if self.clip_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, self.clip_norm)
                    self._optimizer.step()
                    for p in params:
                        p.grad = None
        finally:
            self.online.requires_grad_(False)
        return loss.detach()

    @torch.no_grad()
    def _ema_update(self) -> None:
        for pt, po in zip(self.target.parameters(), self.online.parameters()):
            pt.lerp_(po, 1.0 - self.ema_decay)

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        log_z_x: Tensor,
        log_z_y: Tensor,
        index: Optional[Tensor] = None,
    ) -> PartitionEstimate:
        """Fit (in training mode) and return the normalisers; see the class docstring for the order."""
        # the counters are read to the host once per step (one synchronisation on a GPU)
        epoch, max_epochs, step, has_previous = torch.stack(
            [self.epoch, self.max_epochs, self.step, self.has_previous.long()]
        ).tolist()
        if epoch < 0:
            self.start_epoch(0, max_epochs)
            epoch, has_previous = 0, int(self.has_previous)
        u = {"image": x.detach().float(), "text": y.detach().float()}
        batch = {"image": log_z_x.detach().float(), "text": log_z_y.detach().float()}
        with torch.no_grad():
            if has_previous:
                beta = self.beta_schedule(epoch, max_epochs)
                prev = self._predict(self.previous, u)
                comb = {m: blend_log_targets(prev[m], batch[m], beta) for m in MODALITIES}
            else:
                comb = batch
        terms: dict[str, Tensor] = {}
        if self.training and step % self.update_every == 0:
            terms["amortizer_fit"] = self._fit(u, comb)
        with torch.no_grad():
            ema = self._predict(self.target, u)
            norm = comb if self.normalizer == "previous_blend" else ema
            terms["amortizer_rmse"] = torch.sqrt(
                0.5 * sum((ema[m] - batch[m]).square().mean() for m in MODALITIES)
            )
        if self.training:
            self.step.add_(1)
            if (step + 1) % self.ema_every == 0:
                self._ema_update()
        return PartitionEstimate(norm["image"].to(log_z_x.dtype), norm["text"].to(log_z_y.dtype), terms)
