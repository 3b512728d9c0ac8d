"""Shared pieces of the reliability tests: a tiny CPU recipe and a state recorder."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import time
from pathlib import Path

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger

from amortize.train.config import Recipe, load_recipe
from amortize.train.model import unwrap

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RECIPE = ROOT / "recipes" / "default.yaml"


def tiny_overrides(folder, duration: str = "6ba", batch: int = 8, num_samples: int = 24) -> list[str]:
    """Overrides that turn the default (AmorLIP) recipe into a few-second CPU run on synthetic pairs."""
    return [
        "model.name=tiny", "data.name=synthetic", f"data.batch_size={batch}", f"data.num_samples={num_samples}",
        "data.num_workers=0", "precision=fp32", "device=cpu", f"max_duration={duration}",
        "scheduler.t_warmup=2ba", f"save_folder={folder}", "save_interval=1000ep", "log_to_console=false",
        "progress_bar=false", "eval.tasks=none", "deterministic_mode=true",
        "loss.estimator.beta={name: beta_warmup, final: 0.8, warmup_epochs: 2}",
    ]


def tiny_recipe(folder, extra: list[str] = (), **kw) -> Recipe:
    """The default recipe shrunk by :func:`tiny_overrides`, plus ``extra`` overrides."""
    return load_recipe(DEFAULT_RECIPE, tiny_overrides(folder, **kw) + list(extra))


def full_state(state: State) -> dict:
    """Deep copies of everything a step may change: towers, loss module (estimator), optimiser state."""
    m = unwrap(state.model)
    return {
        "model": copy.deepcopy({k: v for k, v in m.model.state_dict().items()}),
        "loss_fn": copy.deepcopy(m.loss_fn.state_dict()),
        # the optimiser's moments and step counts (its param_groups carry the scheduled lr, which
        # moves on every batch, skipped or not)
        "optimizer": copy.deepcopy(state.optimizers[0].state_dict()["state"]),
    }


def assert_same(a, b, where="state") -> None:
    """Exact equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where} differs (max |diff| {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys differ: {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


class RecordStates(Callback):
    """Keeps :func:`full_state` after every batch (BATCH_END), keyed by the batch count."""

    def __init__(self):
        self.states: dict[int, dict] = {}

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BATCH_END:
            self.states[int(state.timestamp.batch)] = full_state(state)


class PoisonBatch(Callback):
    """Makes batch ``at`` (1-based) non-finite.

    ``what="features"``: NaN images, so the model's features and the loss are NaN.
    ``what="grads"``: a finite loss whose gradient is infinite (``sqrt`` at 0 of a parameter sum).
    """

    def __init__(self, at: int, what: str = "features"):
        self.at, self.what = at, what

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) + 1 != self.at:
            return
        if event == Event.BEFORE_FORWARD and self.what == "features":
            state.batch = {**state.batch, "image": torch.full_like(state.batch["image"], float("nan"))}
        elif event == Event.AFTER_LOSS and self.what == "grads":
            p = unwrap(state.model).model.logit_scale
            state.loss = state.loss + torch.sqrt(p.sum() - p.sum().detach())


def wait_for(folder: Path, pattern: str, proc: subprocess.Popen, timeout: float = 120.0, poll: float = 0.01) -> None:
    """Wait until a file matching ``pattern`` appears in ``folder`` (checkpoints are renamed into place);
    fail if the run ends first, or after ``timeout`` s, killing the run (its process group when it leads one)."""
    t0 = time.monotonic()
    while not any(folder.glob(pattern)):
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {pattern} appeared:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            raise AssertionError(f"{folder / pattern} did not appear in {timeout} s")
        time.sleep(poll)
