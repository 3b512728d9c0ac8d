"""The AmorLIP variants of the study: a name and the overrides of the default recipe's estimator it sets.

Run by ``python -m studies.amorlip_study`` and, at the smallest batch, by
``python -m studies.small_batch --variants NAME ...``; both import them from here (neither
imports the other's module for them).
"""

from __future__ import annotations

__all__ = ["VARIANTS"]

VARIANTS: dict[str, dict] = {
    # in the order they run (most informative first, so that a cut-short study still says most)
    "default": {},
    # Stage I objective (the estimator benchmark found reverse KL 0.40x the in-batch error, log-L2 0.64x)
    "reverse_kl": {"objective": "reverse_kl"},
    # encoder normaliser: the paper's EMA network instead of the code's blend with the batch
    "ema_target": {"normalizer": "ema_target"},
    # concepts pages: blend the amortizer with the in-batch estimate by their variances
    "variance_blend": {"estimator": "variance_blend"},
    # the temperature: CLIP does not rescale
    "no_rho": {"rho": None},
    # re-initialisation
    "reinit_never": {"reinit": "never"},
    # inner optimisation
    "inner_10": {"inner_steps": 10},
    "lr_2e-2": {"lr": 0.02},
    "kl": {"objective": "kl"},
    "js": {"objective": "js"},
    # cadence
    "update_every_4": {"update_every": 4},
    "ema_slow": {"ema_every": 1, "ema_decay": 0.99},
    # network
    "init_log_z_0": {"init_log_z": 0.0},
    "width_1.0": {"width_factor": 1.0},
    # previous-epoch blending
    "beta_0.5": {"beta": {"name": "beta_warmup", "final": 0.5, "warmup_epochs": 5}},
    "beta_0.95": {"beta": {"name": "beta_warmup", "final": 0.95, "warmup_epochs": 5}},
    "inner_1": {"inner_steps": 1},
    # control (not a setting to choose): the same objective, pos_weight and rho with in-batch sums
    "in_batch_control": {"estimator": "in_batch"},
    "lr_1e-3": {"lr": 0.001},
    "width_0.25": {"width_factor": 0.25},
}
