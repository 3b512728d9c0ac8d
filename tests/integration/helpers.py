"""Shared helpers of the Composer tests: tiny recipes, a fixed-batch loader, a loss recorder."""

from __future__ import annotations

from pathlib import Path

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger

from amortize.train.config import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"

METHODS = ("clip", "siglip", "sogclr", "fastclip", "amorlip-log-l2", "amorlip-fdiv")


def tiny_overrides(batch: int, num_samples: int, tmp_path, duration: str) -> list[str]:
    """Overrides that turn any recipe into a CPU run of the tiny model on synthetic pairs."""
    return [
        "model.name=tiny", "data.name=synthetic", f"data.batch_size={batch}", f"data.num_samples={num_samples}",
        "data.num_workers=0", "loss.moving_average.num_samples=null", "precision=fp32", "device=cpu",
        f"max_duration={duration}", "scheduler.t_warmup=0ba", "scheduler.name=constant",
        f"save_folder={tmp_path}", "save_interval=1000ep", "log_to_console=false", "progress_bar=false",
        "eval.tasks=none",
    ]


def method_recipe(method: str, tmp_path, batch: int = 16, num_samples: int = 16, duration: str = "8ba",
                  extra: list[str] | None = None) -> Recipe:
    """The medium recipe of ``method`` shrunk to the tiny model and synthetic data."""
    return load_recipe(RECIPES / f"{method}-medium.yaml",
                       tiny_overrides(batch, num_samples, tmp_path, duration) + list(extra or []))


class RecordLoss(Callback):
    """Keeps ``float(state.loss)`` of every batch in ``self.losses``."""

    def __init__(self):
        self.losses: list[float] = []

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.AFTER_TRAIN_BATCH:
            loss = state.loss
            if isinstance(loss, dict):
                loss = loss["total"]
            self.losses.append(float(torch.as_tensor(loss).detach()))
