"""Per-epoch schedules: beta (previous-epoch blending), rho (temperature rescaling), gamma (moving averages).

Schedules are pure functions of a (0-based) epoch or a fraction of training, plus small frozen
dataclasses that recipes build by name (:func:`build_schedule`). A schedule object is callable:
``schedule(epoch, max_epochs) -> float``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence, Union

from amortize.registry import Registry

__all__ = [
    "beta_cosine",
    "cosine_decay",
    "piecewise",
    "Constant",
    "CosineDecay",
    "BetaWarmup",
    "Piecewise",
    "Schedule",
    "SCHEDULES",
    "build_schedule",
]


def beta_cosine(epoch: int, beta_final: float, warmup_epochs: int) -> float:
    """AmorLIP's blending weight (Eq. 12): ``beta_T - beta_T / 2 (1 + cos(pi t / T_beta))`` for
    ``t < T_beta``, else ``beta_T``. So ``beta_0 = 0`` and it rises to ``beta_T``.

    Args:
        epoch: ``t``, 0-based.
        beta_final: ``beta_T`` (0.8 in the paper).
        warmup_epochs: ``T_beta`` (16 in the large recipe); 0 means ``beta_T`` from the start.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return float(beta_final)
    return float(beta_final - 0.5 * beta_final * (1.0 + math.cos(math.pi * epoch / warmup_epochs)))


def cosine_decay(epoch: int, start: float, end: float, decay_epochs: int) -> float:
    """Cosine decay from ``start`` at epoch 0 to ``end`` at ``decay_epochs``, then constant.

    FastCLIP (v3) uses it for the moving-average weight gamma (``start = 1``, ``end = 0.2``).
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if decay_epochs <= 0 or epoch >= decay_epochs:
        return float(end)
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * epoch / decay_epochs)))


def piecewise(epoch: int, max_epochs: int, values: Sequence[float]) -> float:
    """The value of the part of training that ``epoch`` falls in, with the authors' split.

    ``max_epochs`` (``E``) epochs are cut into ``n = len(values)`` parts: each of the first
    ``n - 1`` parts lasts ``E // n`` epochs and the last part takes the remainder, so the last
    value can last longer than the others. ``[6.5, 6.5, 6.5, -8.0]`` over 30 epochs gives 6.5 for
    epochs 0-20 and -8.0 for epochs 21-29 (9 epochs); the authors' large list
    ``[8.5, -8.5, -8.5]`` over 33 epochs anneals from epoch 11 on (the last two thirds).

    With ``E < n`` every part but the last is empty (``E // n = 0``), so the whole run takes the
    last value, as in the authors' code. Epochs at or past ``E`` (and negative ones, taken as 0)
    stay in the last (first) part.

    Args:
        epoch: 0-based epoch.
        max_epochs: ``E``, the planned number of epochs (> 0).
        values: the ``n >= 1`` values, one per part.
    """
    if not values:
        raise ValueError("piecewise schedule needs at least one value")
    if max_epochs <= 0:
        raise ValueError(f"max_epochs must be > 0, got {max_epochs}")
    n = len(values)
    part_len = max_epochs // n
    part = n - 1 if part_len == 0 else min(n - 1, max(0, epoch) // part_len)
    return float(values[part])


@dataclass(frozen=True)
class Constant:
    """A constant value."""

    value: float

    def __call__(self, epoch: int, max_epochs: int = 1) -> float:
        """Return the value."""
        return float(self.value)


@dataclass(frozen=True)
class CosineDecay:
    """:func:`cosine_decay` as a schedule object."""

    start: float
    end: float
    decay_epochs: int

    def __call__(self, epoch: int, max_epochs: int = 1) -> float:
        """Return the value at ``epoch``."""
        return cosine_decay(epoch, self.start, self.end, self.decay_epochs)


@dataclass(frozen=True)
class BetaWarmup:
    """:func:`beta_cosine` as a schedule object."""

    final: float = 0.8
    warmup_epochs: int = 16

    def __call__(self, epoch: int, max_epochs: int = 1) -> float:
        """Return beta at ``epoch``."""
        return beta_cosine(epoch, self.final, self.warmup_epochs)


@dataclass(frozen=True)
class Piecewise:
    """:func:`piecewise` as a schedule object: ``n`` parts of ``E // n`` epochs, the last takes the rest."""

    values: tuple[float, ...] = field(default=(0.0,))

    def __post_init__(self):
        if not self.values:
            raise ValueError("values: a piecewise schedule needs at least one value, got []")

    def __call__(self, epoch: int, max_epochs: int = 1) -> float:
        """Return the value of the part of training that ``epoch`` falls in."""
        return piecewise(epoch, max_epochs, self.values)


Schedule = Union[Constant, CosineDecay, BetaWarmup, Piecewise]
"""Any schedule object: callable as ``schedule(epoch, max_epochs) -> float``."""

def _piecewise(values: Sequence[float]) -> Piecewise:
    return Piecewise(tuple(float(v) for v in values))


SCHEDULES: Registry[Schedule] = Registry("schedule", name_alias="kind")
"""Registry of schedules, built by :func:`build_schedule`: ``constant``, ``cosine_decay``,
``beta_warmup`` and ``piecewise`` (a section ``{name: piecewise, values: [...]}``)."""
for _name, _ctor in (("constant", Constant), ("cosine_decay", CosineDecay), ("beta_warmup", BetaWarmup),
                     ("piecewise", _piecewise)):
    SCHEDULES.register(_name, _ctor)


def build_schedule(spec: Union[float, int, dict, Schedule, None]) -> Schedule | None:
    """Build a schedule from a number (constant), a section ``{"name": name, **options}`` or an object.

    ``kind`` is accepted in place of ``name`` (the key recipes used before 0.2).

    Raises:
        ValueError: for an unknown kind, naming the valid ones.
    """
    if spec is None:
        return None
    if isinstance(spec, (int, float)):
        return Constant(float(spec))
    if isinstance(spec, (Constant, CosineDecay, BetaWarmup, Piecewise)) or callable(spec):
        return spec  # a schedule object (a registered one included)
    if isinstance(spec, dict) or hasattr(spec, "items"):
        return SCHEDULES.build_section(dict(spec), key="schedule")
    raise TypeError(f"cannot build a schedule from {type(spec).__name__}")
