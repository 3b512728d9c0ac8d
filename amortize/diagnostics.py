"""Warnings for a partition estimator that may be hurting training, read off what the loss already computes.

The encoder gradient of the linearised objective weights row ``i``'s negatives by
``Z_batch_i / lambda_i`` relative to InfoNCE (``Z_batch``: the in-batch partition sum the loss
computes anyway; ``lambda``: the estimator's normaliser). The log of that ratio,
``r_i = log Z_batch_i - log lambda_i``, is 0 for in-batch training. An estimator that has gone
stale or biased shows it in ``r`` without any extra computation:

* **growth**: the mean of ``r^2`` over the last quarter of an epoch's steps is more than
  ``growth`` times the first quarter's, and above ``floor`` (the normaliser drifts away from the
  batch while the encoders move: a network fitted on last epoch's features, a moving average
  that is not refreshed);
* **bias**: ``|mean r|`` over the epoch is above ``max_bias`` nats (the gradient's total weight on
  negatives is off by ``exp(|mean r|)``, the same as a wrong temperature).

:class:`EstimatorMonitor` collects ``r`` per step (no host synchronisation until the epoch ends)
and, at the epoch end, returns the statistics and issues an :class:`EstimatorWarning` (Python's
``warnings``, once per epoch and kind). The loss calls it with the in-batch sums and the
normalisers it already holds (see ``docs/benchmarks.md#small-batch-transfer-suite``).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

__all__ = ["EstimatorWarning", "EstimatorMonitor", "quarter_means"]


class EstimatorWarning(UserWarning):
    """A partition estimator's normaliser looks stale or biased against the in-batch sums."""


def quarter_means(values: Tensor) -> tuple[float, float]:
    """Mean of the first and of the last quarter of a 1-d series (at least one element each).

    Args:
        values: (T,) float, T >= 1.

    Returns:
        ``(first, last)`` as floats.
    """
    if values.dim() != 1 or values.numel() < 1:
        raise ValueError(f"expected a non-empty 1-d series, got shape {tuple(values.shape)}")
    q = max(1, values.numel() // 4)
    return float(values[:q].mean()), float(values[-q:].mean())


class EstimatorMonitor:
    """Per-epoch check of ``r = log Z_batch - log lambda`` (see the module docstring).

    Args:
        growth: warn when the last quarter's mean ``r^2`` exceeds ``growth`` x the first quarter's.
        floor: ... and exceeds ``floor`` (nats squared), so that a tiny error that doubles is no alarm.
        max_bias: warn when ``|mean r|`` over the epoch exceeds this (nats).
        min_steps: epochs with fewer steps are not judged (too few to compare quarters).
        warn: issue Python warnings (else only record them in :attr:`warnings`).
    """

    def __init__(self, growth: float = 2.0, floor: float = 0.25, max_bias: float = 1.0, min_steps: int = 40,
                 warn: bool = True):
        if not growth > 1.0:
            raise ValueError(f"growth must be > 1, got {growth}")
        if floor < 0 or max_bias <= 0 or min_steps < 4:
            raise ValueError(f"need floor >= 0, max_bias > 0, min_steps >= 4; got {floor}, {max_bias}, {min_steps}")
        self.growth, self.floor, self.max_bias, self.min_steps, self.warn = growth, floor, max_bias, int(min_steps), warn
        self.epoch = -1
        self._sq: list[Tensor] = []
        self._mean: list[Tensor] = []
        self.warnings: list[str] = []

    def attach(self, estimator: torch.nn.Module):
        """Record every training-mode call of a partition estimator (a forward hook); returns its handle.

        The estimator's ``forward(x, y, log_z_x, log_z_y, index)`` receives the in-batch log sums and
        returns the normalisers, so the hook sees both; eval-mode calls are ignored. The caller still
        marks epochs with :meth:`start_epoch` and :meth:`end_epoch`.
        """

        def hook(module, args, out):
            if module.training:
                self.update(args[2], out.log_norm_x, args[3], out.log_norm_y)

        return estimator.register_forward_hook(hook)

    def start_epoch(self, epoch: int) -> None:
        """Forget the previous epoch's steps."""
        self.epoch = int(epoch)
        self._sq, self._mean = [], []

    @torch.no_grad()
    def update(self, log_z_x: Tensor, log_norm_x: Tensor, log_z_y: Optional[Tensor] = None,
               log_norm_y: Optional[Tensor] = None) -> None:
        """Record one step: (B,) in-batch log sums and (B,) log normalisers, per modality."""
        rs = [log_z_x.detach().float() - log_norm_x.detach().float()]
        if log_z_y is not None and log_norm_y is not None:
            rs.append(log_z_y.detach().float() - log_norm_y.detach().float())
        r = torch.cat(rs)
        self._sq.append(r.square().mean())
        self._mean.append(r.mean())

    def end_epoch(self) -> Optional[dict[str, float]]:
        """The epoch's statistics (``r2_first``, ``r2_last``, ``r_mean``), warning if they say so; None without steps."""
        if not self._sq:
            return None
        sq = torch.stack(self._sq).cpu()
        first, last = quarter_means(sq)
        bias = float(torch.stack(self._mean).mean())
        stats = {"r2_first": first, "r2_last": last, "r_mean": bias, "steps": float(sq.numel())}
        if sq.numel() >= self.min_steps:
            if last > self.growth * first and last > self.floor:
                self._warn(f"epoch {self.epoch}: the estimator's squared log error against the in-batch sums grew "
                           f"from {first:.3g} to {last:.3g} over the epoch: its normaliser is going stale "
                           f"(try re-fitting more often or a smaller previous-epoch blend)")
            if abs(bias) > self.max_bias:
                self._warn(f"epoch {self.epoch}: the estimator's normaliser is off the in-batch sums by "
                           f"{bias:+.2f} nats on average: negatives weigh {torch.tensor(bias).exp():.2g}x InfoNCE's")
        return stats

    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)
        if self.warn:
            warnings.warn(msg, EstimatorWarning, stacklevel=3)
