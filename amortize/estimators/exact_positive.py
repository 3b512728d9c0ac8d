"""The positive's term computed exactly, the negatives' sum estimated by any other estimator.

Every estimator of the partition sum ``Z_i = c exp(S_ii) + sum_{j != i} k exp(S_ij)`` estimates
both parts from the batch's ``log Z`` alone. The positive's part needs no estimate: ``S_ii`` is in
the batch. :class:`ExactPositive` wraps an estimator, hands it the negatives' log sums
``log(Z_i - c exp(S_ii))`` (its targets, its state), and returns ``log(c exp(S_ii) + N_i)``
with ``N_i`` the inner estimate. With ``c = 1`` (``linearized`` with ``pos_weight: 1``) the encoder
gradient on the positive is InfoNCE's ``-(1 - p_ii)`` with ``p_ii`` against the estimated
negatives: a well-separated pair stops being pulled, as in CLIP, while the negatives' sum comes
from the amortizer (``docs/benchmarks.md#small-batch-transfer-suite`` says where it matters).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Optional

import torch
from torch import Tensor

from amortize import checks as K
from amortize import kernels
from amortize.estimators.base import PartitionEstimate, PartitionEstimator, declared_inputs
from amortize.registry import Part, Section

__all__ = ["ExactPositive", "remove_positive", "add_positive", "NEGATIVES_FLOOR"]

NEGATIVES_FLOOR = 8.0
"""The negatives' sum is kept at least this many machine epsilons of ``Z`` (float32: about 1e-6):
where the positive carries nearly all of ``Z``, ``Z - c exp(S_ii)`` is rounding, and the floor
keeps it a finite target."""


def remove_positive(log_z: Tensor, log_pos: Tensor, floor: float = NEGATIVES_FLOOR) -> Tensor:
    """``log(Z - exp(log_pos))``, the negatives' log sum, at least ``log(floor * eps * Z)``.

    Args:
        log_z: (B,) log partition sums, positive included.
        log_pos: (B,) the positive's log term ``log c + S_ii`` (``-inf`` for ``c = 0``).
        floor: the smallest share of ``Z`` the result may be, in machine epsilons of ``log_z``'s dtype.

    Returns:
        (B,) log sums of the negatives.
    """
    share = torch.exp(log_pos - log_z).clamp(max=1.0)  # the positive's share of Z (rounding can pass 1)
    return log_z + torch.log1p(-share).clamp(min=math.log(floor * torch.finfo(log_z.dtype).eps))


def add_positive(log_neg: Tensor, log_pos: Tensor) -> Tensor:
    """``log(exp(log_neg) + exp(log_pos))``: the normaliser with the positive's exact term.

    Args:
        log_neg: (B,) estimated log sums of the negatives.
        log_pos: (B,) the positive's log term ``log c + S_ii``.

    Returns:
        (B,) log normalisers.
    """
    return torch.logaddexp(log_neg, log_pos.to(log_neg.dtype))


INNER = Part("amortize.estimators:ESTIMATORS", known=("dim", "num_samples"))
"""``inner``: a section of :data:`amortize.estimators.ESTIMATORS`, bound with the wrapper's section
(``loss.estimator.inner``) and built with the ``dim`` and ``num_samples`` the wrapper is given."""


class ExactPositive(PartitionEstimator):
    """Wraps ``inner``: it sees and estimates the negatives' sums; the positive's term is exact.

    The inner estimator is the submodule ``inner``; its state and its declared rules are its own
    (this wrapper holds none). It gets the negatives' log sums (:func:`remove_positive`) where it
    would get ``log Z``, and the wrapper returns :func:`add_positive` of its estimate and
    ``log c + S_ii``, with ``S_ii = s <x_i, y_i> + b`` from the batch (:func:`amortize.kernels.positive_scores`)
    and ``c`` the objective's weight of the positive (the loss passes it as ``pos_weight``).

    Args:
        inner: the estimator of the negatives, a section of :data:`amortize.estimators.ESTIMATORS`
            (``{"name": "amortized", ...}``) or a built estimator.
        dim: the embedding width, for an inner estimator that needs it (the loss's context gives it).
        num_samples: the dataset size, for an inner estimator that needs it.
        floor: see :data:`NEGATIVES_FLOOR` (machine epsilons, > 0).
    """

    def __init__(self, inner: Annotated[Section, INNER] = "amortized", dim: Optional[int] = None,
                 num_samples: Optional[int] = None, floor: float = NEGATIVES_FLOOR):
        super().__init__()
        if not 0.0 < floor < 1e6:
            raise ValueError(f"floor must be in (0, 1e6) machine epsilons, got {floor}")
        built = INNER.take(inner, "inner", dim=dim, num_samples=num_samples)  # a recipe's was bound at load
        if isinstance(built, ExactPositive):
            raise ValueError("inner is itself an exact_positive estimator: wrap the negatives' estimator once")
        self.inner = built
        self.floor = float(floor)
        self.reads_features = True  # S_ii is read off the features
        self.extra_inputs = tuple(dict.fromkeys(("scale", "bias", "pos_weight", *getattr(built, "extra_inputs", ()))))

    @property
    def needs_index(self) -> bool:
        """Whether the inner estimator needs the dataset indices."""
        return self.inner.needs_index

    def state_rules(self):
        """The inner estimator's declared state, under ``inner.``."""
        return {f"inner.{k}": v for k, v in self.inner.state_rules().items()}

    def declared_tensors(self, prefix: str = ""):
        """The inner estimator's declared tensors, under ``prefix + "inner."``."""
        yield from self.inner.declared_tensors(prefix=f"{prefix}inner.")

    def start_epoch(self, epoch: int, max_epochs: int) -> None:
        """The inner estimator's epoch start."""
        self.inner.start_epoch(epoch, max_epochs)

    def forward(self, x: Tensor, y: Tensor, log_z_x: Tensor, log_z_y: Tensor, index: Optional[Tensor] = None,
                **inputs: Any) -> PartitionEstimate:
        """Split off the positive, let ``inner`` estimate the negatives, add the positive back.

        Args:
            x: (B, d) detached image features; row ``i`` is paired with ``y[i]``.
            y: (B, d) detached text features.
            log_z_x: (B,) in-batch log partition sums of the image rows (positive included).
            log_z_y: (B,) the same of the text columns.
            index: (B,) dataset indices, for an inner estimator that needs them.
            **inputs: ``scale``, ``bias``, ``pos_weight`` (``c``), and the inner estimator's own.

        Terms: the inner estimator's, and ``positive_share`` (the mean share of the positive in
        the returned normalisers, rows and columns).
        """
        if x.shape != y.shape or log_z_x.shape != log_z_y.shape or log_z_x.shape[0] != x.shape[0]:
            raise ValueError(f"exact_positive needs paired rows and columns (row i's positive is column i): got "
                             f"x {tuple(x.shape)}, y {tuple(y.shape)}, log_z_x {tuple(log_z_x.shape)}, "
                             f"log_z_y {tuple(log_z_y.shape)}")
        missing = [k for k in ("scale", "pos_weight") if k not in inputs]
        if missing:
            raise ValueError(f"exact_positive reads {', '.join(missing)}: call it with them (ContrastiveLoss passes them)")
        c = float(inputs["pos_weight"])
        K.pos_weight(c, 2)
        log_c = K.log_weight(c)
        log_pos = kernels.positive_scores(x, y, inputs["scale"], inputs.get("bias")) + log_c
        lzx, lzy = log_z_x.detach(), log_z_y.detach()
        log_pos = log_pos.to(lzx.dtype)
        neg_x, neg_y = remove_positive(lzx, log_pos, self.floor), remove_positive(lzy, log_pos, self.floor)
        own = declared_inputs(self.inner, inputs.get("scale"), inputs.get("bias"), inputs.get("num_negatives", 0.0),
                              inputs.get("local_rows", False), c, inputs.get("topology"))
        est = self.inner(x, y, neg_x, neg_y, index, **own)
        nx, ny = add_positive(est.log_norm_x, log_pos), add_positive(est.log_norm_y, log_pos)
        terms = dict(est.terms)
        if math.isfinite(log_c):
            terms["positive_share"] = 0.5 * (torch.exp(log_pos - nx).mean() + torch.exp(log_pos - ny).mean())
        return PartitionEstimate(nx, ny, terms)
