"""Partition-function estimators behind one interface, and a registry to build them by name.

* ``in_batch``: CLIP's in-batch sums (:class:`InBatchEstimator`).
* ``moving_average``: SogCLR / FastCLIP per-sample moving averages (:class:`MovingAverageEstimator`).
* ``scent``: SCENT's per-sample estimates with a state-dependent weight (:class:`ScentEstimator`).
* ``amortized``: AmorLIP's amortizer networks with the flat keys of ``recipes/`` (:class:`AmortizedEstimator`,
  the ``amortized`` preset).
* ``exact_positive``: any of these for the negatives, the positive's term exact
  (:class:`~amortize.estimators.exact_positive.ExactPositive`).
* ``normalizer_network``: a normaliser-network estimator spelled out part by part
  (:class:`~amortize.estimators.normalizer.NormalizerNetworkEstimator`).
* ``neuclip``, ``amorlip_code``, ``amorlip_paper``: the presets of
  :data:`amortize.estimators.normalizer.presets.PRESET_TABLE`, each with its generated signature.
"""

from __future__ import annotations

from typing import Any, Callable

from amortize.registry import Registry

from amortize.estimators.amortized import AmortizedEstimator, blend_log_targets
from amortize.estimators.base import PartitionEstimate, PartitionEstimator, StateRule
from amortize.estimators.normalizer import PRESETS, NormalizerNetworkEstimator, from_preset, neuclip
from amortize.estimators.normalizer.presets import preset_constructor
from amortize.estimators.in_batch import InBatchEstimator
from amortize.estimators.exact_positive import ExactPositive
from amortize.estimators.moving_average import (MovingAverageEstimator, PerSampleEstimator, ScentEstimator,
                                                moving_average_update, scent_update)

__all__ = [
    "PartitionEstimate",
    "PartitionEstimator",
    "InBatchEstimator",
    "PerSampleEstimator",
    "MovingAverageEstimator",
    "ScentEstimator",
    "AmortizedEstimator",
    "NormalizerNetworkEstimator",
    "ExactPositive",
    "StateRule",
    "PRESETS",
    "from_preset",
    "blend_log_targets",
    "moving_average_update",
    "scent_update",
    "ESTIMATORS",
    "register_estimator",
    "build_estimator",
]

ESTIMATORS: Registry[PartitionEstimator] = Registry("estimator")
"""Registry of estimators: name -> constructor."""
for _name, _cls in (("in_batch", InBatchEstimator), ("moving_average", MovingAverageEstimator),
                    ("scent", ScentEstimator), ("amortized", AmortizedEstimator)):
    ESTIMATORS.register(_name, _cls)
ESTIMATORS.register("normalizer_network", NormalizerNetworkEstimator)
ESTIMATORS.register("neuclip", neuclip)
ESTIMATORS.register("exact_positive", ExactPositive)


for _preset in ("amorlip_code", "amorlip_paper"):
    ESTIMATORS.register(_preset, preset_constructor(_preset))


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
