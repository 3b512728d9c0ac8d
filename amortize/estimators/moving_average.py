"""SogCLR / FastCLIP: a per-sample moving average of the partition sum, indexed by dataset index."""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

import torch
from torch import Tensor

from amortize.estimators.base import PartitionEstimate, PartitionEstimator
from amortize.schedules import Schedule, build_schedule

__all__ = ["MovingAverageEstimator", "moving_average_update"]


def moving_average_update(log_u: Tensor, log_z: Tensor, gamma: float, init: str = "first_batch") -> Tensor:
    """One moving-average step in log space: ``u <- (1 - gamma) u + gamma z``.

    Args:
        log_u: (B,) current log estimates; ``-inf`` marks a sample never seen.
        log_z: (B,) log of the new batch estimates.
        gamma: the weight of the new estimate, in (0, 1].
        init: ``"first_batch"``: an unseen sample takes ``z`` (FastCLIP); ``"zero"``: it starts
            from ``u = 0`` (SogCLR's original), i.e. ``gamma * z``.

    Returns:
        (B,) updated log estimates.
    """
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if gamma == 1.0:
        return log_z.clone()
    mixed = torch.logaddexp(log_u + math.log1p(-gamma), log_z + math.log(gamma))
    if init == "first_batch":
        return torch.where(torch.isneginf(log_u), log_z, mixed)
    if init == "zero":
        return mixed
    raise ValueError(f"unknown init {init!r}; valid: first_batch, zero")


class MovingAverageEstimator(PartitionEstimator):
    """Per-sample moving averages ``u_i`` of the partition sums, one per dataset sample and modality.

    Each step updates ``u`` at the batch's dataset indices with the in-batch estimate, then
    returns the updated values as the normalisers (SogCLR). With ``gamma = 1`` it is the in-batch
    estimator. FastCLIP (v3) uses a cosine-decayed gamma (``{"kind": "cosine_decay", "start": 1.0,
    "end": 0.2, "decay_epochs": ...}``).

    State: buffers ``log_u_x``, ``log_u_y`` of shape (num_samples,) (``-inf`` = not seen yet) and
    ``epoch``. Memory is ``8 * num_samples`` bytes; all processes hold the whole table and, under
    exact distributed modes, apply the same global updates.

    Args:
        num_samples: dataset size (indices must lie in ``[0, num_samples)``).
        gamma: a float or a schedule (see :func:`amortize.schedules.build_schedule`) over epochs.
        init: how an unseen sample starts: ``"first_batch"`` or ``"zero"`` (see
            :func:`moving_average_update`).
    """

    needs_index = True

    def __init__(
        self,
        num_samples: int,
        gamma: Union[float, dict, Schedule] = 0.9,
        init: Literal["first_batch", "zero"] = "first_batch",
    ):
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if init not in ("first_batch", "zero"):
            raise ValueError(f"unknown init {init!r}; valid: first_batch, zero")
        self.num_samples = int(num_samples)
        self.gamma_schedule = build_schedule(gamma)
        self.init = init
        self.add_state("log_u_x", torch.full((num_samples,), -math.inf))
        self.add_state("log_u_y", torch.full((num_samples,), -math.inf))
        self.add_state("epoch", torch.zeros((), dtype=torch.long))
        self.add_state("max_epochs", torch.ones((), dtype=torch.long))

    @property
    def gamma(self) -> float:
        """The moving-average weight of the current epoch."""
        return self.gamma_schedule(int(self.epoch), int(self.max_epochs))

    def start_epoch(self, epoch: int, max_epochs: int) -> None:
        """Record the epoch so that a scheduled gamma follows it."""
        self.epoch.fill_(epoch)
        self.max_epochs.fill_(max(1, max_epochs))

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        log_z_x: Tensor,
        log_z_y: Tensor,
        index: Optional[Tensor] = None,
    ) -> PartitionEstimate:
        """Update (in training mode) and return the moving averages of the batch's samples."""
        idx = self._check_index(index, x.shape[0], self.num_samples).to(self.log_u_x.device)
        lzx = log_z_x.detach().to(self.log_u_x.dtype)
        lzy = log_z_y.detach().to(self.log_u_y.dtype)
        if self.training:
            gamma = self.gamma
            new_x = moving_average_update(self.log_u_x[idx], lzx, gamma, self.init)
            new_y = moving_average_update(self.log_u_y[idx], lzy, gamma, self.init)
            self.log_u_x[idx] = new_x
            self.log_u_y[idx] = new_y
        else:
            # evaluation never writes state; unseen samples fall back to the batch estimate
            ux, uy = self.log_u_x[idx], self.log_u_y[idx]
            new_x = torch.where(torch.isneginf(ux), lzx, ux)
            new_y = torch.where(torch.isneginf(uy), lzy, uy)
        terms = {"estimator_log_error": 0.5 * ((new_x - lzx).square().mean() + (new_y - lzy).square().mean())}
        return PartitionEstimate(new_x.to(log_z_x.dtype), new_y.to(log_z_y.dtype), terms)
