"""SigLIP's pairwise sigmoid loss."""

from __future__ import annotations

import math
from typing import ClassVar, Optional

from torch import Tensor

from amortize import kernels
from amortize.objectives.base import Objective, Pairs, Partition

__all__ = ["Sigmoid"]


class Sigmoid(Objective):
    """``-sum_ij log sigmoid(z_ij S_ij) / B`` with ``z_ii = 1``, ``z_ij = -1`` (SigLIP).

    Equal to open_clip's ``SigLipLoss`` on one process. Needs a logit bias (models trained with it
    start at ``s = 10``, ``b = -10``). In the ``local`` layout each negative is weighted by
    ``k = (N - 1) / (B - 1)``, an unbiased estimate of the global sum. Term: ``pairwise``.

    Class attributes:
        init_logit_scale: the initial ``log s`` it prefers (``log 10``), which a recipe's ``model``
            takes where it leaves it unset (the towers' own is CLIP's).
        init_logit_bias: the initial bias it prefers (-10), taken likewise (the towers have none).
    """

    name: ClassVar[str] = "sigmoid"
    needs_bias: ClassVar[bool] = True
    init_logit_scale: ClassVar[float] = math.log(10.0)
    init_logit_bias: ClassVar[Optional[float]] = -10.0

    def terms(self, pairs: Pairs, part: Optional[Partition], log_norm_x: Optional[Tensor] = None,
              log_norm_y: Optional[Tensor] = None) -> dict[str, Tensor]:
        """``pairwise``: this process's rows against every column block."""
        if log_norm_x is not None or log_norm_y is not None:
            raise ValueError("the sigmoid objective has no normalisers; do not pass log_norm_*")
        assert pairs.bias is not None
        total = None
        for blk in pairs.blocks:
            part_sum = kernels.sigmoid_pair_sum(pairs.x, blk.features, pairs.scale, pairs.bias, blk.offset,
                                                pairs.chunk_size, neg_weight=pairs.negative_weight)
            total = part_sum if total is None else total + part_sum
        return {"pairwise": total / pairs.rows}
