"""The one training loop of the studies: plain PyTorch, the same for every method and every study.

AdamW (:func:`make_optimizer`), the learning rate warmed up linearly for one epoch (at most a
tenth of the run) then decayed on a cosine (:func:`lr_at`), the gradient norm clipped to 1, the
temperature clamped to ``s <= 100`` (:func:`encoder_step`), equal epochs at every batch, each
epoch a fresh permutation drawn from a generator seeded with the run's seed. The loss is called
as the Composer path calls it: ``start_epoch`` every epoch, the batch's dataset indices for the
estimators' per-sample state.

A study builds its model and loss (in that order of the global random stream: loss first, then
the towers, as before this loop was shared), calls :func:`train_loop`, and reads what it wants to
record through the hooks; the loop itself draws no random numbers but the permutations.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

__all__ = ["lr_at", "make_optimizer", "encoder_step", "Trained", "train_loop"]

MAX_LOGIT_SCALE = math.log(100.0)


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """The learning rate at ``step`` of ``total``: linear warm-up over ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * t))


def make_optimizer(model: nn.Module, lr: float, beta2: float = 0.98,
                   scale_lr: Optional[float] = None) -> torch.optim.Optimizer:
    """AdamW (betas 0.9 / ``beta2``, eps 1e-6), weight decay 0.1 on matrices except the token embeddings.

    ``scale_lr`` gives the logit scale a group of its own at that peak learning rate (the FastCLIP
    family's separate temperature lr; None: the logit scale is a gain like the others, at ``lr``).
    Each group's ``lr_mult`` is its peak over ``lr``; :func:`train_loop` schedules ``lr * lr_mult``.
    """
    named = [(name, p) for name, p in model.named_parameters()
             if not (scale_lr is not None and name == "logit_scale")]
    decay = [p for name, p in named if p.dim() >= 2 and "embed" not in name]
    no_decay = [p for name, p in named if p.dim() < 2 or "embed" in name]
    groups = [{"params": decay, "weight_decay": 0.1, "lr_mult": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0}]
    if scale_lr is not None:
        groups.append({"params": [model.logit_scale], "weight_decay": 0.0, "lr_mult": scale_lr / lr})
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2), eps=1e-6, foreach=True)


def encoder_step(model: nn.Module, opt: torch.optim.Optimizer, loss: Tensor) -> None:
    """Backward, clip the gradient norm to 1, step, clamp ``s <= 100``."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        model.logit_scale.clamp_(max=MAX_LOGIT_SCALE)


@dataclass
class Trained:
    """What :func:`train_loop` reports.

    Attributes:
        steps: optimiser steps taken.
        wall_s: seconds of the whole loop (hooks included).
        loss_s: seconds spent in the loss's forward (and in ``before_loss``).
        last: the loss's output at the last step (None without a step).
    """

    steps: int
    wall_s: float
    loss_s: float
    last: Optional[dict[str, Any]]


def train_loop(model: nn.Module, loss_fn, split, *, batch: int, epochs: int, lr: float, seed: int,
               beta2: float = 0.98, scale_lr: Optional[float] = None, max_steps: Optional[int] = None,
               before_loss: Optional[Callable[[], None]] = None,
               on_step: Optional[Callable[[int, dict], None]] = None,
               on_epoch_start: Optional[Callable[[int], None]] = None,
               on_epoch_end: Optional[Callable[[int, int, dict], None]] = None) -> Trained:
    """Train ``model`` with ``loss_fn`` on ``split`` (its ``tiles`` and ``tokens``) for ``epochs`` epochs.

    Args:
        model: the two towers (``encode_image``, ``encode_text``, ``logit_scale``, ``logit_bias``).
        loss_fn: a :class:`~amortize.losses.ContrastiveLoss`.
        split: the training split; an epoch is ``len(split) // batch`` steps (the remainder dropped).
        batch: the batch size.
        epochs: the run's length (the schedules' and the estimator's ``max_epochs``).
        lr: the peak learning rate.
        seed: seeds the generator of the epochs' permutations.
        beta2: AdamW's beta2.
        scale_lr: the logit scale's peak learning rate (None: ``lr``; see :func:`make_optimizer`).
        max_steps: stop after this many steps (tests, smoke runs); the epoch it ends in is closed.
        before_loss: called before each loss call (a study's estimator that reads the current scale).
        on_step: ``(step, out)`` after each optimiser step (``step`` counted from 1).
        on_epoch_start: ``epoch`` after ``loss_fn.start_epoch``, before the epoch's permutation.
        on_epoch_end: ``(epoch, steps, out)`` at the end of each epoch: the steps taken so far and
            the last step's output.

    Returns:
        A :class:`Trained`; the model is left in training mode.
    """
    opt = make_optimizer(model, lr, beta2, scale_lr)
    n = len(split)
    steps_per_epoch = n // batch
    total = steps_per_epoch * epochs
    warmup = max(1, min(steps_per_epoch, total // 10))
    gen = torch.Generator().manual_seed(seed)
    step = 0
    out: Optional[dict] = None
    t_loss = 0.0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        loss_fn.start_epoch(epoch, epochs)
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        perm = torch.randperm(n, generator=gen)
        for b in range(steps_per_epoch):
            idx = perm[b * batch : (b + 1) * batch]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, warmup, lr) * g["lr_mult"]
            x = model.encode_image(split.tiles[idx])
            y = model.encode_text(split.tokens[idx])
            ta = time.perf_counter()
            if before_loss is not None:
                before_loss()
            out = loss_fn(x, y, model.logit_scale.exp(), model.logit_bias, index=idx)
            t_loss += time.perf_counter() - ta
            encoder_step(model, opt, out["loss"])
            step += 1
            if on_step is not None:
                on_step(step, out)
            if max_steps is not None and step >= max_steps:
                break
        if on_epoch_end is not None:
            on_epoch_end(epoch, step, out)
        if max_steps is not None and step >= max_steps:
            break
    return Trained(steps=step, wall_s=time.perf_counter() - t0, loss_s=t_loss, last=out)
