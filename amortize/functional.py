"""Pure math of spectral-EBM contrastive objectives, as functions over tensors.

Every function here takes tensors and returns tensors; none holds state. Shapes use
``B`` for the batch (rows are images, columns are texts) and ``d`` for the embedding width.

Conventions (see ``docs/concepts/ebm.md``):

* ``x`` (B, d) image features and ``y`` (B, d) text features, L2-normalised by the caller.
* ``scale`` is the inverse temperature ``s = exp(logit_scale)`` (a float or a 0-d tensor, > 0),
  ``bias`` an optional additive logit bias ``b``.
* Scores ``S_ij = s * <x_i, y_j> + b``; positive pairs sit on the diagonal.
* ``pos_weight`` (``c``) is the weight of the positive pair inside a partition sum.

All objectives compute in float32 (half-precision inputs are upcast), and in log space where a raw
``exp`` of a score could overflow: ``exp(S_ij - log_norm_i)`` rather than ``exp(S_ij) / norm_i``.

Each function validates its inputs and raises ``ValueError``/``TypeError`` naming the problem
(shape, dtype, NaN/Inf, scale <= 0). The NaN/Inf check reads the tensors and synchronises a GPU;
turn it off in hot loops with :func:`set_checks` (``"shapes"``) once a recipe is known to be sound.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Checks",
    "set_checks",
    "get_checks",
    "checks",
    "scores",
    "log_partition",
    "log_partition_from_scores",
    "amortized_loss_terms_from_scores",
    "amortized_loss",
    "amortized_loss_terms",
    "infonce_loss",
    "sigmoid_loss",
    "amortization_loss",
    "AMORTIZATION_OBJECTIVES",
    "register_amortization_objective",
    "rescale_temperature",
]

Scalar = Union[float, Tensor]
Checks = Literal["full", "shapes", "off"]
"""Validation levels accepted by :func:`set_checks`."""

_CHECKS: list[str] = ["full"]
_VALID_CHECKS = ("full", "shapes", "off")


def set_checks(level: Checks) -> None:
    """Set how thoroughly the functions of this module validate their inputs.

    Args:
        level: ``"full"`` (default) checks shapes, dtypes, finiteness and ``scale > 0``;
            ``"shapes"`` skips the checks that read tensor values (no GPU synchronisation);
            ``"off"`` skips all checks.
    """
    if level not in _VALID_CHECKS:
        raise ValueError(f"unknown checks level {level!r}; valid levels: {', '.join(_VALID_CHECKS)}")
    _CHECKS[0] = level


def get_checks() -> str:
    """Return the current validation level (see :func:`set_checks`)."""
    return _CHECKS[0]


@contextmanager
def checks(level: Checks) -> Iterator[None]:
    """Context manager that sets the validation level (see :func:`set_checks`) and restores it."""
    previous = get_checks()
    set_checks(level)
    try:
        yield
    finally:
        set_checks(previous)


# --------------------------------------------------------------------------------------------
# validation


def _check_finite(name: str, t: Tensor) -> None:
    if _CHECKS[0] == "full" and not bool(torch.isfinite(t).all()):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise ValueError(f"{name} contains {bad} values")


def _check_features(x: Tensor, y: Tensor, names: tuple[str, str] = ("x", "y")) -> None:
    if _CHECKS[0] == "off":
        return
    for name, t in zip(names, (x, y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape (B, d), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.shape[0] < 1:
            raise ValueError(f"{name} is an empty batch (shape {tuple(t.shape)})")
    if x.shape != y.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape (B, d), "
            f"got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.dtype != y.dtype:
        raise TypeError(f"{names[0]} and {names[1]} must have the same dtype, got {x.dtype} and {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"{names[0]} and {names[1]} are on different devices: {x.device} and {y.device}")
    _check_finite(names[0], x)
    _check_finite(names[1], y)


def _check_scalar(name: str, v: Scalar, positive: bool = False) -> None:
    if _CHECKS[0] == "off":
        return
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a scalar (one element), got shape {tuple(v.shape)}")
        if not v.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {v.dtype}")
        if _CHECKS[0] != "full":
            return
        value = float(v.detach())
    elif isinstance(v, (int, float)):
        value = float(v)
    else:
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(v).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_vector(name: str, v: Tensor, batch: int) -> None:
    if _CHECKS[0] == "off":
        return
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if v.shape != (batch,):
        raise ValueError(f"{name} must have shape (B,) = ({batch},), got {tuple(v.shape)}")
    if not v.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {v.dtype}")
    _check_finite(name, v)


def _check_pos_weight(pos_weight: float, batch: int) -> None:
    if _CHECKS[0] == "off":
        return
    if not isinstance(pos_weight, (int, float)) or not math.isfinite(pos_weight) or pos_weight < 0:
        raise ValueError(f"pos_weight must be a finite float >= 0, got {pos_weight!r}")
    if pos_weight == 0 and batch < 2:
        raise ValueError("pos_weight=0 leaves an empty partition sum for a batch of 1; use B >= 2")


def _as_float32(*ts: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.float() if t.dtype != torch.float32 and t.dtype != torch.float64 else t for t in ts)


def _scalar_tensor(v: Scalar, like: Tensor) -> Tensor:
    if isinstance(v, Tensor):
        return v.reshape(()).to(dtype=like.dtype, device=like.device)
    return torch.tensor(float(v), dtype=like.dtype, device=like.device)


def _log_pos_weight(pos_weight: float) -> float:
    return math.log(pos_weight) if pos_weight > 0 else -math.inf


# --------------------------------------------------------------------------------------------
# scores and partition functions


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
    s = _scalar_tensor(scale, x)
    out = s * (x @ y.T)
    if isinstance(bias, Tensor) or bias != 0.0:
        out = out + _scalar_tensor(bias, x)
    return out


def _diagonal_log_weights(B: int, M: int, log_c: float, like: Tensor, offset: int = 0) -> Tensor:
    """(B, M) matrix with ``log_c`` at (i, i + offset) and 0 elsewhere (a constant, not saved for backward)."""
    W = torch.zeros(B, M, dtype=like.dtype, device=like.device)
    if log_c != 0.0:
        rows = torch.arange(B, device=like.device)
        cols = rows + offset
        valid = cols < M
        W[rows[valid], cols[valid]] = log_c
    return W


def log_partition_from_scores(S: Tensor, pos_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """Log partition sums from a precomputed (B, B) score matrix, without gradient.

    Lets a caller that already holds ``S`` (for the encoder objective) skip a second matmul.

    Args:
        S: (B, B) scores ``s <x_i, y_j> + b``, positives on the diagonal.
        pos_weight: ``c``, weight of the positive pair in each sum.

    Returns:
        ``(log_z_x, log_z_y)``, each (B,), detached.
    """
    if _CHECKS[0] != "off" and (S.dim() != 2 or S.shape[0] != S.shape[1]):
        raise ValueError(f"S must be a square (B, B) score matrix, got shape {tuple(S.shape)}")
    _check_pos_weight(pos_weight, S.shape[0])
    with torch.no_grad():
        Sw = S.detach() + _diagonal_log_weights(S.shape[0], S.shape[1], _log_pos_weight(pos_weight), S)
        return torch.logsumexp(Sw, dim=1), torch.logsumexp(Sw, dim=0)


def log_partition(
    x: Tensor,
    y: Tensor,
    scale: Scalar,
    bias: Scalar = 0.0,
    pos_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """In-batch log partition SUMS (spec section 3), without gradient.

    ``log_z_x[i] = log(sum_{j != i} exp(S_ij) + c * exp(S_ii))`` and
    ``log_z_y[j] = log(sum_{i != j} exp(S_ij) + c * exp(S_jj))``, computed with logsumexp in
    float32 on detached inputs.

    Args:
        x: (B, d) image features.
        y: (B, d) text features; row i of ``y`` is the positive of row i of ``x``.
        scale: inverse temperature ``s`` (> 0).
        bias: logit bias ``b``.
        pos_weight: ``c``, weight of the positive pair in each sum (>= 0).

    Returns:
        ``(log_z_x, log_z_y)``, each (B,) float32 (float64 for float64 inputs), detached.
    """
    _check_features(x, y)
    _check_scalar("scale", scale, positive=True)
    _check_scalar("bias", bias)
    _check_pos_weight(pos_weight, x.shape[0])
    with torch.no_grad():
        xf, yf = _as_float32(x.detach(), y.detach())
        scale_ = scale.detach() if isinstance(scale, Tensor) else scale
        bias_ = bias.detach() if isinstance(bias, Tensor) else bias
        return log_partition_from_scores(scores(xf, yf, scale_, bias_), pos_weight)


# --------------------------------------------------------------------------------------------
# encoder objectives


def rescale_temperature(loss: Tensor, scale: Scalar, rho: Optional[float]) -> Tensor:
    """FastCLIP's temperature rescaling: ``loss / sg(scale) + rho / scale`` (identity if rho is None).

    Args:
        loss: 0-d loss.
        scale: inverse temperature ``s``; gradients reach it only through ``rho / scale``.
        rho: the rescaling constant of the current epoch, or None for no rescaling.

    Returns:
        0-d rescaled loss.
    """
    if rho is None:
        return loss
    s = _scalar_tensor(scale, loss)
    return loss / s.detach() + rho / s


def amortized_loss_terms(
    x: Tensor,
    y: Tensor,
    scale: Scalar,
    log_norm_x: Tensor,
    log_norm_y: Tensor,
    bias: Scalar = 0.0,
    pos_weight: float = 1.0,
) -> dict[str, Tensor]:
    """The three terms of the amortized encoder objective (spec section 2), dense.

    Returns a dict with 0-d tensors:

    * ``positive``: ``-2 * scale * mean_i <x_i, y_i>``
    * ``image``: ``mean_i sum_j w_ij exp(S_ij - log_norm_x[i])`` (image-to-text negatives)
    * ``text``: ``mean_j sum_i w_ij exp(S_ij - log_norm_y[j])`` (text-to-image negatives)

    The normalisers are constants (detached). Shapes: ``x, y`` (B, d); ``log_norm_*`` (B,).
    """
    _check_features(x, y)
    B = x.shape[0]
    _check_scalar("scale", scale, positive=True)
    _check_scalar("bias", bias)
    _check_pos_weight(pos_weight, B)
    _check_vector("log_norm_x", log_norm_x, B)
    _check_vector("log_norm_y", log_norm_y, B)
    xf, yf = _as_float32(x, y)
    S = scores(xf, yf, _scalar_tensor(scale, xf), bias)
    return amortized_loss_terms_from_scores(S, scale, log_norm_x, log_norm_y, bias, pos_weight)


def amortized_loss_terms_from_scores(
    S: Tensor,
    scale: Scalar,
    log_norm_x: Tensor,
    log_norm_y: Tensor,
    bias: Scalar = 0.0,
    pos_weight: float = 1.0,
) -> dict[str, Tensor]:
    """:func:`amortized_loss_terms` from a precomputed (B, B) score matrix (gradients flow through ``S``).

    The positive term is read off the diagonal: ``-2 * mean_i (S_ii - b)``.
    """
    B = S.shape[0]
    if _CHECKS[0] != "off" and (S.dim() != 2 or S.shape[1] != B):
        raise ValueError(f"S must be a square (B, B) score matrix, got shape {tuple(S.shape)}")
    lnx = log_norm_x.detach().to(S.dtype)
    lny = log_norm_y.detach().to(S.dtype)
    Sw = S + _diagonal_log_weights(B, B, _log_pos_weight(pos_weight), S)
    image = torch.exp(Sw - lnx[:, None]).sum(dim=1).mean()
    text = torch.exp(Sw - lny[None, :]).sum(dim=0).mean()
    diag = S.diagonal()
    if isinstance(bias, Tensor) or bias != 0.0:
        diag = diag - _scalar_tensor(bias, S)
    positive = -2.0 * diag.mean()
    return {"positive": positive, "image": image, "text": text}


def amortized_loss(
    x: Tensor,
    y: Tensor,
    scale: Scalar,
    log_norm_x: Tensor,
    log_norm_y: Tensor,
    bias: Scalar = 0.0,
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
        bias: logit bias ``b`` inside the scores of the negative terms.
        pos_weight: ``c``, weight of the positive pair in the negative terms.
        rho: temperature-rescaling constant (FastCLIP), or None.
        chunk_size: None for the dense computation, or a number of rows per chunk for the exact
            chunked computation that never holds the (B, B) matrix (see :mod:`amortize.chunked`).

    Returns:
        0-d float32 loss.
    """
    if chunk_size is not None:
        from amortize.chunked import chunked_amortized_loss_terms

        terms = chunked_amortized_loss_terms(
            x, y, scale, log_norm_x, log_norm_y, bias=bias, pos_weight=pos_weight, chunk_size=chunk_size
        )
    else:
        terms = amortized_loss_terms(x, y, scale, log_norm_x, log_norm_y, bias=bias, pos_weight=pos_weight)
    loss = terms["positive"] + terms["image"] + terms["text"]
    return rescale_temperature(loss, scale, rho)


def infonce_loss(x: Tensor, y: Tensor, scale: Scalar, chunk_size: Optional[int] = None) -> Tensor:
    """Symmetric CLIP loss: the mean of the image-to-text and text-to-image cross-entropies.

    Equal to open_clip's ``ClipLoss`` on one process.

    Args:
        x: (B, d) image features.
        y: (B, d) text features.
        scale: inverse temperature ``s`` (> 0).
        chunk_size: None (dense) or rows per chunk for the exact streaming computation.

    Returns:
        0-d float32 loss.
    """
    _check_features(x, y)
    _check_scalar("scale", scale, positive=True)
    if chunk_size is not None:
        from amortize.chunked import chunked_infonce_loss

        return chunked_infonce_loss(x, y, scale, chunk_size=chunk_size)
    xf, yf = _as_float32(x, y)
    S = scores(xf, yf, scale)
    labels = torch.arange(S.shape[0], device=S.device)
    return 0.5 * (F.cross_entropy(S, labels) + F.cross_entropy(S.T, labels))


def sigmoid_loss(
    x: Tensor, y: Tensor, scale: Scalar, bias: Scalar, chunk_size: Optional[int] = None
) -> Tensor:
    """SigLIP's pairwise sigmoid loss: ``-sum_ij log sigmoid(z_ij * S_ij) / B``.

    ``z_ii = 1`` and ``z_ij = -1`` off the diagonal. Equal to open_clip's ``SigLipLoss`` on one
    process.

    Args:
        x: (B, d) image features.
        y: (B, d) text features.
        scale: inverse temperature ``s`` (> 0).
        bias: logit bias ``b`` (SigLIP initialises it at -10).
        chunk_size: None (dense) or rows per chunk for the exact chunked computation.

    Returns:
        0-d float32 loss.
    """
    _check_features(x, y)
    _check_scalar("scale", scale, positive=True)
    _check_scalar("bias", bias)
    if chunk_size is not None:
        from amortize.chunked import chunked_sigmoid_loss

        return chunked_sigmoid_loss(x, y, scale, bias, chunk_size=chunk_size)
    xf, yf = _as_float32(x, y)
    S = scores(xf, yf, scale, bias)
    B = S.shape[0]
    sign = 2.0 * torch.eye(B, device=S.device, dtype=S.dtype) - 1.0
    return -F.logsigmoid(sign * S).sum() / B


# --------------------------------------------------------------------------------------------
# Stage I: amortization objectives


def _log_l2(delta: Tensor) -> Tensor:
    return delta.square()


def _kl(delta: Tensor) -> Tensor:
    # t = Z / lambda = exp(delta); f(t) = t log t - t + 1 = exp(delta) * (delta - 1) + 1
    return torch.exp(delta) * (delta - 1.0) + 1.0


def _js(delta: Tensor) -> Tensor:
    # f(t) = 1/2 [t log t - (t + 1) log((t + 1) / 2)], t = exp(delta), in log space:
    # log((t + 1) / 2) = softplus(delta) - log 2
    t = torch.exp(delta)
    return 0.5 * (t * delta - (t + 1.0) * (F.softplus(delta) - math.log(2.0)))


def _reverse_kl(delta: Tensor) -> Tensor:
    # f(t) = t - 1 - log t, t = exp(delta): KL(P || Q), whose minimiser over random batches is
    # lambda = E[Z_batch] (unbiased in linear space), where log-L2 gives exp(E[log Z_batch])
    return torch.expm1(delta) - delta


AMORTIZATION_OBJECTIVES: dict[str, Callable[[Tensor], Tensor]] = {
    "log_l2": _log_l2,
    "kl": _kl,
    "js": _js,
    "reverse_kl": _reverse_kl,
}
"""Registry of Stage I objectives: name -> per-sample penalty of ``delta = log_target - log_lambda``.

Each penalty is >= 0 with value and derivative 0 at ``delta = 0`` (lambda equals the target).
"""


def register_amortization_objective(name: str, fn: Callable[[Tensor], Tensor]) -> None:
    """Register a Stage I objective under ``name``.

    Args:
        name: the name recipes use (``amortizer.objective``).
        fn: maps ``delta = log_target - log_lambda`` (B,) to per-sample penalties (B,), minimised
            at ``delta = 0``.
    """
    if name in AMORTIZATION_OBJECTIVES:
        raise ValueError(f"amortization objective {name!r} is already registered")
    AMORTIZATION_OBJECTIVES[name] = fn


def amortization_loss(
    log_lambda: Tensor,
    log_target: Tensor,
    kind: str = "log_l2",
    log_l2_weight: float = 0.0,
) -> Tensor:
    """Stage I objective fitting an amortizer's ``log lambda`` to a log partition target.

    * ``log_l2``: ``mean_i (log_lambda_i - log_target_i)^2`` (spec section 5).
    * ``kl``: the f-divergence ``D_f(Q || P)`` between the amortized conditional
      ``Q(y|x) = P(y) exp(S) / lambda(x)`` and ``P(y|x) = P(y) exp(S) / Z(x)``. Then
      ``Q / P = t = Z / lambda`` and, with the proper generator ``f(t) = t log t - t + 1``,
      ``D_f = mean_i f(t_i)``, minimised exactly at ``lambda = Z``.
    * ``js``: the same with Jensen-Shannon's ``f(t) = 1/2 [t log t - (t + 1) log((t + 1) / 2)]``.
    * ``reverse_kl``: ``f(t) = t - 1 - log t``, i.e. ``KL(P || Q)``. Per sample it is minimised at
      ``lambda = Z`` like the others; over random batches its minimiser is ``lambda = E[Z_batch]``,
      unbiased in linear space, whereas log-L2 converges to the geometric mean
      ``exp(E[log Z_batch])``, which is biased low when the batch is small (not in the paper).

    Args:
        log_lambda: (B,) the amortizer's predictions (gradients flow).
        log_target: (B,) targets (detached), e.g. from :func:`log_partition`.
        kind: a name in :data:`AMORTIZATION_OBJECTIVES`.
        log_l2_weight: weight of an added log-L2 regulariser (the paper uses 0.1 with ``kl``/``js``).

    Returns:
        0-d loss (float32).
    """
    if kind not in AMORTIZATION_OBJECTIVES:
        raise ValueError(
            f"unknown amortization objective {kind!r}; valid: {', '.join(sorted(AMORTIZATION_OBJECTIVES))}"
        )
    if _CHECKS[0] != "off":
        if not isinstance(log_lambda, Tensor) or log_lambda.dim() != 1:
            raise ValueError(
                f"log_lambda must be a (B,) tensor, got {getattr(log_lambda, 'shape', type(log_lambda).__name__)}"
            )
        _check_vector("log_target", log_target, log_lambda.shape[0])
        _check_vector("log_lambda", log_lambda, log_lambda.shape[0])
    (ll,) = _as_float32(log_lambda)
    delta = log_target.detach().to(ll.dtype) - ll
    loss = AMORTIZATION_OBJECTIVES[kind](delta).mean()
    if log_l2_weight:
        loss = loss + log_l2_weight * _log_l2(delta).mean()
    return loss
