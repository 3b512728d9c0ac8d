"""Stage I: the amortization objectives that fit an amortizer's ``log lambda`` to partition targets.

Each objective is a per-sample penalty of ``delta = log_target - log_lambda``, >= 0 with value and
derivative 0 at ``delta = 0`` (lambda equals the target); :func:`amortization_loss` averages it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from amortize import checks as K
from amortize.registry import Registry

__all__ = [
    "log_l2",
    "kl",
    "js",
    "reverse_kl",
    "AMORTIZATION_OBJECTIVES",
    "register_amortization_objective",
    "amortization_loss",
]


def log_l2(delta: Tensor) -> Tensor:
    """``delta^2`` (spec section 5)."""
    return delta.square()


def kl(delta: Tensor) -> Tensor:
    """``f(t) = t log t - t + 1`` at ``t = Z / lambda = exp(delta)``: ``KL(Q || P)``, minimised at ``lambda = Z``."""
    return torch.exp(delta) * (delta - 1.0) + 1.0


def js(delta: Tensor) -> Tensor:
    """Jensen-Shannon's ``f(t) = 1/2 [t log t - (t + 1) log((t + 1) / 2)]`` at ``t = exp(delta)``, in log space."""
    t = torch.exp(delta)
    return 0.5 * (t * delta - (t + 1.0) * (F.softplus(delta) - math.log(2.0)))


def reverse_kl(delta: Tensor) -> Tensor:
    """``f(t) = t - 1 - log t``: ``KL(P || Q)``; over random batches minimised at ``lambda = E[Z_batch]``.

    log-L2 instead converges to the geometric mean ``exp(E[log Z_batch])``, biased low for small
    batches (not in the paper).
    """
    return torch.expm1(delta) - delta


AMORTIZATION_OBJECTIVES: Registry[Tensor] = Registry("amortization objective")
"""Stage I objectives: name -> per-sample penalty of ``delta = log_target - log_lambda``."""
for _name, _fn in (("log_l2", log_l2), ("kl", kl), ("js", js), ("reverse_kl", reverse_kl)):
    AMORTIZATION_OBJECTIVES.register(_name, _fn)


def register_amortization_objective(name: str, fn: Callable[[Tensor], Tensor]) -> None:
    """Register a Stage I objective under ``name``.

    Args:
        name: the name estimators take (``AmortizedEstimator(objective=...)``).
        fn: maps ``delta = log_target - log_lambda`` (B,) to per-sample penalties (B,), minimised
            at ``delta = 0``.
    """
    AMORTIZATION_OBJECTIVES.register(name, fn)


def amortization_loss(
    log_lambda: Tensor,
    log_target: Tensor,
    kind: str | Callable[[Tensor], Tensor] = "log_l2",
    log_l2_weight: float = 0.0,
    checks: str | None = None,
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
        log_target: (B,) targets (detached), e.g. from :func:`amortize.functional.log_partition`.
        kind: a name in :data:`AMORTIZATION_OBJECTIVES`, or the penalty registered under it (a
            caller running every step looks the name up once, at construction:
            :class:`amortize.estimators.normalizer.fit.Fit`).
        log_l2_weight: weight of an added log-L2 regulariser (the paper uses 0.1 with ``kl``/``js``).
        checks: validation level (None: the process default).

    Returns:
        0-d loss (float32).
    """
    penalty = AMORTIZATION_OBJECTIVES.get(kind) if isinstance(kind, str) else kind
    level = K.resolve(checks)
    if level != "off":
        if not isinstance(log_lambda, Tensor) or log_lambda.dim() != 1:
            raise ValueError(
                f"log_lambda must be a (B,) tensor, got {getattr(log_lambda, 'shape', type(log_lambda).__name__)}"
            )
        K.vector("log_target", log_target, log_lambda.shape[0], level)
        K.vector("log_lambda", log_lambda, log_lambda.shape[0], level)
    ll = K.as_float32(log_lambda)
    delta = log_target.detach().to(ll.dtype) - ll
    loss = penalty(delta).mean()
    if log_l2_weight:
        loss = loss + log_l2_weight * log_l2(delta).mean()
    return loss
