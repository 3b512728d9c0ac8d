"""CLIP's symmetric InfoNCE: the mean of the image-to-text and text-to-image cross-entropies."""

from __future__ import annotations

from typing import ClassVar, Optional

from torch import Tensor

from amortize import checks as K
from amortize import kernels
from amortize.objectives.base import Objective, Pairs, Partition

__all__ = ["InfoNCE", "DCL"]


class InfoNCE(Objective):
    """Symmetric InfoNCE (CLIP); equal to open_clip's ``ClipLoss`` on one process.

    A subclass may change :attr:`pos_weight`, the positive's weight in its own normaliser (:class:`DCL`).

    Terms: ``image = 0.5 * mean_i (lse_j S_ij - S_ii)`` and ``text = 0.5 * mean_j (lse_i S_ij - S_jj)``.
    The logsumexps are the partition sums with ``c = 1`` (computed once, without gradient); the
    gradient is that of the cross-entropies, obtained from :func:`~amortize.kernels.exp_sums` with
    the logsumexps as constants. Not available in the ``local`` layout (its normaliser is not a sum
    of pair terms).
    """

    name: ClassVar[str] = "infonce"
    needs_partition: ClassVar[bool] = True
    uses_bias: ClassVar[bool] = False
    needs: ClassVar[str] = "exact"
    #: ``c``, the positive's weight inside the logsumexps (1: the cross-entropy; 0: :class:`DCL`)
    pos_weight: ClassVar[float] = 1.0

    def partition_weight(self) -> float:
        """``c``: 1 for InfoNCE."""
        return self.pos_weight

    def terms(self, pairs: Pairs, part: Optional[Partition], log_norm_x: Optional[Tensor] = None,
              log_norm_y: Optional[Tensor] = None) -> dict[str, Tensor]:
        """``image`` and ``text`` cross-entropy halves of this process's rows."""
        if log_norm_x is not None or log_norm_y is not None:
            raise ValueError("the infonce objective computes its own normalisers; do not pass log_norm_*")
        assert part is not None
        R, off = pairs.rows, pairs.row_offset
        log_c = K.log_weight(part.pos_weight)
        row_sum = col_sum = None
        for blk, st in zip(pairs.blocks, part.stats):
            rows, cols = kernels.exp_sums(pairs.x, blk.features, pairs.scale, 0.0, part.row_lse,
                                          part.log_z_y[blk.slot], log_c, 0.0, blk.offset, pairs.chunk_size, st)
            row_sum = rows.sum() if row_sum is None else row_sum + rows.sum()
            col_sum = cols.sum() if col_sum is None else col_sum + cols.sum()
        half_pos = 0.25 * kernels.positive_term(pairs.x, pairs.y, pairs.scale)
        # value: the logsumexps; gradient: the exp sums (whose value at these constants is R)
        image = 0.5 * (part.row_lse.sum() + (row_sum - row_sum.detach())) / R + half_pos
        text = 0.5 * (part.log_z_y[off : off + R].sum() + (col_sum - col_sum.detach())) / R + half_pos
        return {"image": image, "text": text}


class DCL(InfoNCE):
    """Decoupled contrastive learning (Yeh, Hong, Hsu, Liu, Chen, LeCun; ECCV 2022, arXiv 2110.06848):
    InfoNCE with the positive left out of its own denominator.

    Terms: ``image = 0.5 * mean_i (log sum_{j != i} exp(S_ij) - S_ii)`` and ``text`` likewise over
    columns. Its gradient equals that of the ``linearized`` objective with ``pos_weight: 0`` and the
    in-batch estimator; unlike InfoNCE it keeps pulling a pair that is already well separated, since
    the positive no longer cancels its own share of the normaliser. At small batches this exclusion
    carries part of the gain of the per-sample and amortized estimators, which all set ``c`` near 0
    (``docs/benchmarks.md#small-batch-transfer-suite``).
    """

    name: ClassVar[str] = "dcl"
    pos_weight: ClassVar[float] = 0.0
