"""A partition-function estimator: a running mean of the batch's partition sums, shared by all samples.

SogCLR keeps one moving average per dataset sample and modality; this keeps a single number,
``u <- (1 - gamma) u + gamma * mean_i Z_i`` (in log space), the mean taken over the global batch.
One number serves both modalities: the row sums and the column sums add up the same weighted
scores, ``sum_i Z(x_i) = sum_ij w_ij exp(S_ij) = sum_j Z(y_j)``, so their means are equal.
It needs no dataset indices and no features.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from amortize.estimators import PartitionEstimate, PartitionEstimator, register_estimator


def log_mean_exp(t: Tensor) -> Tensor:
    """``log mean exp(t)`` of a (B,) vector: the log of the mean partition sum."""
    return torch.logsumexp(t, dim=0) - math.log(t.shape[0])


class RunningMeanEstimator(PartitionEstimator):
    """Normalises every row and column by a running mean of the in-batch partition sums.

    State: the buffer ``log_u`` (0-d; ``-inf`` until the first batch). Training mode updates it;
    eval mode only reads it (an estimator that never trained uses the batch's mean).

    Args:
        gamma: weight of the new batch's mean, in (0, 1] (1: the batch mean alone).
    """

    reads_features = False      # only the partition sums: no feature gathering across processes

    def __init__(self, gamma: float = 0.5):
        super().__init__()
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        self.gamma = float(gamma)
        self.register_buffer("log_u", torch.tensor(-math.inf))

    def forward(self, x, y, log_z_x, log_z_y, index=None) -> PartitionEstimate:
        """Update the running mean (training mode only) and return it for every row and column."""
        batch = log_mean_exp(log_z_x.detach().to(self.log_u.dtype))
        if torch.isneginf(self.log_u):                 # nothing seen yet: the batch's mean
            log_u = batch
        elif self.training:
            log_u = torch.logaddexp(self.log_u + math.log1p(-self.gamma), batch + math.log(self.gamma))
        else:
            log_u = self.log_u
        if self.training:
            self.log_u.copy_(log_u)
        return PartitionEstimate(
            log_norm_x=log_u.expand(log_z_x.shape[0]).to(log_z_x.dtype),
            log_norm_y=log_u.expand(log_z_y.shape[0]).to(log_z_y.dtype),
            terms={"running_log_z": log_u.detach().clone()},
        )


register_estimator("running_mean", RunningMeanEstimator)
