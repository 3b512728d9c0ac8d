"""The interface every partition-function estimator implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor, nn

from amortize import checks as K

__all__ = ["PartitionEstimate", "PartitionEstimator"]


@dataclass
class PartitionEstimate:
    """What an estimator returns for a batch.

    Attributes:
        log_norm_x: (B,) detached log normaliser of each image row, used by the encoder objective.
        log_norm_y: (B,) detached log normaliser of each text column.
        terms: named 0-d diagnostics (e.g. ``amortizer_fit``), detached, for logging.
    """

    log_norm_x: Tensor
    log_norm_y: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


class PartitionEstimator(nn.Module):
    """Estimates the partition sums ``Z(x_i)`` and ``Z(y_j)`` that normalise the encoder objective.

    An estimator receives, for each row of the batch, the detached features and the in-batch log
    partition sums (the targets of :func:`amortize.functional.log_partition`, computed by the
    caller over every negative it has, so over all processes under exact distributed modes), and
    returns the log normalisers the encoder objective divides by. It may update its state while
    ``self.training`` is True and must not in eval mode.

    All state lives in registered buffers and submodules (an inner optimiser, if any, in the
    module's extra state), so ``state_dict()`` round-trips exactly and checkpoints need no extra keys.

    Subclasses implement :meth:`forward` and, if they have per-epoch behaviour, :meth:`start_epoch`.
    """

    #: whether :meth:`forward` needs the ``index`` argument (dataset indices of the rows)
    needs_index: bool = False
    #: whether :meth:`forward` reads the features ``x, y`` (if not, distributed modes skip gathering them)
    reads_features: bool = True

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        log_z_x: Tensor,
        log_z_y: Tensor,
        index: Optional[Tensor] = None,
    ) -> PartitionEstimate:
        """Estimate the log normalisers for one batch.

        Args:
            x: (B, d) detached image features.
            y: (B, d) detached text features.
            log_z_x: (B,) in-batch log partition sums of the image rows.
            log_z_y: (B,) in-batch log partition sums of the text columns.
            index: (B,) int64 dataset indices of the pairs, for estimators with per-sample state.

        Returns:
            A :class:`PartitionEstimate`.
        """
        raise NotImplementedError

    def start_epoch(self, epoch: int, max_epochs: int) -> None:
        """Hook called at the start of every epoch (0-based); idempotent for a repeated epoch."""

    def _check_index(self, index: Optional[Tensor], batch: int, num_samples: int) -> Tensor:
        if index is None:
            raise ValueError(f"{type(self).__name__} needs `index` (the dataset indices of the batch)")
        if index.shape != (batch,):
            raise ValueError(f"index must have shape (B,) = ({batch},), got {tuple(index.shape)}")
        if index.dtype not in (_long_dtypes()):
            raise TypeError(f"index must be an integer tensor, got dtype {index.dtype}")
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= num_samples:
            raise IndexError(
                f"index out of range: values span [{lo}, {hi}] but the estimator holds {num_samples} samples"
            )
        K.unique_index(index, type(self).__name__)
        return index.long()


def _long_dtypes():
    import torch

    return (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
