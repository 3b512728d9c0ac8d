"""Normaliser-network estimators (AmorLIP, NeuCLIP) as parts, and named presets of them as data.

Parts (each a registry of ``{name, **options}`` sections):

* network: :data:`amortize.amortizers.AMORTIZERS` (``residual_mlp``, ``random_fourier``, ``prototypes``, ...);
* fit: :class:`Fit` (a Stage I objective, an inner optimiser from :data:`INNER_OPTIMIZERS`, inner
  steps, clipping, :data:`LR_SCALINGS`);
* normaliser: :data:`NORMALIZERS` (``previous_blend``, ``ema_target``, ``ema_ramp``, ``online``);
* schedule: :data:`CADENCES`, :data:`REINIT_POLICIES`, :data:`EPOCH0_PREVIOUS`, :data:`RESTARTS`
  and the ``update_every`` / ``ema_every`` counts.

:data:`PRESETS` holds ``amorlip_code`` (the AmorLIP authors' released command), ``amorlip_paper``
(the AmorLIP paper) and ``neuclip`` (NeuCLIP); :func:`from_preset` builds one with overrides.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Optional

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
    "PRESETS",
    "from_preset",
    "neuclip",
    "blend_log_targets",
    "restart_draw",
]

PRESETS: dict[str, dict[str, Any]] = {
    # the AmorLIP authors' released command (README flags: fit_w_prev, model_ema_beta 0.92,
    # z_beta_max 0.8, update_ema_mlps_every_n_steps 2, lambda-lr 1e-3 x W, 3 inner steps, reinit per epoch)
    "amorlip_code": {
        "network": {"name": "residual_mlp", "width_factor": 1.0},
        "fit": {"objective": "log_l2", "optimizer": {"name": "adam", "lr": 1e-3}, "inner_steps": 3,
                "clip_norm": 1.0, "lr_scaling": "world_size"},
        "normalizer": "previous_blend",
        "cadence": "per_epoch",
        "reinit": "every_epoch",
        "epoch0_previous": "initial",
        "restart": "none",
        "update_every": 1,
        "ema_decay": 0.92,
        "ema_every": 2,
        "beta": {"name": "beta_warmup", "final": 0.8, "warmup_epochs": 16},
    },
    # the AmorLIP paper: the encoders divide by the EMA target network (Eq. 6), Stage I fits the
    # targets blended with the previous epoch's network (Eq. 12); the inner lr does not follow W
    "amorlip_paper": {
        "network": {"name": "residual_mlp", "width_factor": 1.0},
        "fit": {"objective": "log_l2", "optimizer": {"name": "adam", "lr": 1e-3}, "inner_steps": 3,
                "clip_norm": 1.0, "lr_scaling": "none"},
        "normalizer": "ema_target",
        "cadence": "per_epoch",
        "reinit": "every_epoch",
        "epoch0_previous": "none",
        "restart": "none",
        "update_every": 1,
        "ema_decay": 0.92,
        "ema_every": 2,
        "beta": {"name": "beta_warmup", "final": 0.8, "warmup_epochs": 16},
    },
    # NeuCLIP (arXiv 2511.08417): m = 4096 prototypes, T_u = 10 AdaGrad steps on every batch of
    # exp(lse - alpha) + alpha (= reverse_kl), restarts from batch embeddings every T_r = 500 steps,
    # the encoders divided by the freshly fitted network; the AdaGrad lr is not published (ours)
    "neuclip": {
        "network": {"name": "prototypes", "num_prototypes": 4096, "eps": 0.0},
        "fit": {"objective": "reverse_kl", "optimizer": {"name": "adagrad", "lr": 0.05}, "inner_steps": 10,
                "clip_norm": None, "lr_scaling": "none"},
        "normalizer": "online",
        "cadence": "global",
        "reinit": "never",
        "epoch0_previous": "none",
        "restart": {"name": "batch_embeddings", "every": 500},
        "update_every": 1,
        "ema_decay": 0.0,
        "ema_every": 1,
        "beta": 0.0,
    },
}
"""Named presets: the parts of each estimator, as data (``{part: section}``)."""


def _merge(base: Any, override: Any) -> Any:
    """``override`` on top of ``base``: mappings merge key by key (a section's name change replaces it)."""
    if isinstance(base, Mapping) and isinstance(override, Mapping):
        if "name" in override and override.get("name") != base.get("name"):
            return dict(override)
        out = dict(base)
        for k, v in override.items():
            out[k] = _merge(base[k], v) if k in base else v
        return out
    if isinstance(base, Mapping) and isinstance(override, str) and "name" in base:
        return {"name": override} if override != base["name"] else dict(base)
    return override


def from_preset(preset: str, dim: int, **overrides: Any) -> NormalizerNetworkEstimator:
    """A normaliser-network estimator from a preset of :data:`PRESETS` with parts overridden.

    Args:
        preset: ``amorlip_code``, ``amorlip_paper`` or ``neuclip``.
        dim: embedding width.
        **overrides: parts or options of :class:`NormalizerNetworkEstimator`; a mapping merges
            into the preset's (``fit={"inner_steps": 5}`` keeps the preset's optimiser).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(sorted(PRESETS))}")
    parts = copy.deepcopy(PRESETS[preset])
    for k, v in overrides.items():
        if k not in parts and k != "seed":
            raise ValueError(f"unknown option {k!r} of preset {preset!r}; valid: {', '.join(sorted(parts))}, seed")
        parts[k] = _merge(parts[k], v) if k in parts else v
    return NormalizerNetworkEstimator(dim, **parts)


def neuclip(
    dim: int,
    num_prototypes: Optional[int] = None,
    eps: Optional[float] = None,
    lr: Optional[float] = None,
    inner_steps: Optional[int] = None,
    restart_every: Optional[int] = None,
    seed: int = 0,
    network: Optional[Any] = None,
    fit: Optional[dict] = None,
    restart: Optional[Any] = None,
) -> NormalizerNetworkEstimator:
    """NeuCLIP's estimator (the ``neuclip`` preset), with its usual knobs as flat options.

    Args:
        dim: embedding width.
        num_prototypes: ``m`` (preset: 4096; the restart draws with replacement when ``m`` exceeds the batch).
        eps: NeuCLIP's ``eps`` inside the log (preset: 0, the positive excluded).
        lr: the inner AdaGrad's learning rate (preset: 0.05; not published).
        inner_steps: ``T_u`` (preset: 10).
        restart_every: ``T_r`` (preset: 500).
        seed: seeds the initial prototypes and the restart draws.
        network: the network's section, merged into the preset's.
        fit: the fit's options, merged into the preset's.
        restart: the restart's section, merged into the preset's.
    """
    over: dict[str, Any] = {"seed": seed}
    net = dict(network or {})
    if num_prototypes is not None:
        net["num_prototypes"] = num_prototypes
    if eps is not None:
        net["eps"] = eps
    if net:
        over["network"] = net
    fit_over = dict(fit or {})
    if lr is not None:
        fit_over["optimizer"] = {**dict(fit_over.get("optimizer", {"name": "adagrad"})), "lr": lr}
    if inner_steps is not None:
        fit_over["inner_steps"] = inner_steps
    if fit_over:
        over["fit"] = fit_over
    rst = restart if restart is not None else {}
    if restart_every is not None:
        rst = {**({"name": "batch_embeddings"} if isinstance(rst, Mapping) and not rst else dict(rst)),
               "every": restart_every}
    if rst:
        over["restart"] = rst
    return from_preset("neuclip", dim, **over)
