"""Keys of recipes written before 0.2, and where their values live now (the loader's messages)."""

from __future__ import annotations

from typing import Optional

__all__ = ["MOVED", "moved"]

MOVED: dict[str, str] = {
    "loss.amortizer": "loss.estimator (with name: amortized; 'network' and 'width_factor' go into its "
                      "amortizer section, e.g. amortizer: {name: residual_mlp, width_factor: 0.5})",
    "loss.moving_average": "loss.estimator (with name: moving_average)",
    "loss.pos_weight": "loss.objective (e.g. objective: {name: linearized, pos_weight: 0.001})",
    "loss.distributed": "loss.layout",
    "max_logit_scale": "max_scale",
}
"""Old dotted key -> where its value goes now."""


def moved(key: str) -> Optional[str]:
    """The message for a pre-0.2 key (None: ``key`` did not move)."""
    if key not in MOVED:
        return None
    return f"{key!r} moved in 0.2: use {MOVED[key]}; see CHANGELOG.md"
