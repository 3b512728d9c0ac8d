"""Loss modules: an objective joined with a partition-function estimator, returning named terms.

>>> import torch
>>> from amortize.losses import ContrastiveLoss
>>> from amortize.estimators import AmortizedEstimator
>>> loss_fn = ContrastiveLoss("amortized", estimator=AmortizedEstimator(dim=8))
>>> x = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
>>> y = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
>>> out = loss_fn(x, y, logit_scale=torch.tensor(10.0))
>>> sorted(out)[:3]
['amortizer_fit', 'amortizer_rmse', 'image']

Like open_clip's losses, ``forward`` takes ``(image_features, text_features, logit_scale)`` with
``logit_scale`` already exponentiated, and returns a dict whose ``"loss"`` entry is what to
backpropagate; the other entries are detached terms for logging.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from amortize import functional as F
from amortize.estimators.base import PartitionEstimator
from amortize.estimators.in_batch import InBatchEstimator
from amortize.schedules import Schedule, build_schedule

__all__ = ["ContrastiveLoss", "OBJECTIVES", "DISTRIBUTED_MODES"]

OBJECTIVES = ("infonce", "sigmoid", "amortized")
"""Encoder objectives: ``infonce`` (CLIP), ``sigmoid`` (SigLIP), ``amortized`` (the linearised
spectral-EBM objective with an estimator: in-batch = CLIP's gradient, moving average = SogCLR /
FastCLIP, amortized = AmorLIP)."""

DISTRIBUTED_MODES = ("gather", "ring", "local")
"""How negatives travel between processes (see :mod:`amortize.distributed`)."""


class ContrastiveLoss(nn.Module):
    """A contrastive objective with its partition-function estimator.

    Args:
        objective: one of :data:`OBJECTIVES`.
        estimator: a :class:`~amortize.estimators.PartitionEstimator` for the ``amortized``
            objective (default: in-batch); must be None for ``infonce`` and ``sigmoid``.
        pos_weight: ``c``, weight of the positive inside partition sums (AmorLIP: 1e-3).
        rho: temperature-rescaling schedule over epochs (FastCLIP / AmorLIP), a float, a schedule
            dict such as ``{"kind": "piecewise", "values": [6.5, 6.5, 6.5, -8.0]}``, or None.
        chunk_size: None for dense objectives, or rows per chunk for the exact chunked ones.
        distributed: how negatives travel between processes when ``torch.distributed`` is
            initialised with several processes: one of :data:`DISTRIBUTED_MODES`.

    Buffers ``epoch`` and ``max_epochs`` follow :meth:`start_epoch`, so the rho schedule resumes.
    """

    def __init__(
        self,
        objective: str = "amortized",
        estimator: Optional[PartitionEstimator] = None,
        pos_weight: float = 1.0,
        rho: Union[None, float, dict, Schedule] = None,
        chunk_size: Optional[int] = None,
        distributed: str = "gather",
    ):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
        if distributed not in DISTRIBUTED_MODES:
            raise ValueError(f"unknown distributed mode {distributed!r}; valid: {', '.join(DISTRIBUTED_MODES)}")
        if objective != "amortized" and estimator is not None:
            raise ValueError(f"objective {objective!r} computes its own partition function; do not pass an estimator")
        if objective == "infonce" and distributed == "local":
            raise ValueError("the infonce objective has no local mode (its normaliser is not a sum of pair terms); "
                             "use distributed='gather' or 'ring'")
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
        self.objective = objective
        self.estimator = estimator if estimator is not None or objective != "amortized" else InBatchEstimator()
        self.pos_weight = float(pos_weight)
        self.rho_schedule = build_schedule(rho)
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.distributed = distributed
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))
        self.register_buffer("max_epochs", torch.ones((), dtype=torch.long))

    @property
    def needs_index(self) -> bool:
        """Whether ``forward`` needs the dataset indices of the batch."""
        return bool(self.estimator is not None and self.estimator.needs_index)

    @property
    def rho(self) -> Optional[float]:
        """The temperature-rescaling constant of the current epoch (None without rescaling)."""
        if self.rho_schedule is None:
            return None
        return self.rho_schedule(int(self.epoch), int(self.max_epochs))

    def start_epoch(self, epoch: int, max_epochs: int) -> None:
        """Advance per-epoch schedules (rho here, the estimator's own) to ``epoch`` (0-based)."""
        self.epoch.fill_(epoch)
        self.max_epochs.fill_(max(1, max_epochs))
        if self.estimator is not None:
            self.estimator.start_epoch(epoch, max_epochs)

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Optional[Tensor] = None,
        index: Optional[Tensor] = None,
    ) -> dict[str, Tensor]:
        """Compute the loss and its named terms.

        Args:
            image_features: (B, d) L2-normalised image features.
            text_features: (B, d) L2-normalised text features.
            logit_scale: 0-d inverse temperature ``s`` (already exponentiated).
            logit_bias: 0-d logit bias (SigLIP), or None.
            index: (B,) dataset indices, required by per-sample estimators.

        Returns:
            ``{"loss": ..., "logit_scale": ..., ...}``: ``loss`` carries gradients, the rest are
            detached terms (``image``/``text`` sides, ``positive``, estimator diagnostics, ``rho``).
        """
        from amortize import distributed as D

        if D.world_size() > 1:
            return D.distributed_loss(self, image_features, text_features, logit_scale, logit_bias, index)
        return self._local_forward(image_features, text_features, logit_scale, logit_bias, index)

    def _local_forward(
        self,
        x: Tensor,
        y: Tensor,
        logit_scale: Tensor,
        logit_bias: Optional[Tensor],
        index: Optional[Tensor],
    ) -> dict[str, Tensor]:
        bias = 0.0 if logit_bias is None else logit_bias
        terms: dict[str, Tensor]
        if self.objective == "infonce":
            loss = F.infonce_loss(x, y, logit_scale, chunk_size=self.chunk_size)
            terms = {}
        elif self.objective == "sigmoid":
            if logit_bias is None:
                raise ValueError("the sigmoid objective needs logit_bias")
            loss = F.sigmoid_loss(x, y, logit_scale, logit_bias, chunk_size=self.chunk_size)
            terms = {"logit_bias": logit_bias.detach()}
        else:
            # the partition targets and the objective share one pass over the scores (dense: the
            # scores are kept for the backward; chunked: recomputed), see amortize.distributed
            from amortize.distributed import amortized_forward

            loss, terms = amortized_forward(self, x, y, logit_scale, bias, index)
        return self._finish(loss, logit_scale, terms)

    def _finish(self, loss: Tensor, logit_scale: Tensor, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        rho = self.rho
        if rho is not None:
            loss = F.rescale_temperature(loss, logit_scale, rho)
            terms["rho"] = torch.tensor(rho, device=logit_scale.device)
        terms["logit_scale"] = logit_scale.detach()
        terms["loss"] = loss
        return terms

