"""The interface every partition-function estimator implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from torch import Tensor, nn

from amortize import checks as K
from amortize.comm import Topology

__all__ = ["PartitionEstimate", "PartitionEstimator", "StateRule", "CROSS_PROCESS_RULES", "RESUME_RULES",
           "declared_inputs"]

CROSS_PROCESS_RULES = ("identical", "per_process")
"""How a piece of estimator state relates across processes: ``identical`` (every process applies
the same update to the same gathered rows, so DDP must neither broadcast nor reduce it) or
``per_process`` (each process owns its own copy; DDP leaves it alone as well)."""

RESUME_RULES = ("restore", "reset")
"""What a resumed run or the divergence guard's rollback does with it: ``restore`` (saved with the
checkpoint and rolled back on a skipped step) or ``reset`` (rebuilt, never saved)."""


@dataclass(frozen=True)
class StateRule:
    """The declared rules of one piece of estimator state (torchmetrics' ``add_state`` habit).

    Attributes:
        cross_process: a name in :data:`CROSS_PROCESS_RULES`.
        resume: a name in :data:`RESUME_RULES`.
    """

    cross_process: str = "identical"
    resume: str = "restore"

    def __post_init__(self):
        if self.cross_process not in CROSS_PROCESS_RULES:
            raise ValueError(f"unknown cross_process rule {self.cross_process!r}; valid: {', '.join(CROSS_PROCESS_RULES)}")
        if self.resume not in RESUME_RULES:
            raise ValueError(f"unknown resume rule {self.resume!r}; valid: {', '.join(RESUME_RULES)}")


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

    #: extra keyword inputs :meth:`forward` reads, passed by the loss module (``scale``, ``bias``,
    #: ``num_negatives``, ``local_rows``, ``pos_weight``, ``topology``: see :func:`declared_inputs`);
    #: none by default
    extra_inputs: tuple[str, ...] = ()

    # ------------------------------------------------------------------ declared state

    def add_state(self, name: str, default: Tensor, cross_process: str = "identical", resume: str = "restore") -> None:
        """Register a buffer ``name`` and declare its rules (see :class:`StateRule`)."""
        self.register_buffer(name, default)
        self.declare_state(name, cross_process, resume)

    def declare_state(self, name: str, cross_process: str = "identical", resume: str = "restore") -> None:
        """Declare the rules of existing state: a buffer, a submodule (all its tensors) or ``_extra_state``."""
        rules = self.__dict__.setdefault("_state_rules", {})
        rules[name] = StateRule(cross_process, resume)

    def state_rules(self) -> dict[str, StateRule]:
        """The declared state: name (a buffer, a submodule or ``_extra_state``) -> its rules."""
        return dict(self.__dict__.get("_state_rules", {}))

    def declared_tensors(self, prefix: str = "") -> Iterator[tuple[str, StateRule]]:
        """Every declared parameter and buffer, fully qualified with ``prefix``, with its rules."""
        modules = dict(self.named_children())
        for name, rule in self.state_rules().items():
            if name in modules:
                for n, _ in modules[name].named_parameters():
                    yield f"{prefix}{name}.{n}", rule
                for n, _ in modules[name].named_buffers():
                    yield f"{prefix}{name}.{n}", rule
            elif name != "_extra_state":
                yield f"{prefix}{name}", rule

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


def declared_inputs(estimator: Any, scale: Any, bias: Any, num_negatives: float, local_rows: bool,
                    pos_weight: float = 1.0, topology: Optional[Topology] = None) -> dict[str, Any]:
    """The keyword inputs ``estimator`` declares in ``extra_inputs``, picked from what a caller knows.

    The one place these inputs are named: the loss module passes them on every step, and a caller
    that queries an estimator outside the loss (a benchmark's diagnostic) passes the same.

    Args:
        estimator: an estimator (duck-typed ones without ``extra_inputs`` get nothing).
        scale: 0-d inverse temperature, detached.
        bias: 0-d logit bias, detached, or None.
        num_negatives: how many negatives each in-batch sum weighs.
        local_rows: whether the rows are this process's alone on several processes.
        pos_weight: ``c``, the positive's weight in the in-batch sums (the objective's).
        topology: the processes of the layout the rows come from (the loss passes its layout's
            :class:`~amortize.comm.Topology`); an estimator that synchronises its own state runs
            its collectives through it and reads its world size. None: not known to the caller
            (an estimator keeps the topology it was last called with).

    Returns:
        ``{name: value}`` for each name in ``estimator.extra_inputs``, in that order.
    """
    wants = getattr(estimator, "extra_inputs", ())
    if not wants:
        return {}
    given = {"scale": scale, "bias": bias, "num_negatives": num_negatives, "local_rows": local_rows,
             "pos_weight": pos_weight, "topology": topology}
    return {k: given[k] for k in wants}


def _long_dtypes():
    import torch

    return (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
