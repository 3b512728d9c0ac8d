"""The linearised spectral-EBM objective: InfoNCE's gradient with any estimate of the partition sums."""

from __future__ import annotations

from typing import ClassVar, Optional

from torch import Tensor

from amortize import checks as K
from amortize import kernels
from amortize.objectives.base import Objective, Pairs, Partition

__all__ = ["Linearized"]


class Linearized(Objective):
    """``L = -2 s mean_i <x_i, y_i> + mean_i sum_j w_ij exp(S_ij) / lambda_x(i) + mean_j sum_i w_ij exp(S_ij) / lambda_y(j)``.

    Spec section 2: ``w_ii = pos_weight`` (``c``), ``w_ij = 1`` otherwise (``k`` in the ``local``
    layout), and ``lambda`` any estimate of the partition sums, treated as a constant. With the exact
    in-batch sums its gradient equals that of the two InfoNCE cross-entropies summed (with the
    positive weighted by ``c`` in the denominators); with an amortizer network's it is AmorLIP's
    objective, with per-sample moving averages SogCLR's / FastCLIP's. Given ``lambda`` the loss is a
    sum of pair terms, so it is exact in chunks and unbiased in the ``local`` layout.

    Terms: ``positive``, ``image`` (image-to-text negatives), ``text`` (text-to-image negatives).

    Args:
        pos_weight: ``c``, the positive's weight inside the partition sums (AmorLIP: 1e-3).
    """

    name: ClassVar[str] = "linearized"
    needs_partition: ClassVar[bool] = True
    accepts_normalizers: ClassVar[bool] = True

    def __init__(self, pos_weight: float = 1.0):
        super().__init__()
        K.pos_weight(pos_weight, 2)
        self.pos_weight = float(pos_weight)

    def partition_weight(self) -> float:
        """``c``."""
        return self.pos_weight

    def extra_repr(self) -> str:
        """Show ``c``."""
        return f"pos_weight={self.pos_weight}"

    def terms(self, pairs: Pairs, part: Optional[Partition], log_norm_x: Optional[Tensor] = None,
              log_norm_y: Optional[Tensor] = None) -> dict[str, Tensor]:
        """``positive``, ``image`` and ``text`` of this process's rows; normalisers default to ``part``'s."""
        assert part is not None
        R = pairs.rows
        if log_norm_x is None and log_norm_y is None:
            off = pairs.row_offset
            log_norm_x, log_norm_y = part.log_z_x[off : off + R], part.log_z_y
        elif log_norm_x is None or log_norm_y is None:
            raise ValueError("pass both log_norm_x and log_norm_y, or neither (in-batch)")
        K.vector("log_norm_x", log_norm_x, R, pairs.checks)
        K.vector("log_norm_y", log_norm_y, pairs.num_columns, pairs.checks)
        lnx = log_norm_x.detach().to(pairs.x.dtype)
        lny = log_norm_y.detach().to(pairs.x.dtype)
        log_c, log_neg = K.log_weight(part.pos_weight), K.log_weight(pairs.negative_weight)
        image = text = None
        for blk, st in zip(pairs.blocks, part.stats):
            rows, cols = kernels.exp_sums(pairs.x, blk.features, pairs.scale, pairs.bias_value, lnx, lny[blk.slot],
                                          log_c, log_neg, blk.offset, pairs.chunk_size, st)
            image = rows.sum() if image is None else image + rows.sum()
            text = cols.sum() if text is None else text + cols.sum()
        return {"positive": kernels.positive_term(pairs.x, pairs.y, pairs.scale), "image": image / R, "text": text / R}
