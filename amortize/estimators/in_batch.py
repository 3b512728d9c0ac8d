"""CLIP's estimator: the in-batch partition sums themselves."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from amortize.estimators.base import PartitionEstimate, PartitionEstimator

__all__ = ["InBatchEstimator"]


class InBatchEstimator(PartitionEstimator):
    """Returns the in-batch log partition sums unchanged (stateless).

    Under the linearized objective with ``pos_weight=1`` this gives exactly the gradient of the
    sum of the two InfoNCE cross-entropies, i.e. CLIP.
    """

    reads_features = False

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        log_z_x: Tensor,
        log_z_y: Tensor,
        index: Optional[Tensor] = None,
    ) -> PartitionEstimate:
        """Return ``log_z_x, log_z_y`` as the normalisers (see :class:`PartitionEstimator`)."""
        return PartitionEstimate(log_z_x.detach(), log_z_y.detach())
