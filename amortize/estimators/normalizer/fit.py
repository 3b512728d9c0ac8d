"""The fit part: how a normaliser network is fitted to the in-batch log partition sums.

A :class:`Fit` is a Stage I objective (:data:`amortize.objectives.stage1.AMORTIZATION_OBJECTIVES`),
an inner optimiser section (:data:`INNER_OPTIMIZERS`: ``{name: adam, lr: ...}`` or
``{name: adagrad, lr: ...}``), a number of inner steps, a gradient-norm clip and an ``lr_scaling``
rule (:data:`LR_SCALINGS`). It holds no tensors and no processes: the estimator owns the networks
and the optimiser, and passes the number of processes (for the lr scaling) and the topology (for
the gradient average) of the layout that feeds it.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from amortize.comm import Topology
from amortize.objectives.stage1 import AMORTIZATION_OBJECTIVES, amortization_loss
from amortize.registry import Registry, Section, section_name

__all__ = ["Fit", "INNER_OPTIMIZERS", "LR_SCALINGS", "MODALITIES", "rmse_over_modalities"]

MODALITIES = ("image", "text")
"""The two modalities a normaliser-network estimator keeps one network for, in this order."""


def _adam(params, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """AmorLIP's inner Adam: constant ``lr``, no weight decay."""
    # foreach: one multi-tensor kernel per step instead of one per parameter
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=0.0, foreach=True)


def _adagrad(params, lr: float = 0.05, eps: float = 1e-10, initial_accumulator_value: float = 0.0) -> torch.optim.Optimizer:
    """NeuCLIP's inner AdaGrad: constant ``lr``, no decay of the rate, no weight decay."""
    return torch.optim.Adagrad(params, lr=lr, lr_decay=0.0, weight_decay=0.0, eps=eps,
                               initial_accumulator_value=initial_accumulator_value, foreach=True)


INNER_OPTIMIZERS: Registry[torch.optim.Optimizer] = Registry("inner optimizer")
"""Inner optimisers of a fit: name -> ``ctor(params, lr=..., **options)``; ``adam`` and ``adagrad``."""
INNER_OPTIMIZERS.register("adam", _adam)
INNER_OPTIMIZERS.register("adagrad", _adagrad)


def _default_lr(name: str) -> float:
    """The ``lr`` default of a registered inner optimiser's constructor."""
    param = inspect.signature(INNER_OPTIMIZERS.get(name)).parameters.get("lr")
    if param is None or param.default is param.empty:
        raise ValueError(f"fit.optimizer: inner optimizer {name!r} needs 'lr'")
    return float(param.default)


class _NoScaling:
    """``none``: the inner learning rate is ``lr`` on any number of processes."""

    @staticmethod
    def factor(world_size: int) -> int:
        return 1


class _WorldSize:
    """``world_size`` (the AmorLIP authors' code): ``lr * W``, ``W`` the number of processes of the layout."""

    @staticmethod
    def factor(world_size: int) -> int:
        return world_size


LR_SCALINGS: Registry[Any] = Registry("lr_scaling")
"""How the inner learning rate follows the number of processes: ``none`` or ``world_size``."""
LR_SCALINGS.register("none", _NoScaling)
LR_SCALINGS.register("world_size", _WorldSize)


def rmse_over_modalities(pred: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> Tensor:
    """RMSE over both modalities of log predictions (B,) against log targets (B,), detached, 0-d."""
    return torch.sqrt(0.5 * sum((pred[m].detach() - target[m]).square().mean() for m in MODALITIES))


class Fit:
    """Stage I objective + inner optimiser + inner steps + clipping + lr scaling.

    Args:
        objective: a Stage I objective's name (``log_l2``, ``kl``, ``js``, ``reverse_kl``).
            NeuCLIP's surrogate ``exp(lse - alpha) + alpha`` is ``reverse_kl`` up to a constant.
        log_l2_weight: weight of a log-L2 regulariser added to ``objective``.
        optimizer: the inner optimiser's section, e.g. ``{"name": "adam", "lr": 1e-3}``.
        inner_steps: optimiser steps per fit (``T_lambda`` in AmorLIP, ``T_u`` in NeuCLIP).
        clip_norm: gradient-norm clip of each inner step (None: none).
        lr_scaling: a name in :data:`LR_SCALINGS`.
    """

    def __init__(
        self,
        objective: str = "log_l2",
        log_l2_weight: float = 0.0,
        optimizer: Section = "adam",
        inner_steps: int = 3,
        clip_norm: Optional[float] = 1.0,
        lr_scaling: str = "none",
    ):
        penalty = AMORTIZATION_OBJECTIVES.get(objective)  # an unknown name fails here, with the valid ones
        name, options = section_name(optimizer, "fit.optimizer")
        INNER_OPTIMIZERS.bind({"name": name, **options}, "fit.optimizer", passed=("params",))  # names a bad option
        lr = float(options["lr"]) if "lr" in options else _default_lr(name)
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if int(inner_steps) < 1:
            raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")
        self.objective = objective
        self._penalty = penalty  # looked up once: run() takes 2 * inner_steps Stage I losses a step
        self.log_l2_weight = float(log_l2_weight)
        self.optimizer_name = name
        self.optimizer_options = {k: v for k, v in options.items() if k != "lr"}
        self.lr = lr
        self.inner_steps = int(inner_steps)
        self.clip_norm = clip_norm
        self.lr_scaling = lr_scaling
        self._scaling = LR_SCALINGS.build(lr_scaling)

    def inner_lr(self, world_size: int) -> float:
        """The inner learning rate on ``world_size`` processes: ``lr`` times the ``lr_scaling`` factor."""
        return self.lr * self._scaling.factor(world_size)

    def new_optimizer(self, params, world_size: int) -> torch.optim.Optimizer:
        """A fresh inner optimiser over ``params`` at :meth:`inner_lr` of ``world_size`` processes."""
        return INNER_OPTIMIZERS.build(self.optimizer_name, params, lr=self.inner_lr(world_size),
                                      **self.optimizer_options)

    def set_lr(self, optimizer: torch.optim.Optimizer, world_size: int) -> None:
        """Set every group's learning rate to :meth:`inner_lr` of ``world_size`` processes.

        A restored optimiser state may come from a run on another number of processes.
        """
        for group in optimizer.param_groups:
            group["lr"] = self.inner_lr(world_size)

    def run(
        self,
        nets: nn.ModuleDict,
        params: list[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        predict: Callable[[nn.ModuleDict], dict[str, Tensor]],
        targets: Mapping[str, Tensor],
        batch: Mapping[str, Tensor],
        average_over: Optional[Topology] = None,
    ) -> tuple[Tensor, Tensor]:
        """``inner_steps`` optimiser steps of the Stage I objective, summed over the modalities.

        Args:
            nets: the networks being fitted (their ``requires_grad`` is switched on for the fit only).
            params: their parameters, in a fixed order.
            optimizer: the inner optimiser over ``params``.
            predict: ``nets -> {modality: (B,) log lambda}``.
            targets: ``{modality: (B,)}`` Stage I targets (detached).
            batch: ``{modality: (B,)}`` in-batch log sums, for the RMSE diagnostic.
            average_over: the processes to average each inner step's gradients over, through the
                topology's exchanger (rows that differ per process, the ``local`` layout), so the
                networks stay identical on every process; None (or one process): no collective.

        Returns:
            The last step's loss and the networks' RMSE against ``batch`` before the fit, both 0-d detached.
        """
        # the inputs come from the loss module, which validated the features: no value checks
        # (and no host synchronisation) here; a non-finite step is the divergence guard's to handle
        loss = rmse = torch.zeros(())
        world = 1 if average_over is None else average_over.world_size
        exchanger = average_over.exchanger_for_collective() if world > 1 else None
        device = next(iter(batch.values())).device
        nets.requires_grad_(True)
        try:
            with torch.enable_grad(), torch.autocast(device_type=device.type, enabled=False):
                for i in range(self.inner_steps):
                    pred = predict(nets)
                    if i == 0:
                        rmse = rmse_over_modalities(pred, batch)
                    loss = sum(amortization_loss(pred[m], targets[m], self._penalty, self.log_l2_weight,
                                                 checks="off") for m in MODALITIES)
                    grads = torch.autograd.grad(loss, params)
                    for p, g in zip(params, grads):
                        p.grad = g
                    if exchanger is not None:
                        for p in params:
                            p.grad = exchanger.all_reduce(p.grad).div_(world)
                    if self.clip_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, self.clip_norm, foreach=True)
                    optimizer.step()
                    for p in params:
                        p.grad = None
        finally:
            nets.requires_grad_(False)
        return loss.detach(), rmse
