"""The parts of a normaliser-network estimator: its normaliser, its restart, and its closed choices.

Open parts, registries users extend with their own (a recipe names them as ``{name, **options}``):

* :data:`NORMALIZERS`: what the encoders divide by, and what Stage I fits (``previous_blend``,
  ``ema_target``, ``ema_ramp``, ``online``).
* :data:`RESTARTS`: whether the network restarts from the batch's embeddings every N steps
  (``none``, ``batch_embeddings``; NeuCLIP).

Closed choices, typed options of the estimator (``Literal``), with their meaning here:

* :data:`Cadence`: which steps fit the network and move its EMA (``per_epoch``, ``global``): :func:`due`.
* :data:`Reinit`: when the online network, its optimiser and its EMA are re-initialised
  (``every_epoch``, ``never``): :func:`reinit_now`.
* :data:`Epoch0Previous`: the previous-epoch network of epoch 0 (``none``, ``initial``).

A part receives what it uses (values, the predictions of a named network copy), never the estimator.
"""

from __future__ import annotations

import typing
from typing import Any, Callable, Literal, Optional

import torch
from torch import Tensor

from amortize.estimators.normalizer.fit import MODALITIES, choice, rmse_over_modalities
from amortize.registry import Registry

__all__ = [
    "Normalizer",
    "Predict",
    "NORMALIZERS",
    "mean_log_ratio",
    "Cadence",
    "Reinit",
    "Epoch0Previous",
    "CADENCES",
    "REINIT_POLICIES",
    "EPOCH0_PREVIOUS",
    "due",
    "reinit_now",
    "RESTARTS",
    "NoRestart",
    "BatchEmbeddingRestart",
    "restart_draw",
    "SHORT_BATCH_RULES",
    "RESET_RULES",
    "reset_rule",
    "reset_state_rows",
]

Predict = Callable[[str], dict]
"""``predict(copy) -> {modality: (B,) log lambda}``: a network copy's (``online``, ``target``)
predictions for this step's rows, which the estimator hands a normaliser."""


# ---------------------------------------------------------------------------- normalisers


class Normalizer:
    """What the encoders are divided by, and what the network is fitted to.

    Attributes:
        copies: the network copies besides ``online`` that the estimator keeps (``target``: the
            EMA network; ``previous``: the EMA network frozen at the epoch start).
        blends_targets: whether Stage I fits the in-batch sums blended with ``previous`` (Eq. 12).
    """

    name = "normalizer"
    copies: tuple[str, ...] = ("target", "previous")
    blends_targets = True

    def ema_decay(self, decay: float, beta: float) -> float:
        """The EMA decay of an epoch, given the constant ``ema_decay`` and the epoch's ``beta``: ``decay``."""
        return decay

    def encoder(self, comb: dict[str, Tensor], batch: dict[str, Tensor], predict: Predict,
                terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """The encoder normalisers ``{modality: (B,)}`` after this step's fit.

        Args:
            comb: the Stage I targets (the in-batch log sums, blended where the normaliser blends).
            batch: the in-batch log sums.
            predict: the predictions of a network copy by name (see :data:`Predict`).
            terms: the step's logged terms, which the normaliser may add to.
        """
        raise NotImplementedError


class PreviousBlend(Normalizer):
    """The AmorLIP authors' released command (``fit_w_prev``): divide by ``Z_comb``, the in-batch
    sums blended with the previous-epoch network by ``beta`` (Eq. 12), which is also Stage I's target."""

    name = "previous_blend"

    def encoder(self, comb, batch, predict, terms):
        return comb  # the EMA networks are not read this step (they become `previous` next epoch)


class EmaTarget(Normalizer):
    """The AmorLIP paper (Eq. 6 with Eq. 12): divide by the EMA target network's ``lambda``; Stage I
    fits the blended targets; the EMA decay is the constant ``ema_decay``."""

    name = "ema_target"

    def encoder(self, comb, batch, predict, terms):
        with torch.no_grad():
            norm = predict("target")
            terms["target_rmse"] = rmse_over_modalities(norm, batch)
        return norm


class EmaRamp(EmaTarget):
    """The AmorLIP authors' code without ``fit_w_prev``: divide by the EMA network; Stage I fits the
    in-batch sums, never blended; the EMA decay of epoch ``t`` is ``beta(t)`` (``ema_decay`` unused)."""

    name = "ema_ramp"
    blends_targets = False

    def ema_decay(self, decay, beta):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"normalizer 'ema_ramp' uses beta as the EMA decay; it must be in [0, 1], got {beta}")
        return beta  # the constant decay is unused


class Online(Normalizer):
    """NeuCLIP: divide by the online network just after this step's fit; no EMA copy, no
    previous-epoch network, no blending (Stage I fits the in-batch sums)."""

    name = "online"
    copies = ()
    blends_targets = False

    def encoder(self, comb, batch, predict, terms):
        with torch.no_grad():
            norm = predict("online")
            terms["online_rmse"] = rmse_over_modalities(norm, batch)
            terms["normalizer_vs_batch"] = mean_log_ratio(norm, batch)
        return norm


def mean_log_ratio(pred: dict[str, Tensor], target: dict[str, Tensor]) -> Tensor:
    """``mean over both modalities and the rows of (pred - target)``, detached, 0-d.

    With ``pred`` the fitted network's log normalisers and ``target`` the in-batch log sums, it is
    minus the mean log weight the encoder gradient gives the negatives relative to InfoNCE's (0 for
    in-batch): a drift of the fit shows as a growing positive value.
    """
    return 0.5 * sum((pred[m].detach() - target[m].detach()).mean() for m in MODALITIES)


NORMALIZERS: Registry[Normalizer] = Registry("normalizer")
"""Encoder normalisers: ``previous_blend`` (AmorLIP code), ``ema_target`` (AmorLIP paper),
``ema_ramp`` (AmorLIP code's EMA mode), ``online`` (NeuCLIP)."""
for _cls in (PreviousBlend, EmaTarget, EmaRamp, Online):
    NORMALIZERS.register(_cls.name, _cls)


# ---------------------------------------------------------------------------- closed choices

Cadence = Literal["per_epoch", "global"]
"""How ``update_every`` and ``ema_every`` count steps: ``per_epoch`` (the AmorLIP authors' code:
counters restart every epoch; the fit runs at the within-epoch steps 0, ``T_online``, ...; the EMA
update follows the within-epoch steps 0, ``T_target``, ...) or ``global`` (the run's step counter,
never reset; the fit runs at the steps 0, ``T_online``, ...; the EMA update follows the steps
``T_target - 1``, ``2 T_target - 1``, ...)."""
Reinit = Literal["every_epoch", "never"]
"""When the online network, its optimiser and its EMA are re-initialised: ``every_epoch`` (the
AmorLIP authors' code) or ``never`` (once, before the first epoch)."""
Epoch0Previous = Literal["none", "initial"]
"""The previous-epoch network of epoch 0: ``none`` (never blended in epoch 0) or ``initial`` (the
AmorLIP authors' code: the untrained initial network)."""

CADENCES = typing.get_args(Cadence)
"""The accepted values of ``cadence`` (see :data:`Cadence`)."""
REINIT_POLICIES = typing.get_args(Reinit)
"""The accepted values of ``reinit`` (see :data:`Reinit`)."""
EPOCH0_PREVIOUS = typing.get_args(Epoch0Previous)
"""The accepted values of ``epoch0_previous`` (see :data:`Epoch0Previous`)."""


def due(cadence: str, step: int, epoch_step: int, update_every: int, ema_every: int) -> tuple[bool, bool]:
    """``(fit now, EMA update after this step)`` under ``cadence`` (:data:`Cadence`)."""
    if cadence == "per_epoch":
        return epoch_step % update_every == 0, epoch_step % ema_every == 0
    return step % update_every == 0, (step + 1) % ema_every == 0


def reinit_now(reinit: str, first: bool) -> bool:
    """Whether an epoch start re-initialises the networks under ``reinit`` (:data:`Reinit`)."""
    return reinit == "every_epoch" or first


# ---------------------------------------------------------------------------- restarts


SHORT_BATCH_RULES = ("repeat", "partial")
"""What a restart does when the network has more prototypes ``m`` than the batch has rows ``B``
(an open point of NeuCLIP): ``repeat`` draws ``m`` rows with replacement (duplicates get equal
gradients and stay equal until the next restart); ``partial`` restarts ``B`` randomly chosen
prototypes from a permutation of the batch and keeps the other ``m - B``."""


def restart_draw(batch: int, count: int, seed: int, step: int, short_batch: str = "partial") -> tuple[Tensor, Tensor]:
    """Which prototypes restart and from which of a batch's ``batch`` rows.

    Without replacement when ``count <= batch`` (a random subset of the rows); otherwise by
    ``short_batch`` (:data:`SHORT_BATCH_RULES`). The draw depends only on ``(seed, step)``, so
    every process draws the same rows.

    Returns:
        ``(prototype indices, row indices)``, two int64 vectors of the same length (on the CPU).
    """
    if short_batch not in SHORT_BATCH_RULES:
        raise ValueError(f"unknown short_batch rule {short_batch!r}; valid: {', '.join(SHORT_BATCH_RULES)}")
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7919 * int(step) + 1)
    if count <= batch:
        return torch.arange(count), torch.randperm(batch, generator=g)[:count]
    if short_batch == "repeat":
        return torch.arange(count), torch.randint(0, batch, (count,), generator=g)
    return torch.randperm(count, generator=g)[:batch], torch.randperm(batch, generator=g)


class NoRestart:
    """``none``: the network is never restarted from embeddings."""

    name = "none"
    every: Optional[int] = None

    def due(self, step: int) -> bool:
        return False


RESET_RULES = ("restarted", "all", "none")
"""What a restart does to the inner optimiser's state (``restart.reset_optimizer``): ``restarted``
resets the state of the prototypes that restarted and keeps the others' (with ``m <= B`` every
prototype restarts, so it is a fresh optimiser); ``all`` builds a fresh optimiser even when only
some prototypes restarted (``partial``), which throws away the kept prototypes' AdaGrad sums: their
next step is then ``lr`` times the sign of the gradient in every coordinate, whatever the gradient's
size; ``none`` keeps every state."""


def reset_rule(value: Any) -> str:
    """The name in :data:`RESET_RULES` of a ``reset_optimizer`` option (True: ``restarted``; False: ``none``)."""
    if value is True:
        return "restarted"
    if value is False or value is None:
        return "none"
    if value not in RESET_RULES:
        raise ValueError(f"unknown restart.reset_optimizer {value!r}; valid: {', '.join(RESET_RULES)}, true, false")
    return value


@torch.no_grad()
def reset_state_rows(optimizer: torch.optim.Optimizer, param: Tensor, rows: Optional[Tensor]) -> None:
    """Reset the inner optimiser's per-coordinate state of rows ``rows`` of ``param`` to its initial value.

    Every state tensor of ``param``'s shape is reset along its first dimension: AdaGrad's ``sum`` to
    the group's ``initial_accumulator_value``, any other (Adam's moments) to zero. Scalar state (the
    step count) is shared by the rows and kept. A parameter with no state yet is left alone.

    Args:
        optimizer: the inner optimiser over ``param``.
        param: a parameter whose first dimension indexes the prototypes.
        rows: (k,) int64 indices of the rows to reset; None: every coordinate.

    Raises:
        ValueError: ``param`` is not one of ``optimizer``'s parameters.
    """
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
    if group is None:
        raise ValueError("reset_state_rows: the parameter is not optimised by this optimizer")
    state = optimizer.state.get(param)
    if not state:
        return
    where = ... if rows is None else rows.to(param.device)
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == param.shape:
            value[where] = float(group.get("initial_accumulator_value", 0.0)) if key == "sum" else 0.0


class BatchEmbeddingRestart(NoRestart):
    """``batch_embeddings`` (NeuCLIP, ``T_r``): every ``every`` steps (the first at step 0) the
    network of each modality restarts from the OTHER modality's batch embeddings (a network with a
    ``restart(rows)`` method, e.g. ``prototypes``), and the inner optimiser's state of the restarted
    prototypes is reset (:data:`RESET_RULES`).

    Args:
        every: ``T_r``, steps between restarts (NeuCLIP: 500).
        reset_optimizer: a name in :data:`RESET_RULES` (an open point of NeuCLIP; default
            ``restarted``); True means ``restarted``, False ``none``.
        short_batch: a name in :data:`SHORT_BATCH_RULES`, for more prototypes than rows.
    """

    name = "batch_embeddings"

    def __init__(self, every: int = 500, reset_optimizer: Any = "restarted", short_batch: str = "partial"):
        if int(every) < 1:
            raise ValueError(f"restart.every must be >= 1, got {every}")
        if short_batch not in SHORT_BATCH_RULES:
            raise ValueError(f"unknown short_batch rule {short_batch!r}; valid: {', '.join(SHORT_BATCH_RULES)}")
        self.every = int(every)
        self.reset_optimizer = reset_rule(reset_optimizer)
        self.short_batch = short_batch

    def due(self, step: int) -> bool:
        return step % self.every == 0


RESTARTS: Registry[NoRestart] = Registry("restart")
"""Restarts of the network from batch embeddings: ``none`` or ``batch_embeddings``."""
RESTARTS.register("none", NoRestart)
RESTARTS.register("batch_embeddings", BatchEmbeddingRestart)
