"""Partition-function estimators behind one interface, and a registry to build them by name.

* ``in_batch``: CLIP's in-batch sums (:class:`InBatchEstimator`).
* ``moving_average``: SogCLR / FastCLIP per-sample moving averages (:class:`MovingAverageEstimator`).
* ``amortized``: AmorLIP's amortizer networks (:class:`AmortizedEstimator`).
"""

from __future__ import annotations

from typing import Any, Callable

from amortize.registry import Registry

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

ESTIMATORS: Registry[PartitionEstimator] = Registry("estimator")
"""Registry of estimators: name -> constructor."""
for _name, _cls in (("in_batch", InBatchEstimator), ("moving_average", MovingAverageEstimator),
                    ("amortized", AmortizedEstimator)):
    ESTIMATORS.register(_name, _cls)


def register_estimator(name: str, ctor: Callable[..., PartitionEstimator]) -> None:
    """Register an estimator constructor under ``name`` (recipes select it as ``loss.estimator: {name: ...}``)."""
    ESTIMATORS.register(name, ctor)


def build_estimator(name: str, **options: Any) -> PartitionEstimator:
    """Build a registered estimator.

    Args:
        name: ``in_batch``, ``moving_average``, ``amortized`` or a registered name.
        **options: constructor arguments (``num_samples`` for ``moving_average``, ``dim`` for
            ``amortized``, ...).
    """
    ctor = ESTIMATORS.get(name)
    try:
        return ctor(**options)
    except TypeError as e:
        raise ValueError(f"bad options for estimator {name!r}: {e}") from None
