"""Per-sample estimators: a table of log normalisers ``u_i`` indexed by dataset index, one per
sample and modality, each step mixing the batch's estimate into the rows it saw.

* :class:`MovingAverageEstimator` (SogCLR, FastCLIP): a constant or epoch-scheduled weight gamma.
* :class:`ScentEstimator` (SCENT): a weight that depends on the state, ``gamma_i = sigmoid(alpha + m u_i)``.

Both share :class:`PerSampleEstimator`, which holds the tables and the steps around the update;
a subclass writes only the update (:meth:`PerSampleEstimator.update`).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from amortize import kernels
from amortize.estimators.base import PartitionEstimate, PartitionEstimator
from amortize.registry import Part
from amortize.schedules import SCHEDULES, Schedule, build_schedule

SCHEDULE = Part(SCHEDULES)
"""A schedule option (``gamma``, ``alpha``): a section of :data:`amortize.schedules.SCHEDULES`,
bound with the estimator's section under its key (a number: constant)."""

__all__ = ["PerSampleEstimator", "MovingAverageEstimator", "ScentEstimator", "moving_average_update",
           "scent_update", "SCENT_REFERENCES"]


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


def scent_update(log_u: Tensor, log_z: Tensor, alpha: float, alpha_multiplier: float = 1.0,
                 reference: Union[Tensor, float] = 0.0) -> Tensor:
    """One SCENT step in log space: ``u <- (1 - gamma) u + gamma z`` with ``gamma = sigmoid(a)``,
    ``a = alpha + m (log u - r)``.

    In SCENT's own frame (``r = 0``, ``m = 1``) this is its closed form
    ``u <- u + log(1 + e^alpha g) - log(1 + e^alpha e^u)`` (``g = e^{log z}``, ``u`` in log space):
    the fixed point is ``g = e^u``, the weight lies in (0, 1), ``alpha -> inf`` gives the batch
    estimate, and a sample whose ``u`` lies far below ``-alpha`` moves slowly. The weight depends on
    the scale of ``u``; ``reference`` moves the state into the frame the weight is read in (a shift
    of ``u`` and ``z`` alike, so the mixture itself is unchanged by it).

    Args:
        log_u: (B,) current log estimates; ``-inf`` marks a sample never seen (it takes ``log_z``).
        log_z: (B,) log of the batch's estimates.
        alpha: the weight's offset (SCENT's DFN-14M recipe and LibAUC: 10); ``inf``: the batch estimate.
        alpha_multiplier: ``m``, the slope of the weight in ``u`` (LibAUC: 1), >= 0.
        reference: (B,) or a number: the log reference point ``r`` of the frame the weight is read in.

    Returns:
        (B,) updated log estimates.
    """
    if math.isnan(alpha) or alpha == -math.inf:
        raise ValueError(f"alpha must be a number or +inf, got {alpha}")
    if not 0.0 <= alpha_multiplier < math.inf:
        raise ValueError(f"alpha_multiplier must be finite and >= 0, got {alpha_multiplier}")
    if alpha == math.inf:
        return log_z.clone()
    a = alpha + alpha_multiplier * (log_u - reference)
    mixed = torch.logaddexp(log_u + F.logsigmoid(-a), log_z + F.logsigmoid(a))
    return torch.where(torch.isneginf(log_u), log_z, mixed)


class PerSampleEstimator(PartitionEstimator):
    """A table of per-sample log normalisers updated at the batch's dataset indices (a template).

    Each training step updates the table at the batch's indices with the in-batch estimates and
    returns the updated values as the normalisers; evaluation reads the table and never writes it
    (an unseen sample falls back to the batch's estimate). Subclasses write :meth:`update` only.

    State: buffers ``log_u_x``, ``log_u_y`` of shape (num_samples,) (``-inf`` = not seen yet),
    ``epoch`` and ``max_epochs``. Memory is ``8 * num_samples`` bytes; all processes hold the whole
    table and, under exact distributed modes, apply the same global updates.

    Args:
        num_samples: dataset size (indices must lie in ``[0, num_samples)``).
    """

    needs_index = True

    def __init__(self, num_samples: int):
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)
        self.add_state("log_u_x", torch.full((num_samples,), -math.inf))
        self.add_state("log_u_y", torch.full((num_samples,), -math.inf))
        self.add_state("epoch", torch.zeros((), dtype=torch.long))
        self.add_state("max_epochs", torch.ones((), dtype=torch.long))

    def start_epoch(self, epoch: int, max_epochs: int) -> None:
        """Record the epoch so that a scheduled weight follows it."""
        self.epoch.fill_(epoch)
        self.max_epochs.fill_(max(1, max_epochs))

    def schedule_value(self, schedule: Schedule) -> float:
        """The value of an epoch schedule at the current epoch."""
        return schedule(int(self.epoch), int(self.max_epochs))

    def reference(self, x: Tensor, y: Tensor, inputs: dict[str, Any]) -> Optional[Tensor]:
        """(B,) the log reference point of the frame :meth:`update` reads the state in, or None."""
        return None

    def update(self, log_u: Tensor, log_z: Tensor, reference: Optional[Tensor]) -> Tensor:
        """(B,) the new log estimates of the rows seen, from the old ones and the batch's."""
        raise NotImplementedError

    def forward(self, x: Tensor, y: Tensor, log_z_x: Tensor, log_z_y: Tensor, index: Optional[Tensor] = None,
                **inputs: Any) -> PartitionEstimate:
        """Update (in training mode) and return the table's values for the batch's samples."""
        idx = self._check_index(index, x.shape[0], self.num_samples).to(self.log_u_x.device)
        lzx = log_z_x.detach().to(self.log_u_x.dtype)
        lzy = log_z_y.detach().to(self.log_u_y.dtype)
        if self.training:
            ref = self.reference(x, y, inputs)
            ref = None if ref is None else ref.to(self.log_u_x.dtype)
            new_x = self.update(self.log_u_x[idx], lzx, ref)
            new_y = self.update(self.log_u_y[idx], lzy, ref)
            self.log_u_x[idx] = new_x
            self.log_u_y[idx] = new_y
        else:
            ux, uy = self.log_u_x[idx], self.log_u_y[idx]
            new_x = torch.where(torch.isneginf(ux), lzx, ux)
            new_y = torch.where(torch.isneginf(uy), lzy, uy)
        terms = {"estimator_log_error": 0.5 * ((new_x - lzx).square().mean() + (new_y - lzy).square().mean())}
        return PartitionEstimate(new_x.to(log_z_x.dtype), new_y.to(log_z_y.dtype), terms)


class MovingAverageEstimator(PerSampleEstimator):
    """SogCLR / FastCLIP: per-sample moving averages ``u_i`` of the partition sums with a weight gamma.

    With ``gamma = 1`` it is the in-batch estimator. FastCLIP (v3) uses a cosine-decayed gamma
    (``{"name": "cosine_decay", "start": 1.0, "end": 0.2, "decay_epochs": ...}``).

    Args:
        num_samples: dataset size (indices must lie in ``[0, num_samples)``).
        gamma: a float or a schedule (see :func:`amortize.schedules.build_schedule`) over epochs.
        init: how an unseen sample starts: ``"first_batch"`` or ``"zero"`` (see
            :func:`moving_average_update`).
    """

    def __init__(
        self,
        num_samples: int,
        gamma: Annotated[Union[float, dict, Schedule], SCHEDULE] = 0.9,
        init: Literal["first_batch", "zero"] = "first_batch",
    ):
        super().__init__(num_samples)
        if init not in ("first_batch", "zero"):
            raise ValueError(f"unknown init {init!r}; valid: first_batch, zero")
        self.gamma_schedule = build_schedule(SCHEDULE.take(gamma, "gamma"))
        self.init = init

    @property
    def gamma(self) -> float:
        """The moving-average weight of the current epoch."""
        return self.schedule_value(self.gamma_schedule)

    def update(self, log_u: Tensor, log_z: Tensor, reference: Optional[Tensor]) -> Tensor:
        """:func:`moving_average_update` with the epoch's gamma."""
        return moving_average_update(log_u, log_z, self.gamma, self.init)


SCENT_REFERENCES = ("positive", "none")
"""The frames SCENT's weight reads the state in (:class:`ScentEstimator`'s ``reference``)."""


class ScentEstimator(PerSampleEstimator):
    """SCENT (Wei, Zhou, Wang, Lin, Yang, ICML 2026, arXiv 2602.02877): FastCLIP's per-sample
    log-normalisers with a state-dependent weight ``gamma_i = sigmoid(alpha + m u_i)``
    (:func:`scent_update`).

    A sample seen for the first time takes the batch's estimate. The weight depends on the scale
    of ``u``: the authors' CLIP code keeps ``u`` relative to the positive's score and per negative,
    ``u = log mean_{j != i} exp(S_ij - S_ii)``, whereas this toolkit's tables hold the log partition
    sums themselves. ``reference="positive"`` (the default) reads the weight in the authors' frame,
    ``r_i = S_ii + log(num_negatives)``; ``"none"`` reads it on the table's own scale (``r = 0``).
    ``docs/differences.md`` says more.

    Args:
        num_samples: dataset size (indices must lie in ``[0, num_samples)``).
        alpha: the weight's offset, a float or an epoch schedule (SCENT's DFN-14M recipe: 10,
            constant); ``inf`` gives the in-batch estimate.
        alpha_multiplier: ``m``, the weight's slope in ``u`` (LibAUC's default 1), >= 0.
        reference: ``"positive"`` or ``"none"`` (:data:`SCENT_REFERENCES`).
    """

    def __init__(self, num_samples: int, alpha: Annotated[Union[float, dict, Schedule], SCHEDULE] = 10.0, alpha_multiplier: float = 1.0,
                 reference: Literal["positive", "none"] = "positive"):
        super().__init__(num_samples)
        if reference not in SCENT_REFERENCES:
            raise ValueError(f"unknown reference {reference!r}; valid: {', '.join(SCENT_REFERENCES)}")
        if not 0.0 <= alpha_multiplier < math.inf:
            raise ValueError(f"alpha_multiplier must be finite and >= 0, got {alpha_multiplier}")
        self.alpha_schedule = build_schedule(SCHEDULE.take(alpha, "alpha"))
        self.alpha_multiplier = float(alpha_multiplier)
        self.reference_frame = reference
        positive = reference == "positive"
        self.reads_features = positive  # the positive's score is read off the features
        self.extra_inputs = ("scale", "bias", "num_negatives") if positive else ()

    @property
    def alpha(self) -> float:
        """The weight's offset at the current epoch."""
        return self.schedule_value(self.alpha_schedule)

    def reference(self, x: Tensor, y: Tensor, inputs: dict[str, Any]) -> Optional[Tensor]:
        """``S_ii + log(num_negatives)`` for ``reference="positive"``, else None."""
        if self.reference_frame == "none":
            return None
        missing = [k for k in ("scale", "num_negatives") if k not in inputs]
        if missing:
            raise ValueError(f"scent with reference='positive' reads {', '.join(missing)}: call it with them "
                             f"(ContrastiveLoss passes them)")
        n = float(inputs["num_negatives"])
        if not n > 0:
            raise ValueError(f"scent with reference='positive' needs num_negatives > 0 (a batch of >= 2), got {n}")
        return kernels.positive_scores(x, y, inputs["scale"], inputs.get("bias")) + math.log(n)

    def update(self, log_u: Tensor, log_z: Tensor, reference: Optional[Tensor]) -> Tensor:
        """:func:`scent_update` with the epoch's alpha, in the reference frame."""
        return scent_update(log_u, log_z, self.alpha, self.alpha_multiplier, 0.0 if reference is None else reference)
