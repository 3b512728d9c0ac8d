"""AmorLIP's estimator, spelled with today's keys: amortizer networks fitted online to the in-batch sums.

:class:`AmortizedEstimator` is the :class:`~amortize.estimators.normalizer.NormalizerNetworkEstimator`
whose parts are named by the flat options every recipe in ``recipes/`` uses (``amortizer``,
``objective``, ``lr``, ``normalizer``, ``reinit``, ``cadence``, ``lr_scaling``, ``epoch0_previous``):
each option picks a registered part, so the behaviour lives in the parts, not in this class.
``docs/differences.md`` lists where the authors' code and the paper differ.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from amortize.estimators.normalizer.estimator import NormalizerNetworkEstimator, blend_log_targets
from amortize.estimators.normalizer.fit import LR_SCALINGS
from amortize.estimators.normalizer.parts import CADENCES, EPOCH0_PREVIOUS, NORMALIZERS, REINIT_POLICIES
from amortize.registry import Section
from amortize.schedules import BetaWarmup, Schedule

__all__ = [
    "AmortizedEstimator",
    "blend_log_targets",
    "NORMALIZERS",
    "REINIT_POLICIES",
    "CADENCES",
    "LR_SCALINGS",
    "EPOCH0_PREVIOUS",
]


class AmortizedEstimator(NormalizerNetworkEstimator):
    """Amortized partition functions: one small network per modality predicts ``log Z`` (AmorLIP).

    Submodules ``online``, ``target`` and ``previous`` (``ModuleDict(image=..., text=...)``) and the
    buffers ``step``, ``epoch_step``, ``epoch``, ``max_epochs``, ``has_previous``; the inner Adam's
    state is the module's extra state (see :class:`NormalizerNetworkEstimator`).

    Args:
        dim: embedding width ``d``.
        amortizer: the network, a name in :data:`amortize.amortizers.AMORTIZERS` or a section with
            its options, e.g. ``{"name": "residual_mlp", "width_factor": 0.5}``.
        objective: Stage I objective, a name in :data:`amortize.objectives.stage1.AMORTIZATION_OBJECTIVES`.
        log_l2_weight: weight of the log-L2 regulariser added to ``objective`` (paper: 0.1 for f-div).
        lr: the inner Adam's learning rate (constant, no weight decay).
        inner_steps: ``T_lambda``, Adam steps per fit.
        update_every: ``T_online``, encoder steps between fits.
        ema_decay: ``alpha`` of the target network (unused with ``normalizer="ema_ramp"``).
        ema_every: ``T_target``, encoder steps between EMA updates.
        beta: schedule (over epochs) of the previous-epoch blending weight; a float is constant.
            With ``normalizer="ema_ramp"`` it is the EMA decay's schedule instead.
        normalizer: a name in :data:`NORMALIZERS` with an EMA copy: ``"previous_blend"`` (authors'
            released command, default), ``"ema_target"`` (the paper) or ``"ema_ramp"`` (authors' EMA mode).
        reinit: a name in :data:`REINIT_POLICIES`: ``"every_epoch"`` (authors' code) or ``"never"``.
        clip_norm: gradient-norm clip of the inner steps (None: no clipping).
        seed: seeds the (re-)initialisation of the online networks, so runs and resumes agree.
        cadence: a name in :data:`CADENCES`: ``"per_epoch"`` (authors' code, default) or ``"global"``.
        lr_scaling: a name in :data:`LR_SCALINGS`: ``"none"`` (default) or ``"world_size"`` (authors' code).
        epoch0_previous: a name in :data:`EPOCH0_PREVIOUS`: ``"none"`` (default) or ``"initial"``
            (authors' code); it matters only for a ``beta`` schedule that starts above 0.
    """

    _network_key = "amortizer"

    def __init__(
        self,
        dim: int,
        amortizer: Section = "residual_mlp",
        objective: str = "log_l2",
        log_l2_weight: float = 0.0,
        lr: float = 1e-3,
        inner_steps: int = 3,
        update_every: int = 1,
        ema_decay: float = 0.92,
        ema_every: int = 2,
        beta: Union[float, dict, Schedule] = BetaWarmup(0.8, 16),
        normalizer: Literal["previous_blend", "ema_target", "ema_ramp"] = "previous_blend",
        reinit: Literal["every_epoch", "never"] = "every_epoch",
        clip_norm: Optional[float] = 1.0,
        seed: int = 0,
        cadence: Literal["per_epoch", "global"] = "per_epoch",
        lr_scaling: Literal["none", "world_size"] = "none",
        epoch0_previous: Literal["none", "initial"] = "none",
    ):
        for name, value, valid in (
            ("normalizer", normalizer, NORMALIZERS),
            ("reinit", reinit, REINIT_POLICIES),
            ("cadence", cadence, CADENCES),
            ("lr_scaling", lr_scaling, LR_SCALINGS),
            ("epoch0_previous", epoch0_previous, EPOCH0_PREVIOUS),
        ):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
        if not NORMALIZERS.build(normalizer).copies:
            raise ValueError(f"normalizer {normalizer!r} keeps no EMA network; AmortizedEstimator takes "
                             "previous_blend, ema_target or ema_ramp (use the normaliser-network estimator "
                             "or the neuclip preset for it)")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(
            dim,
            network=amortizer,
            fit={"objective": objective, "log_l2_weight": log_l2_weight, "optimizer": {"name": "adam", "lr": lr},
                 "inner_steps": inner_steps, "clip_norm": clip_norm, "lr_scaling": lr_scaling},
            normalizer=normalizer,
            cadence=cadence,
            reinit=reinit,
            epoch0_previous=epoch0_previous,
            update_every=update_every,
            ema_decay=ema_decay,
            ema_every=ema_every,
            beta=beta,
            seed=seed,
        )
        self.amortizer = self.network
        self.objective = objective
        self.log_l2_weight = float(log_l2_weight)
        self.lr = float(lr)
        self.inner_steps = int(inner_steps)
        self.clip_norm = clip_norm
        self.lr_scaling = lr_scaling
