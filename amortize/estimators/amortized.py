"""AmorLIP's estimator: amortizer networks fitted online to the in-batch partition sums.

Per step (spec section 7): blend the batch targets with the previous epoch's network (Eq. 12),
run ``inner_steps`` Adam steps of the Stage I objective every ``update_every`` steps, read the
encoder normaliser (``normalizer``), and every ``ema_every`` steps move the EMA target network.
At the start of every epoch the EMA network becomes the previous-epoch network and the online
network, its optimiser and its EMA are re-initialised (``reinit="every_epoch"``, the authors' code).
``cadence`` says whether ``update_every`` and ``ema_every`` count steps within the epoch (the
authors' code) or over the whole run, and ``lr_scaling`` whether the inner learning rate is
multiplied by the number of processes (the authors' code). ``docs/differences.md`` lists them.
"""

from __future__ import annotations

import copy
import math
from typing import Literal, Optional, Union

import torch
from torch import Tensor, nn

from amortize import checks as K

from amortize import comm as D
from amortize.amortizers import AMORTIZERS
from amortize.estimators.base import PartitionEstimate, PartitionEstimator
from amortize.objectives.stage1 import AMORTIZATION_OBJECTIVES, amortization_loss
from amortize.registry import Section
from amortize.schedules import BetaWarmup, Schedule, build_schedule

__all__ = [
    "AmortizedEstimator",
    "blend_log_targets",
    "NORMALIZERS",
    "REINIT_POLICIES",
    "CADENCES",
    "LR_SCALINGS",
    "EPOCH0_PREVIOUS",
]

MODALITIES = ("image", "text")

NORMALIZERS = ("previous_blend", "ema_target", "ema_ramp")
"""Encoder normaliser modes, with how the Stage I targets and the EMA go with them:

* ``previous_blend``: the authors' released command (``fit_w_prev``). The encoders are divided by
  ``Z_comb``, the in-batch sums blended with the previous-epoch network by ``beta`` (Eq. 12),
  which is also the Stage I target; the EMA decay is the constant ``ema_decay``.
* ``ema_target``: the paper (Eq. 6 with Eq. 12). The encoders are divided by the EMA target
  network's ``lambda``; the Stage I targets are blended by ``beta``; constant ``ema_decay``.
* ``ema_ramp``: the authors' code without ``fit_w_prev``. The encoders are divided by the EMA
  target network's ``lambda``; the Stage I targets are the in-batch sums, never blended; the EMA
  decay of epoch ``t`` is ``beta(t)``, so it ramps with the beta schedule (0 at epoch 0, then up
  to ``beta_T``) and ``ema_decay`` is unused.
"""

REINIT_POLICIES = ("every_epoch", "never")
"""When the online amortizer, its optimiser and its EMA are re-initialised."""

CADENCES = ("per_epoch", "global")
"""How ``update_every`` (``T_online``) and ``ema_every`` (``T_target``) count steps:

* ``per_epoch`` (the authors' code): a counter that restarts at every epoch; the fit runs at the
  within-epoch steps 0, ``T_online``, 2 ``T_online``, ... and the EMA update follows the
  within-epoch steps 0, ``T_target``, 2 ``T_target``, ...
* ``global``: the step counter of the whole run, never reset; the fit runs at the steps
  0, ``T_online``, ... and the EMA update follows the steps ``T_target - 1``, ``2 T_target - 1``, ...
  (the project's behaviour before ``cadence`` existed).
"""

LR_SCALINGS = ("none", "world_size")
"""The inner Adam's learning rate: ``none``: ``lr`` on any number of processes; ``world_size``
(the authors' code): ``lr * W`` with ``W`` the torch.distributed world size (1 when it is not
initialised), read whenever the optimiser is created (every epoch start) or restored."""

EPOCH0_PREVIOUS = ("none", "initial")
"""The previous-epoch network in epoch 0: ``none``: there is none, epoch 0 is never blended;
``initial`` (the authors' code): the untrained initial network, blended by ``beta(0)``. The two
agree when ``beta(0) = 0``, as with ``beta_warmup``."""


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
    ``ModuleDict(image=..., text=...)``. Buffers: ``step`` (training steps of the run),
    ``epoch_step`` (training steps of the current epoch), ``epoch``, ``max_epochs``, ``has_previous``. The inner Adam optimiser's state is saved in the module's extra state.
    None of the amortizer parameters require grad outside the inner loop, so an outer optimiser,
    DDP and gradient clipping of the encoders never see them.

    Args:
        dim: embedding width ``d``.
        amortizer: the network, a name in :data:`amortize.amortizers.AMORTIZERS` or a section with
            its options, e.g. ``{"name": "residual_mlp", "width_factor": 0.5}``.
        objective: Stage I objective, a name in :data:`amortize.functional.AMORTIZATION_OBJECTIVES`.
        log_l2_weight: weight of the log-L2 regulariser added to ``objective`` (paper: 0.1 for f-div).
        lr: the inner Adam's learning rate (constant, no weight decay).
        inner_steps: ``T_lambda``, Adam steps per fit.
        update_every: ``T_online``, encoder steps between fits.
        ema_decay: ``alpha`` of the target network (unused with ``normalizer="ema_ramp"``).
        ema_every: ``T_target``, encoder steps between EMA updates.
        beta: schedule (over epochs) of the previous-epoch blending weight; a float is constant.
            With ``normalizer="ema_ramp"`` it is the EMA decay's schedule instead.
        normalizer: a name in :data:`NORMALIZERS`: ``"previous_blend"`` (authors' released
            command, default), ``"ema_target"`` (the paper) or ``"ema_ramp"`` (authors' EMA mode).
        reinit: ``"every_epoch"`` (authors' code) or ``"never"``.
        clip_norm: gradient-norm clip of the inner steps (None: no clipping).
        seed: seeds the (re-)initialisation of the online networks, so runs and resumes agree.
        cadence: a name in :data:`CADENCES`: ``"per_epoch"`` (authors' code, default) or ``"global"``.
        lr_scaling: a name in :data:`LR_SCALINGS`: ``"none"`` (default, the same ``lr`` on any
            number of processes) or ``"world_size"`` (authors' code; the paper recipes use it).
        epoch0_previous: a name in :data:`EPOCH0_PREVIOUS`: ``"none"`` (default) or ``"initial"``
            (authors' code); it matters only for a ``beta`` schedule that starts above 0.
    """

    def __init__(
        self,
        dim: int,
        amortizer: Section = "residual_mlp",
        objective: str = "log_l2",
        log_l2_weight: float = 0.0,
        lr: float = 1e-3,
        inner_steps: int = 3,
        update_every: int = 1,
        ema_decay: float = 0.92,
        ema_every: int = 2,
        beta: Union[float, dict, Schedule] = BetaWarmup(0.8, 16),
        normalizer: Literal["previous_blend", "ema_target", "ema_ramp"] = "previous_blend",
        reinit: Literal["every_epoch", "never"] = "every_epoch",
        clip_norm: Optional[float] = 1.0,
        seed: int = 0,
        cadence: Literal["per_epoch", "global"] = "per_epoch",
        lr_scaling: Literal["none", "world_size"] = "none",
        epoch0_previous: Literal["none", "initial"] = "none",
    ):
        super().__init__()
        for name, value, valid in (
            ("normalizer", normalizer, NORMALIZERS),
            ("reinit", reinit, REINIT_POLICIES),
            ("cadence", cadence, CADENCES),
            ("lr_scaling", lr_scaling, LR_SCALINGS),
            ("epoch0_previous", epoch0_previous, EPOCH0_PREVIOUS),
        ):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
        AMORTIZATION_OBJECTIVES.get(objective)  # an unknown name fails here, with the valid ones
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
        self.amortizer = amortizer if isinstance(amortizer, str) else dict(amortizer)
        # checked once here (an unknown network or option fails, named), built at every re-initialisation
        self._amortizer = AMORTIZERS.bind(self.amortizer, "amortizer", passed=("dim",))
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
        self.cadence = cadence
        self.lr_scaling = lr_scaling
        self.epoch0_previous = epoch0_previous

        self.online = self._fresh_nets(epoch=0)
        self.target = copy.deepcopy(self.online)
        self.previous = copy.deepcopy(self.online)
        for net in (self.online, self.target, self.previous):
            net.requires_grad_(False)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("epoch_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("epoch", torch.full((), -1, dtype=torch.long))
        self.register_buffer("max_epochs", torch.ones((), dtype=torch.long))
        self.register_buffer("has_previous", torch.zeros((), dtype=torch.bool))
        self._optimizer = self._new_optimizer()
        self._params = list(self.online.parameters())
        self._host: Optional[list[int]] = None
        self.register_load_state_dict_post_hook(self._invalidate_counters)

    # ---------------------------------------------------------------- construction helpers

    def _fresh_nets(self, epoch: int) -> nn.ModuleDict:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + epoch)
            return nn.ModuleDict(
                {m: self._amortizer.build(dim=self.dim) for m in MODALITIES}
            )

    @property
    def inner_lr(self) -> float:
        """The inner Adam's learning rate now: ``lr``, times the world size under ``lr_scaling="world_size"``."""
        return self.lr * (D.world_size() if self.lr_scaling == "world_size" else 1)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        # foreach: one multi-tensor kernel per Adam step instead of one per parameter
        return torch.optim.Adam(self.online.parameters(), lr=self.inner_lr, weight_decay=0.0, foreach=True)

    def _set_inner_lr(self) -> None:
        for group in self._optimizer.param_groups:
            group["lr"] = self.inner_lr

    def get_extra_state(self) -> dict:
        """The inner optimiser's state, saved with the module's ``state_dict``."""
        return {"optimizer": self._optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        """Restore the inner optimiser's state."""
        self._optimizer = self._new_optimizer()
        self._optimizer.load_state_dict(state["optimizer"])
        self._set_inner_lr()  # the saved lr may come from another world size

    # ---------------------------------------------------------------- schedule

    @property
    def beta(self) -> float:
        """The previous-epoch blending weight of the current epoch."""
        return self.beta_schedule(max(0, int(self.epoch)), int(self.max_epochs))

    def ema_decay_at(self, epoch: int, max_epochs: int) -> float:
        """The EMA decay used in ``epoch``: ``beta(epoch)`` with ``normalizer="ema_ramp"``, else ``ema_decay``."""
        if self.normalizer != "ema_ramp":
            return self.ema_decay
        decay = self.beta_schedule(max(0, epoch), max_epochs)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"normalizer 'ema_ramp' uses beta as the EMA decay; it must be in [0, 1], got {decay}")
        return decay

    def start_epoch(self, epoch: int, max_epochs: int) -> None:
        """Epoch start: the EMA network becomes ``previous``; re-initialise online, its Adam and EMA.

        The within-epoch step counter restarts, and the inner Adam's learning rate is set from
        the current world size (``lr_scaling``). Idempotent: calling it again for the current
        epoch (as a resumed run does) changes nothing.
        """
        K.epoch_counts(epoch, max_epochs)
        if epoch == int(self.epoch):
            return
        self.max_epochs.fill_(max(1, max_epochs))
        with torch.no_grad():
            if int(self.epoch) >= 0 or self.epoch0_previous == "initial":
                # before the first epoch the EMA network is still the untrained initial one
                self.previous.load_state_dict(self.target.state_dict())
                self.has_previous.fill_(True)
            if self.reinit == "every_epoch" or int(self.epoch) < 0:
                device = self.step.device
                fresh = self._fresh_nets(epoch).to(device)
                self.online.load_state_dict(fresh.state_dict())
                self.target.load_state_dict(fresh.state_dict())
                self._optimizer = self._new_optimizer()
        self._set_inner_lr()
        self.epoch_step.zero_()
        self.epoch.fill_(epoch)
        self._host = None

    # ---------------------------------------------------------------- per step

    def _counters(self) -> list[int]:
        """``[epoch, max_epochs, step, epoch_step, has_previous]`` as Python ints.

        The buffers are the state (checkpoints, resume); a host copy is read from them once, after
        construction, a load or an epoch start, and then advanced beside them, so a training step
        does not synchronise with the device to read its own counters.
        """
        if self._host is None:
            self._host = torch.stack(
                [self.epoch, self.max_epochs, self.step, self.epoch_step, self.has_previous.long()]
            ).tolist()
        return list(self._host)

    def _invalidate_counters(self, *args, **kwargs) -> None:
        self._host = None

    def _predict(self, nets: nn.ModuleDict, u: dict[str, Tensor]) -> dict[str, Tensor]:
        return {m: nets[m](u[m]) for m in MODALITIES}

    def _fit(self, u: dict[str, Tensor], targets: dict[str, Tensor], batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``inner_steps`` Adam steps of the Stage I objective; returns the last fit loss and the
        online networks' RMSE against the in-batch targets before the fit (read off the first forward)."""
        # the inputs come from the loss module, which validated the features: no value checks
        # (and no host synchronisation) here; a non-finite step is the divergence guard's to handle
        params = self._params
        loss = rmse = torch.zeros(())
        self.online.requires_grad_(True)
        try:
            with torch.enable_grad(), torch.autocast(device_type=u["image"].device.type, enabled=False):
                for i in range(self.inner_steps):
                    pred = self._predict(self.online, u)
                    if i == 0:
                        rmse = _rmse(pred, batch)
                    loss = sum(amortization_loss(pred[m], targets[m], self.objective, self.log_l2_weight,
                                                 checks="off") for m in MODALITIES)
                    grads = torch.autograd.grad(loss, params)
                    for p, g in zip(params, grads):
                        p.grad = g
                    if self.clip_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, self.clip_norm, foreach=True)
                    self._optimizer.step()
                    for p in params:
                        p.grad = None
        finally:
            self.online.requires_grad_(False)
        return loss.detach(), rmse

    @torch.no_grad()
    def _ema_update(self, decay: float) -> None:
        for pt, po in zip(self.target.parameters(), self.online.parameters()):
            pt.lerp_(po, 1.0 - decay)

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        log_z_x: Tensor,
        log_z_y: Tensor,
        index: Optional[Tensor] = None,
    ) -> PartitionEstimate:
        """Fit (in training mode) and return the normalisers; see the class docstring for the order.

        Terms: ``amortizer_fit`` (the last inner step's Stage I loss) and ``amortizer_rmse`` (the
        online networks' RMSE against the in-batch log sums, before this step's fit) on the steps
        that fit; ``target_rmse`` (the EMA networks' RMSE) when the encoders are normalised by them.
        """
        K.feature_dim(("x", "y"), (x, y), self.dim, type(self).__name__)
        epoch, max_epochs, step, epoch_step, has_previous = self._counters()
        if epoch < 0:
            self.start_epoch(0, max_epochs)
            epoch, max_epochs, step, epoch_step, has_previous = self._counters()
        if self.cadence == "per_epoch":
            fit_now, ema_now = epoch_step % self.update_every == 0, epoch_step % self.ema_every == 0
        else:
            fit_now, ema_now = step % self.update_every == 0, (step + 1) % self.ema_every == 0
        u = {"image": x.detach().float(), "text": y.detach().float()}
        batch = {"image": log_z_x.detach().float(), "text": log_z_y.detach().float()}
        with torch.no_grad():
            if has_previous and self.normalizer != "ema_ramp":
                beta = self.beta_schedule(epoch, max_epochs)
                prev = self._predict(self.previous, u)
                comb = {m: blend_log_targets(prev[m], batch[m], beta) for m in MODALITIES}
            else:
                comb = batch
        terms: dict[str, Tensor] = {}
        if self.training and fit_now:
            terms["amortizer_fit"], terms["amortizer_rmse"] = self._fit(u, comb, batch)
        if self.normalizer == "previous_blend":
            norm = comb  # the EMA networks are not read this step (they become `previous` next epoch)
        else:
            with torch.no_grad():
                norm = self._predict(self.target, u)
                terms["target_rmse"] = _rmse(norm, batch)
        if self.training:
            self.step.add_(1)
            self.epoch_step.add_(1)
            self._host[2] += 1
            self._host[3] += 1
            if ema_now:
                self._ema_update(self.ema_decay_at(epoch, max_epochs))
        return PartitionEstimate(norm["image"].to(log_z_x.dtype), norm["text"].to(log_z_y.dtype), terms)


def _rmse(pred: dict[str, Tensor], target: dict[str, Tensor]) -> Tensor:
    """RMSE over both modalities of log predictions against log targets (detached)."""
    return torch.sqrt(0.5 * sum((pred[m].detach() - target[m]).square().mean() for m in MODALITIES))
