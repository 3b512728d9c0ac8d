"""AmorLIP's estimator with the flat keys every recipe in ``recipes/`` uses: the ``amortized`` preset.

:class:`AmortizedEstimator` is :class:`~amortize.estimators.normalizer.NormalizerNetworkEstimator`
with the signature of the ``amortized`` preset (:data:`~amortize.estimators.normalizer.presets.PRESET_TABLE`):
the constructor's defaults, and the flat names ``amortizer`` (the ``network``), ``objective``,
``log_l2_weight``, ``lr``, ``inner_steps``, ``clip_norm`` and ``lr_scaling`` (the ``fit``'s).
``docs/differences.md`` lists where the authors' code and the paper differ.
"""

from __future__ import annotations

from typing import Any

from amortize.estimators.normalizer.estimator import NormalizerNetworkEstimator, blend_log_targets
from amortize.estimators.normalizer.fit import LR_SCALINGS
from amortize.estimators.normalizer.parts import CADENCES, EPOCH0_PREVIOUS, NORMALIZERS, REINIT_POLICIES
from amortize.estimators.normalizer.presets import PRESET_TABLE, preset_options, preset_signature
from amortize.registry import Bound

__all__ = [
    "AmortizedEstimator",
    "blend_log_targets",
    "NORMALIZERS",
    "REINIT_POLICIES",
    "CADENCES",
    "LR_SCALINGS",
    "EPOCH0_PREVIOUS",
]

_SIGNATURE = preset_signature("amortized", method=True)


class AmortizedEstimator(NormalizerNetworkEstimator):
    """Amortized partition functions: one small network per modality predicts ``log Z`` (AmorLIP).

    The ``amortized`` preset of :class:`~amortize.estimators.normalizer.NormalizerNetworkEstimator`
    (its state, its parts and their defaults), under its own name. Its options are the
    constructor's (keyword-only, its ``normalizer`` one with an EMA copy: ``previous_blend``,
    ``ema_target``, ``ema_ramp``) but ``network``, ``fit`` and ``restart``, and these flat ones:

        dim: embedding width ``d``.
        amortizer: the ``network``, e.g. ``{"name": "residual_mlp", "width_factor": 0.5}``.
        objective: the fit's Stage I objective (``log_l2``, ``kl``, ``js``, ``reverse_kl``).
        log_l2_weight: the fit's weight of a log-L2 regulariser added to ``objective``.
        lr: the inner Adam's learning rate (``fit.optimizer.lr``).
        inner_steps: ``T_lambda``, Adam steps per fit.
        clip_norm: gradient-norm clip of the inner steps (None: no clipping).
        lr_scaling: ``none`` or ``world_size`` (the authors' code: ``lr * W``).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        given = _SIGNATURE.bind(self, *args, **kwargs).arguments
        given.pop("self")
        dim = given.pop("dim")
        options = preset_options("amortized", given)
        normalizer = options["normalizer"]
        kind = normalizer.ctor if isinstance(normalizer, Bound) else normalizer
        if not kind.copies:
            raise ValueError(f"normalizer {getattr(normalizer, 'name', normalizer)!r} keeps no EMA network; AmortizedEstimator takes "
                             "previous_blend, ema_target or ema_ramp (use the normaliser-network estimator "
                             "or the neuclip preset for it)")
        super().__init__(dim, **options)

    __init__.__signature__ = _SIGNATURE  # type: ignore[attr-defined]

    # read by the binding step (amortize.registry.bind): every path is hidden, each alias is its one spelling
    option_aliases = dict(PRESET_TABLE["amortized"].aliases)

    # the flat names read back as views of the parts (nothing copied)
    amortizer = property(lambda self: self.network, doc="The network's section (``network``).")
    objective = property(lambda self: self.fit.objective, doc="The fit's Stage I objective.")
    log_l2_weight = property(lambda self: self.fit.log_l2_weight, doc="The fit's log-L2 weight.")
    lr = property(lambda self: self.fit.lr, doc="The inner optimiser's learning rate before ``lr_scaling``.")
    inner_steps = property(lambda self: self.fit.inner_steps, doc="The fit's inner steps.")
    clip_norm = property(lambda self: self.fit.clip_norm, doc="The fit's gradient-norm clip.")
    lr_scaling = property(lambda self: self.fit.lr_scaling, doc="The fit's ``lr_scaling``.")
