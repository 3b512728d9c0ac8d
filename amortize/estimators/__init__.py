"""Partition-function estimators behind one interface, and a registry to build them by name.

* ``in_batch``: CLIP's in-batch sums (:class:`InBatchEstimator`).
* ``moving_average``: SogCLR / FastCLIP per-sample moving averages (:class:`MovingAverageEstimator`).
* ``amortized``: AmorLIP's amortizer networks (:class:`AmortizedEstimator`).
"""

from __future__ import annotations

from typing import Any, Callable

from amortize.estimators.amortized import AmortizedEstimator, blend_log_targets
from amortize.estimators.base import PartitionEstimate, PartitionEstimator
from amortize.estimators.in_batch import InBatchEstimator
from amortize.estimators.moving_average import MovingAverageEstimator, moving_average_update

__all__ = [
    "PartitionEstimate",
    "PartitionEstimator",
    "InBatchEstimator",
    "MovingAverageEstimator",
    "AmortizedEstimator",
    "blend_log_targets",
    "moving_average_update",
    "ESTIMATORS",
    "register_estimator",
    "build_estimator",
]

ESTIMATORS: dict[str, Callable[..., PartitionEstimator]] = {
    "in_batch": InBatchEstimator,
    "moving_average": MovingAverageEstimator,
    "amortized": AmortizedEstimator,
}
"""Registry of estimators: name -> constructor."""


def register_estimator(name: str, ctor: Callable[..., PartitionEstimator]) -> None:
    """Register an estimator constructor under ``name`` (recipes select it as ``estimator.name``)."""
    if name in ESTIMATORS:
        raise ValueError(f"estimator {name!r} is already registered")
    ESTIMATORS[name] = ctor


def build_estimator(name: str, **options: Any) -> PartitionEstimator:
    """Build a registered estimator.

    Args:
        name: ``in_batch``, ``moving_average``, ``amortized`` or a registered name.
        **options: constructor arguments (``num_samples`` for ``moving_average``, ``dim`` for
            ``amortized``, ...).
    """
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; valid: {', '.join(sorted(ESTIMATORS))}")
    try:
        return ESTIMATORS[name](**options)
    except TypeError as e:
        raise ValueError(f"bad options for estimator {name!r}: {e}") from None
