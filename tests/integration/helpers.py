"""Shared helpers of the Composer tests: tiny recipes, a fixed-batch loader, a loss recorder."""

from __future__ import annotations

from pathlib import Path

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger

from amortize.train.config import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"

METHODS = ("clip", "siglip", "sogclr", "fastclip", "scent", "amorlip-log-l2", "amorlip-fdiv")


def tiny_overrides(batch: int, num_samples: int, tmp_path, duration: str) -> list[str]:
    """Overrides that turn any recipe into a CPU run of the tiny model on synthetic pairs."""
    return [
        # whole sections: another dataset and schedule take other options than the recipe's
        "model.name=tiny", f"data={{name: synthetic, batch_size: {batch}, num_samples: {num_samples}, num_workers: 0}}",
        "precision=fp32", "device=cpu", f"max_duration={duration}", "scheduler=constant",
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


def global_batch(n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed global batch of synthetic pairs for the tiny model."""
    from amortize.data.synthetic import SyntheticPairs

    ds = SyntheticPairs(n, 28, 16, num_classes=n, seed=seed)
    return {"image": ds.images, "text": ds.tokens, "index": torch.arange(n)}


def build_for_distributed(method: str, tmp_path):
    """The Composer model of a method's recipe (tiny towers), identical on every process."""
    from amortize.train.builders import build_composer_model

    torch.manual_seed(0)
    recipe = method_recipe(method, tmp_path, batch=8, num_samples=8, extra=["loss.layout=gather"])
    return build_composer_model(recipe, num_samples=8)


def one_step(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of the encoders (DDP-averaged when ``model`` is DDP-wrapped)."""
    out = model(batch)
    inner = model.module if hasattr(model, "module") else model
    loss = inner.loss(out, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in inner.model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def distributed_worker(rank: int, world: int, method: str, init_file: str, out_dir: str) -> None:
    """One gloo process: DDP-wrapped model, its half of the global batch, one backward."""
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = build_for_distributed(method, out_dir)
        ddp = DistributedDataParallel(model)  # reads model._ddp_params_and_buffers_to_ignore
        batch = global_batch()
        per = batch["image"].shape[0] // world
        local = {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}
        try:
            loss, grads = one_step(ddp, local)
        except NotImplementedError as e:
            if rank == 0:
                torch.save({"not_implemented": str(e)}, os.path.join(out_dir, f"{method}.pt"))
            return
        # each process's loss is its share: their mean is the global loss
        total = torch.tensor(loss, dtype=torch.float64)
        dist.all_reduce(total)
        if rank == 0:
            torch.save({"loss": float(total) / world, "grads": grads}, os.path.join(out_dir, f"{method}.pt"))
    finally:
        dist.destroy_process_group()
