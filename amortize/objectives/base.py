"""The base objective: a template that validates, applies the dtype policy, lays out and chunks.

An objective sees its batch as :class:`Pairs` (this process's rows, the column blocks a
:class:`~amortize.comm.Layout` hands it, scale and bias in float32) and, when it declares a
``needs_partition``, the :class:`Partition` sums of those pairs. A subclass writes only
:meth:`Objective.terms`, its math over the blocks, returning named terms whose sum is the loss (in
the manner of pytorch-metric-learning's ``compute_loss``). Dense is the same code with one chunk.

:class:`~amortize.losses.ContrastiveLoss` orders a training step from these pieces
(:meth:`Objective.pairs`, :func:`partition`, the estimator, :meth:`Objective.terms`), on several
processes and on one alike: the functional face :mod:`amortize.functional` calls it with the
one-process layout (``Gather(ONE_PROCESS)``). An objective has no ``forward`` of its own.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional, Union

import torch
from torch import Tensor, nn

from amortize import checks as K
from amortize import kernels
from amortize.comm import Block, Layout

__all__ = ["TEMPERATURE_FORMS", "Temperature", "Pairs", "Partition", "Objective", "mean_log_ratio", "partition",
           "rescale_temperature"]

Scalar = Union[float, Tensor]


@dataclass
class Pairs:
    """This process's pairs as an objective sees them.

    Attributes:
        x: (R, d) row (image) features, float32 (float64 stays), with gradient.
        y: (R, d) this process's column (text) features, the rows' positives, with gradient.
        scale: 0-d inverse temperature ``s``.
        bias: 0-d logit bias, or None.
        blocks: the column blocks of the layout (features cast like ``x``).
        layout: the :class:`~amortize.comm.Layout`.
        chunk_size: rows per chunk, or None for one chunk.
        num_columns: how many columns the blocks hold in all (``N`` in exact layouts).
        row_offset: where these rows sit among the estimator's rows.
        negative_weight: weight of each negative in partition sums (``local`` layout: ``k``).
        checks: the validation level.
    """

    x: Tensor
    y: Tensor
    scale: Tensor
    bias: Optional[Tensor]
    blocks: list[Block]
    layout: Layout
    chunk_size: Optional[int]
    num_columns: int
    row_offset: int
    negative_weight: float
    checks: str

    @property
    def rows(self) -> int:
        """``R``, the number of local rows."""
        return self.x.shape[0]

    @property
    def num_negatives(self) -> float:
        """``N``: how many negatives each partition sum weighs (``k`` times the others among the estimator's rows)."""
        return self.negative_weight * (self.layout.num_rows(self.rows) - 1)

    @property
    def bias_value(self) -> Scalar:
        """The bias as kernels take it (0.0 without bias)."""
        return 0.0 if self.bias is None else self.bias


@dataclass
class Partition:
    """In-batch log partition sums of a batch (no gradient).

    Attributes:
        stats: one :func:`~amortize.kernels.score_stats` result per block (reused by the objective).
        row_lse: (R,) log sums of this process's rows over the columns it saw.
        log_z_x: (rows the estimator sees,) log partition sums of the image rows.
        log_z_y: (num_columns,) log partition sums of the text columns.
        pos_weight: ``c``, the positive's weight inside the sums.
    """

    stats: list
    row_lse: Tensor
    log_z_x: Tensor
    log_z_y: Tensor
    pos_weight: float


@torch.no_grad()
def partition(pairs: Pairs, pos_weight: float) -> Partition:
    """Log partition sums ``log(sum_{j != i} k exp(S_ij) + c exp(S_ii))`` of rows and columns (spec section 3).

    Streams over row chunks of every block; in exact layouts the row and column sums are combined
    across processes (identical on every process). With one chunk the weighted scores are kept
    for the objective's backward.

    Args:
        pairs: the batch (see :meth:`Objective.pairs`).
        pos_weight: ``c`` (>= 0).

    Returns:
        The :class:`Partition`.
    """
    K.pos_weight(pos_weight, pairs.num_columns, pairs.checks)
    log_c = K.log_weight(pos_weight)
    log_neg = K.log_weight(pairs.negative_weight)
    x = pairs.x
    col_partial = torch.full((pairs.num_columns,), -float("inf"), dtype=x.dtype, device=x.device)
    stats, row_parts = [], []
    for blk in pairs.blocks:
        st = kernels.score_stats(x, blk.features, pairs.scale, pairs.bias_value, log_c, log_neg, blk.offset,
                                 pairs.chunk_size, keep_scores=pairs.chunk_size is None)
        stats.append(st)
        row_parts.append(st[0])
        col_partial[blk.slot] = st[1]
    row_lse = row_parts[0] if len(row_parts) == 1 else torch.logsumexp(torch.stack(row_parts), dim=0)
    log_z_x, log_z_y = pairs.layout.combine(row_lse, col_partial)
    return Partition(stats, row_lse, log_z_x, log_z_y, float(pos_weight))


Temperature = Literal["rescaled", "robust"]
"""The type of ``loss.temperature`` (see :data:`TEMPERATURE_FORMS`)."""
TEMPERATURE_FORMS = typing.get_args(Temperature)
"""How ``rho`` enters the loss (:func:`rescale_temperature`): ``rescaled`` (FastCLIP's rescaling as
AmorLIP's code uses it), ``robust`` (the robust global contrastive loss of FastCLIP-v3 and NeuCLIP,
whose temperature gradient also holds the mean log-normaliser ratio)."""


def mean_log_ratio(log_norm_x: Tensor, log_norm_y: Tensor, positive_scores: Tensor, num_negatives: float) -> Tensor:
    """``F = mean_i [log g_x(i) + log g_y(i)]``, ``log g(i) = log_norm(i) - S_ii - log N``, detached.

    ``g(i)`` is the mean over the ``N`` negatives of ``exp(S_ij - S_ii)`` (plus ``c / N`` with the
    positive weighted ``c`` inside the sums): NeuCLIP's and FastCLIP-v3's ``eps + g``, whose log,
    times the temperature, is their robust global contrastive loss (spec neuclip.md eq. 1).

    Args:
        log_norm_x: (R,) log partition sums of the rows (image side).
        log_norm_y: (R,) log partition sums of the rows' positives (text side).
        positive_scores: (R,) ``S_ii``.
        num_negatives: ``N`` (> 0), how many negatives each sum weighs.

    Returns:
        0-d tensor, without gradient.
    """
    if not num_negatives > 0:
        raise ValueError(f"the robust temperature needs num_negatives > 0 (a batch of >= 2), got {num_negatives}")
    with torch.no_grad():
        ratio = (log_norm_x - positive_scores) + (log_norm_y - positive_scores)
        return ratio.mean() - 2.0 * math.log(num_negatives)


def rescale_temperature(loss: Tensor, scale: Scalar, rho: Optional[float], log_ratio: Optional[Tensor] = None) -> Tensor:
    """FastCLIP's temperature rescaling: ``loss / sg(scale) + (rho + sg(F)) / scale``.

    With ``log_ratio`` None (``rescaled``) the gradient of ``1 / s`` is ``rho`` alone; with
    ``F =`` :func:`mean_log_ratio` (``robust``) it is the temperature gradient of the robust global
    contrastive loss ``tau (F + rho)`` at the normalisers' optimum: ``F + tau dF/dtau + rho``.
    The identity if rho is None.

    Args:
        loss: 0-d loss (both sides summed).
        scale: inverse temperature ``s``; gradients reach it through ``loss`` (scaled by
            ``1 / sg(s)``) and ``(rho + F) / s``.
        rho: the rescaling constant of the current epoch, or None for no rescaling.
        log_ratio: 0-d ``F``, or None.

    Returns:
        0-d rescaled loss.
    """
    if rho is None:
        if log_ratio is not None:
            raise ValueError("a log-normaliser ratio (the robust temperature) needs rho")
        return loss
    s = K.scalar_tensor(scale, loss)
    shift = rho if log_ratio is None else rho + log_ratio.detach().to(loss.dtype)
    return loss / s.detach() + shift / s


class Objective(nn.Module):
    """Base class of encoder objectives: subclasses set the class attributes and write :meth:`terms`.

    Class attributes:
        name: the registered name.
        needs_partition: whether :meth:`terms` reads the in-batch partition sums (their weight ``c``
            of the positive is :meth:`partition_weight`).
        accepts_normalizers: whether :meth:`terms` takes estimated normalisers (the linearized
            objective); if so ``ContrastiveLoss`` joins it with an estimator.
        needs_bias: whether a logit bias is required (SigLIP).
        uses_bias: whether a given logit bias enters the scores (InfoNCE is invariant to it and drops it).
        needs: what the objective needs of a process layout: ``unbiased`` (a loss that is a sum of
            pair terms stays unbiased when the negatives are the local batch, reweighted: every
            layout) or ``exact`` (every layout whose ``guarantee`` is ``exact``). Layouts declare
            their guarantee, so no objective names a layout.

    An objective whose towers should start from other logit parameters than the towers' own
    (:func:`amortize.models.build_model`: CLIP's scale, no bias) states them as class attributes
    named as the ``model`` options they fill where a recipe leaves those unset (the sigmoid
    objective: ``s = 10``, ``b = -10``; :data:`amortize.train.sections.SECTIONS`).
    """

    name: ClassVar[str] = "objective"
    needs_partition: ClassVar[bool] = False
    accepts_normalizers: ClassVar[bool] = False
    needs_bias: ClassVar[bool] = False
    uses_bias: ClassVar[bool] = True
    needs: ClassVar[str] = "unbiased"

    def partition_weight(self) -> float:
        """``c``, the positive's weight in this objective's partition sums."""
        return 1.0

    @classmethod
    def check_parts(cls, layout: Optional[Layout] = None, estimator: bool = False) -> None:
        """Refuse a layout or an estimator this objective cannot be joined with.

        The one copy of these guards: the loss module calls it when it joins the parts.

        Args:
            layout: a layout, or None; accepted when its ``guarantee`` is what :attr:`needs` asks.
            estimator: whether an estimator is to be joined with the objective.

        Raises:
            ValueError: naming the objective, the layout and what it needs.
        """
        if layout is not None and cls.needs == "exact" and layout.guarantee != "exact":
            raise ValueError(f"the {cls.name} objective needs an exact layout (its loss is not a sum of pair terms), "
                             f"and {layout.name!r} is {layout.guarantee}")
        if estimator and not cls.accepts_normalizers:
            raise ValueError(f"the {cls.name} objective computes its own partition function and takes no "
                             "estimator (an estimator needs an objective that takes normalisers: linearized)")

    # ------------------------------------------------------------------ the template

    def pairs(
        self,
        x: Tensor,
        y: Tensor,
        scale: Scalar,
        bias: Optional[Scalar] = None,
        *,
        layout: Layout,
        chunk_size: Optional[int] = None,
        checks: Optional[str] = None,
        names: tuple[str, str] = ("image_features", "text_features"),
    ) -> Pairs:
        """Validate the inputs, cast them to float32 and lay out the columns.

        Args:
            x: (B, d) image features.
            y: (B, d) text features; row i of ``y`` is the positive of row i of ``x``.
            scale: inverse temperature ``s`` (> 0), float or 0-d tensor (gradients flow).
            bias: logit bias, or None.
            layout: the :class:`~amortize.comm.Layout` (``Gather(ONE_PROCESS)``: this process's
                batch alone); the loss module checked when it joined it that the objective may use it.
            chunk_size: rows per chunk, or None for one chunk.
            checks: validation level (None: the process default).
            names: the names of ``x`` and ``y`` in error messages.
        """
        level = K.resolve(checks)
        K.features(x, y, level, names)
        K.normalised(x, y, level, names)
        K.scalar("scale", scale, level, positive=True)
        if bias is not None:
            K.scalar("bias", bias, level)
            K.unneeded_bias(self.name, self.needs_bias)
        elif self.needs_bias:
            raise ValueError(f"the {self.name} objective needs a logit bias")
        K.chunk_size(chunk_size)
        xf, yf = K.as_float32(x), K.as_float32(y)
        s = K.scalar_tensor(scale, xf)
        b = None if bias is None or not self.uses_bias else K.scalar_tensor(bias, xf)
        B = xf.shape[0]
        return Pairs(xf, yf, s, b, layout.columns(yf), layout, chunk_size, layout.num_columns(B),
                     layout.row_offset(B), layout.negative_weight(B), level)

    def terms(self, pairs: Pairs, part: Optional[Partition], log_norm_x: Optional[Tensor] = None,
              log_norm_y: Optional[Tensor] = None) -> dict[str, Tensor]:
        """The objective's math: named 0-d terms whose sum is this process's loss.

        Args:
            pairs: the batch.
            part: its partition sums (None unless ``needs_partition``).
            log_norm_x: (R,) normalisers of this process's rows (``accepts_normalizers`` only).
            log_norm_y: (num_columns,) normalisers of the columns.
        """
        raise NotImplementedError
