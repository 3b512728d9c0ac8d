"""Encoder objectives as modules, one implementation each, and the Stage I amortization objectives.

* ``infonce``: :class:`InfoNCE` (CLIP).
* ``dcl``: :class:`DCL` (decoupled contrastive learning: InfoNCE without the positive in its normaliser).
* ``sigmoid``: :class:`Sigmoid` (SigLIP).
* ``linearized``: :class:`Linearized`, the spectral-EBM objective normalised by an estimate of the
  partition sums (in-batch: CLIP's gradient; moving averages: SogCLR / FastCLIP; amortizer
  networks: AmorLIP). It was called ``amortized`` before 0.2.

Write a new objective by subclassing :class:`Objective` (set its class attributes, write
:meth:`Objective.terms`) and registering it with :func:`register_objective`; recipes then select it
as ``loss.objective: {name: ..., <constructor options>}``.
"""

from __future__ import annotations

from typing import Callable

from amortize.objectives.base import Objective, Pairs, Partition, partition, rescale_temperature
from amortize.objectives.infonce import DCL, InfoNCE
from amortize.objectives.linearized import Linearized
from amortize.objectives.sigmoid import Sigmoid
from amortize.objectives.stage1 import (
    AMORTIZATION_OBJECTIVES,
    amortization_loss,
    register_amortization_objective,
)
from amortize.registry import Registry

__all__ = [
    "Objective",
    "Pairs",
    "Partition",
    "partition",
    "rescale_temperature",
    "InfoNCE",
    "DCL",
    "Sigmoid",
    "Linearized",
    "OBJECTIVES",
    "register_objective",
    "AMORTIZATION_OBJECTIVES",
    "register_amortization_objective",
    "amortization_loss",
]

OBJECTIVES: Registry[Objective] = Registry("objective")
"""Encoder objectives by name: ``infonce``, ``dcl``, ``sigmoid``, ``linearized``."""
for _cls in (InfoNCE, DCL, Sigmoid, Linearized):
    OBJECTIVES.register(_cls.name, _cls)
OBJECTIVES.renamed("amortized", "linearized")


def register_objective(name: str, ctor: Callable[..., Objective]) -> None:
    """Register an objective constructor (usually an :class:`Objective` subclass) under ``name``."""
    OBJECTIVES.register(name, ctor)
