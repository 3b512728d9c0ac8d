"""The options of the guards and monitors of a run, declared without Composer.

The recipe's ``divergence`` section is checked against :class:`DivergenceOptions` (the guard's
``__init__``, which :class:`~amortize.train.algorithms.DivergenceGuard` inherits) and an
``estimator_monitor`` entry of ``callbacks:`` against :class:`EstimatorMonitorOptions` (which
:class:`~amortize.train.callbacks.EstimatorMonitorCallback` inherits), so loading a recipe does not
import Composer; the Composer classes are imported when they are built.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal, Optional

from amortize.options import NONNEGATIVE

__all__ = ["DIVERGENCE_POLICIES", "DivergenceOptions", "EstimatorMonitorOptions", "Policy"]

Policy = Literal["skip", "stop", "none"]
"""The type of ``divergence.policy``: ``skip``, ``stop`` or ``none`` (see :data:`DIVERGENCE_POLICIES`)."""
DIVERGENCE_POLICIES = typing.get_args(Policy)
"""What :class:`~amortize.train.algorithms.DivergenceGuard` does on a non-finite step: ``skip`` it, ``stop`` the run, or nothing (``none``)."""


class DivergenceOptions:
    """The constructor of :class:`~amortize.train.algorithms.DivergenceGuard` (its arguments are documented there)."""

    def __init__(
        self,
        policy: Policy = "skip",
        max_consecutive_skips: Annotated[int, NONNEGATIVE] = 10,
        restore_estimator: bool = True,
        check_grads: Optional[bool] = None,
        save_folder: Optional[str] = None,
    ):
        if policy not in DIVERGENCE_POLICIES:
            raise ValueError(f"unknown divergence policy {policy!r}; valid: {', '.join(DIVERGENCE_POLICIES)}")
        if max_consecutive_skips < 0:
            raise ValueError(f"max_consecutive_skips must be >= 0, got {max_consecutive_skips}")
        self.policy = policy
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.restore_estimator = bool(restore_estimator)
        self.check_grads = check_grads
        self.save_folder = save_folder
        self.skipped: list[int] = []
        self._consecutive = 0
        self._snapshot: Optional[dict[str, Any]] = None
        self._checks: Optional[str] = None


class EstimatorMonitorOptions:
    """The constructor of :class:`~amortize.train.callbacks.EstimatorMonitorCallback` (its arguments are documented there)."""

    def __init__(self, policy: Literal["warn", "none"] = "warn", growth: float = 2.0, floor: float = 0.25,
                 max_bias: float = 1.0, min_steps: int = 40):
        from amortize.diagnostics import EstimatorMonitor

        if policy not in ("warn", "none"):
            raise ValueError(f"unknown policy {policy!r}; valid: warn, none")
        self.policy = policy
        self.monitor = EstimatorMonitor(growth=growth, floor=floor, max_bias=max_bias, min_steps=min_steps,
                                        warn=False)
        self._handle = None
