"""Normaliser-network estimators (AmorLIP, NeuCLIP): one constructor made of parts, and its presets as data.

Parts of :class:`NormalizerNetworkEstimator` (a section-valued option is bound with the recipe, under its key):

* ``network``: :data:`amortize.amortizers.AMORTIZERS` (``residual_mlp``, ``random_fourier``, ``prototypes``, ...);
* ``fit``: :class:`Fit` (a Stage I objective, an inner optimiser from :data:`INNER_OPTIMIZERS`, inner
  steps, clipping, ``lr_scaling``);
* ``normalizer``: :data:`NORMALIZERS` (``previous_blend``, ``ema_target``, ``ema_ramp``, ``online``);
* ``restart``: :data:`RESTARTS`;
* typed choices ``cadence``, ``reinit``, ``epoch0_previous`` and the ``update_every`` / ``ema_every`` counts.

:data:`~amortize.estimators.normalizer.presets.PRESET_TABLE` holds ``amorlip_code`` (the AmorLIP
authors' released command), ``amorlip_paper`` (the AmorLIP paper), ``neuclip`` (NeuCLIP) and
``amortized`` (the project's flat keys); :func:`from_preset` builds one with options overridden,
:func:`neuclip` is NeuCLIP's with its flat names.
"""

from __future__ import annotations

from amortize.estimators.normalizer.estimator import NormalizerNetworkEstimator, blend_log_targets
from amortize.estimators.normalizer.fit import INNER_OPTIMIZERS, LR_SCALINGS, Fit
from amortize.estimators.normalizer.parts import (
    CADENCES,
    EPOCH0_PREVIOUS,
    NORMALIZERS,
    REINIT_POLICIES,
    RESTARTS,
    Normalizer,
    restart_draw,
)
from amortize.estimators.normalizer.presets import PRESET_TABLE, PRESETS, from_preset, preset_constructor

__all__ = [
    "NormalizerNetworkEstimator",
    "Fit",
    "Normalizer",
    "INNER_OPTIMIZERS",
    "LR_SCALINGS",
    "NORMALIZERS",
    "CADENCES",
    "REINIT_POLICIES",
    "EPOCH0_PREVIOUS",
    "RESTARTS",
    "PRESET_TABLE",
    "PRESETS",
    "from_preset",
    "neuclip",
    "blend_log_targets",
    "restart_draw",
]

neuclip = preset_constructor("neuclip")
"""NeuCLIP's estimator (the ``neuclip`` preset) with its flat names: ``neuclip(dim, num_prototypes=...,
eps=..., lr=..., inner_steps=..., restart_every=..., seed=..., network=..., fit=..., restart=...)``;
a section given merges into the preset's, a flat name is applied after it."""
