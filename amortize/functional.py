"""The functional face: spectral-EBM contrastive objectives as functions over tensors.

Every loss function here calls the loss module that training uses
(:class:`~amortize.losses.ContrastiveLoss`, with the same objective modules of
:mod:`amortize.objectives`) on this process's batch alone: the one-process layout
``Gather(ONE_PROCESS)``, whatever ``torch.distributed`` says. Normalisers the caller gives reach it
through :class:`GivenNormalizers`, an estimator that returns them. The functions return tensors;
none holds state.
Shapes use ``B`` for the batch (rows are images, columns are texts) and ``d`` for the embedding
width.

Conventions (see ``docs/concepts/ebm.md``):

* ``x`` (B, d) image features and ``y`` (B, d) text features, L2-normalised by the caller.
* ``scale`` is the inverse temperature ``s = exp(logit_scale)`` (a float or a 0-d tensor, > 0),
  ``bias`` an optional additive logit bias ``b``.
* Scores ``S_ij = s * <x_i, y_j> + b``; positive pairs sit on the diagonal.
* ``pos_weight`` (``c``) is the weight of the positive pair inside a partition sum.

All objectives compute in float32 (half-precision inputs are upcast), and in log space where a raw
``exp`` of a score could overflow: ``exp(S_ij - log_norm_i)`` rather than ``exp(S_ij) / norm_i``.
``chunk_size`` streams the computation over row chunks (exact; memory ``O(B * chunk)``).

Each function validates its inputs and raises ``ValueError``/``TypeError`` naming the problem
(shape, dtype, NaN/Inf, scale <= 0). The NaN/Inf check reads the tensors and synchronises a GPU;
lower the process default with :func:`set_checks` (``"shapes"``), or give a loss module its own
level (``ContrastiveLoss(checks=...)``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Union

import torch
from torch import Tensor

from amortize import checks as K
from amortize.comm import ONE_PROCESS, Gather
from amortize.estimators.base import PartitionEstimate, PartitionEstimator
from amortize.losses import ContrastiveLoss
from amortize.objectives import InfoNCE, Linearized, Objective, Sigmoid, partition, rescale_temperature
from amortize.objectives.stage1 import AMORTIZATION_OBJECTIVES, amortization_loss, register_amortization_objective

__all__ = [
    "Checks",
    "set_checks",
    "get_checks",
    "checks",
    "scores",
    "log_partition",
    "amortized_loss",
    "amortized_loss_terms",
    "GivenNormalizers",
    "infonce_loss",
    "sigmoid_loss",
    "amortization_loss",
    "AMORTIZATION_OBJECTIVES",
    "register_amortization_objective",
    "rescale_temperature",
]

Scalar = Union[float, Tensor]
Checks = K.Checks
"""Validation levels accepted by :func:`set_checks`."""


def set_checks(level: Checks) -> None:
    """Set the process-wide default of how thoroughly inputs are validated.

    Args:
        level: ``"full"`` (default) checks shapes, dtypes, finiteness and ``scale > 0``;
            ``"shapes"`` skips the checks that read tensor values (no GPU synchronisation);
            ``"off"`` skips all checks.
    """
    K.DEFAULT[0] = K.resolve(level)


def get_checks() -> str:
    """Return the process-wide default validation level (see :func:`set_checks`)."""
    return K.DEFAULT[0]


@contextmanager
def checks(level: Checks) -> Iterator[None]:
    """Context manager that sets the default validation level (see :func:`set_checks`) and restores it."""
    previous = get_checks()
    set_checks(level)
    try:
        yield
    finally:
        set_checks(previous)


_ALONE = Gather(ONE_PROCESS)  # this process's batch alone (a layout holds no state)


class GivenNormalizers(PartitionEstimator):
    """The estimator of normalisers the caller already has: it returns them as they are.

    How :func:`amortized_loss` and :func:`amortized_loss_terms` hand their ``log_norm_x`` and
    ``log_norm_y`` to :class:`~amortize.losses.ContrastiveLoss`: built for one call, it holds the
    two tensors as plain attributes (no buffers, nothing in ``state_dict``: stateless) and reads
    neither the features nor the in-batch sums, beyond their sizes. Not registered as a recipe
    estimator: a recipe holds no tensors. On one process (``Gather(ONE_PROCESS)``, what the
    functional face uses) the rows are the batch; under a layout over several processes the
    normalisers must cover the rows and columns it gives the estimator.

    Args:
        log_norm_x: (rows,) log normaliser of each image row.
        log_norm_y: (columns,) log normaliser of each text column.
    """

    reads_features = False

    def __init__(self, log_norm_x: Tensor, log_norm_y: Tensor):
        super().__init__()
        self.log_norm_x, self.log_norm_y = log_norm_x, log_norm_y

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        log_z_x: Tensor,
        log_z_y: Tensor,
        index: Optional[Tensor] = None,
    ) -> PartitionEstimate:
        """The given normalisers, detached, once their shapes match the sums' (values: the objective checks them)."""
        K.vector("log_norm_x", self.log_norm_x, log_z_x.shape[0], "shapes")
        K.vector("log_norm_y", self.log_norm_y, log_z_y.shape[0], "shapes")
        return PartitionEstimate(self.log_norm_x.detach(), self.log_norm_y.detach())


class _OneProcessLoss(ContrastiveLoss):
    """:class:`~amortize.losses.ContrastiveLoss` whose error messages name the features ``x`` and ``y``."""

    input_names = ("x", "y")


def _loss(objective: Objective, estimator: Optional[PartitionEstimator] = None, rho: Optional[float] = None,
          chunk_size: Optional[int] = None) -> ContrastiveLoss:
    """The loss module of one call, on this process's batch alone."""
    return _OneProcessLoss(objective, estimator, layout=_ALONE, rho=rho, chunk_size=chunk_size)


def scores(x: Tensor, y: Tensor, scale: Scalar, bias: Scalar = 0.0) -> Tensor:
    """Score matrix ``S = scale * x @ y.T + bias``.

    Args:
        x: (B, d) image features.
        y: (M, d) text features (M may differ from B).
        scale: inverse temperature, > 0.
        bias: additive logit bias.

    Returns:
        (B, M) scores in the dtype of ``x``.
    """
    out = K.scalar_tensor(scale, x) * (x @ y.T)
    if isinstance(bias, Tensor) or bias != 0.0:
        out = out + K.scalar_tensor(bias, x)
    return out


def log_partition(
    x: Tensor,
    y: Tensor,
    scale: Scalar,
    bias: Optional[Scalar] = None,
    pos_weight: float = 1.0,
    chunk_size: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """In-batch log partition SUMS (spec section 3), without gradient.

    ``log_z_x[i] = log(sum_{j != i} exp(S_ij) + c * exp(S_ii))`` and
    ``log_z_y[j] = log(sum_{i != j} exp(S_ij) + c * exp(S_jj))``, computed with logsumexp in
    float32 on detached inputs.

    Args:
        x: (B, d) image features.
        y: (B, d) text features; row i of ``y`` is the positive of row i of ``x``.
        scale: inverse temperature ``s`` (> 0).
        bias: logit bias ``b`` (None: none).
        pos_weight: ``c``, weight of the positive pair in each sum (>= 0).
        chunk_size: None, or rows per chunk (the (B, B) matrix is never held).

    Returns:
        ``(log_z_x, log_z_y)``, each (B,) float32 (float64 for float64 inputs), detached.
    """
    with torch.no_grad():
        s = scale.detach() if isinstance(scale, Tensor) else scale
        b = bias.detach() if isinstance(bias, Tensor) else bias
        pairs = Linearized().pairs(x.detach(), y.detach(), s, b, layout=_ALONE, chunk_size=chunk_size,
                                   names=("x", "y"))
        part = partition(pairs, pos_weight)
    return part.log_z_x, part.log_z_y


def amortized_loss_terms(
    x: Tensor,
    y: Tensor,
    scale: Scalar,
    log_norm_x: Tensor,
    log_norm_y: Tensor,
    bias: Optional[Scalar] = None,
    pos_weight: float = 1.0,
    chunk_size: Optional[int] = None,
) -> dict[str, Tensor]:
    """The three terms of the linearised encoder objective (spec section 2).

    Returns a dict with 0-d tensors:

    * ``positive``: ``-2 * scale * mean_i <x_i, y_i>``
    * ``image``: ``mean_i sum_j w_ij exp(S_ij - log_norm_x[i])`` (image-to-text negatives)
    * ``text``: ``mean_j sum_i w_ij exp(S_ij - log_norm_y[j])`` (text-to-image negatives)

    The normalisers are constants (detached). Shapes: ``x, y`` (B, d); ``log_norm_*`` (B,). These
    are the terms of :class:`~amortize.objectives.Linearized` through
    :meth:`ContrastiveLoss.terms <amortize.losses.ContrastiveLoss.terms>`, with gradients.
    """
    loss_fn = _loss(Linearized(pos_weight), GivenNormalizers(log_norm_x, log_norm_y), chunk_size=chunk_size)
    return loss_fn.terms(x, y, scale, bias)


def amortized_loss(
    x: Tensor,
    y: Tensor,
    scale: Scalar,
    log_norm_x: Tensor,
    log_norm_y: Tensor,
    bias: Optional[Scalar] = None,
    pos_weight: float = 1.0,
    rho: Optional[float] = None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """AmorLIP's encoder objective given normalisers (spec section 2), as the authors compute it.

    ``L = -2 * scale * mean_i <x_i, y_i> + mean_i sum_j w_ij exp(S_ij) / norm_x[i]
    + mean_j sum_i w_ij exp(S_ij) / norm_y[j]`` with ``w_ii = pos_weight`` and ``w_ij = 1``
    otherwise; with ``rho`` given, ``L / sg(scale) + rho / scale``.

    With ``log_norm_* = log_partition(...)`` its gradient equals that of the sum of the two
    InfoNCE cross-entropies (with the positive weighted by ``pos_weight`` in the denominators).

    Args:
        x: (B, d) image features.
        y: (B, d) text features.
        scale: inverse temperature ``s`` (> 0), float or 0-d tensor (gradients flow to it).
        log_norm_x: (B,) log normaliser of each image row; treated as a constant.
        log_norm_y: (B,) log normaliser of each text column; treated as a constant.
        bias: logit bias ``b`` inside the scores of the negative terms (None: none).
        pos_weight: ``c``, weight of the positive pair in the negative terms.
        rho: temperature-rescaling constant (FastCLIP), or None.
        chunk_size: None for one chunk, or a number of rows per chunk (exact; the (B, B) matrix is
            never held).

    Returns:
        0-d float32 loss.
    """
    loss_fn = _loss(Linearized(pos_weight), GivenNormalizers(log_norm_x, log_norm_y), rho, chunk_size)
    return loss_fn(x, y, scale, bias)["loss"]


def infonce_loss(x: Tensor, y: Tensor, scale: Scalar, chunk_size: Optional[int] = None) -> Tensor:
    """Symmetric CLIP loss: the mean of the image-to-text and text-to-image cross-entropies.

    Equal to open_clip's ``ClipLoss`` on one process (:class:`~amortize.objectives.InfoNCE`).

    Args:
        x: (B, d) image features.
        y: (B, d) text features.
        scale: inverse temperature ``s`` (> 0).
        chunk_size: None (one chunk) or rows per chunk for the exact streaming computation.

    Returns:
        0-d float32 loss.
    """
    return _loss(InfoNCE(), chunk_size=chunk_size)(x, y, scale)["loss"]


def sigmoid_loss(x: Tensor, y: Tensor, scale: Scalar, bias: Scalar, chunk_size: Optional[int] = None) -> Tensor:
    """SigLIP's pairwise sigmoid loss: ``-sum_ij log sigmoid(z_ij * S_ij) / B``.

    ``z_ii = 1`` and ``z_ij = -1`` off the diagonal. Equal to open_clip's ``SigLipLoss`` on one
    process (:class:`~amortize.objectives.Sigmoid`).

    Args:
        x: (B, d) image features.
        y: (B, d) text features.
        scale: inverse temperature ``s`` (> 0).
        bias: logit bias ``b`` (SigLIP initialises it at -10).
        chunk_size: None (one chunk) or rows per chunk.

    Returns:
        0-d float32 loss.
    """
    return _loss(Sigmoid(), chunk_size=chunk_size)(x, y, scale, bias)["loss"]
