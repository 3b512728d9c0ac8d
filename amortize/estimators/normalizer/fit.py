"""The fit part: how a normaliser network is fitted to the in-batch log partition sums.

A :class:`Fit` is a Stage I objective (:data:`amortize.objectives.stage1.AMORTIZATION_OBJECTIVES`),
an inner optimiser section (:data:`INNER_OPTIMIZERS`: ``{name: adam, lr: ...}`` or
``{name: adagrad, lr: ...}``, bound with the recipe at load and built at every re-initialisation),
a number of inner steps, a gradient-norm clip and an ``lr_scaling`` rule (:data:`LrScaling`). It holds no tensors and no processes: the estimator owns the networks
and the optimiser, and passes the number of processes (for the lr scaling) and the topology (for
the gradient average) of the layout that feeds it.
"""

from __future__ import annotations

import typing
from typing import Annotated, Callable, Literal, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from amortize.comm import Topology
from amortize.objectives.stage1 import AMORTIZATION_OBJECTIVES, amortization_loss
from amortize.registry import Bound, OneOf, Part, Registry, Section

__all__ = ["Fit", "INNER_OPTIMIZERS", "LrScaling", "LR_SCALINGS", "MODALITIES", "choice", "rmse_over_modalities"]

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


LrScaling = Literal["none", "world_size"]
"""How the inner learning rate follows the number of processes ``W`` of the layout: ``none`` (``lr``
on any number) or ``world_size`` (the AmorLIP authors' code: ``lr * W``)."""
LR_SCALINGS = typing.get_args(LrScaling)
"""The accepted values of ``lr_scaling`` (see :data:`LrScaling`)."""

OPTIMIZER = Part(INNER_OPTIMIZERS, passed=("params",), rebuilt=True)
"""The fit's ``optimizer`` option: a section of :data:`INNER_OPTIMIZERS`, built at every re-initialisation."""


def rmse_over_modalities(pred: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> Tensor:
    """RMSE over both modalities of log predictions (B,) against log targets (B,), detached, 0-d."""
    return torch.sqrt(0.5 * sum((pred[m].detach() - target[m]).square().mean() for m in MODALITIES))


def choice(option: str, value, valid: tuple) -> str:
    """``value`` if it is one of ``valid``; else ``ValueError`` naming ``option`` and the valid ones
    (the Python face's check; a recipe's value is checked against the ``Literal`` when it loads)."""
    if value not in valid:
        raise ValueError(f"unknown {option} {value!r}; valid: {', '.join(valid)}")
    return value


class Fit:
    """Stage I objective + inner optimiser + inner steps + clipping + lr scaling.

    Args:
        objective: a Stage I objective's name (``log_l2``, ``kl``, ``js``, ``reverse_kl``).
            NeuCLIP's surrogate ``exp(lse - alpha) + alpha`` is ``reverse_kl`` up to a constant.
        log_l2_weight: weight of a log-L2 regulariser added to ``objective``.
        optimizer: the inner optimiser's section, e.g. ``{"name": "adam", "lr": 1e-3}``.
        inner_steps: optimiser steps per fit (``T_lambda`` in AmorLIP, ``T_u`` in NeuCLIP).
        clip_norm: gradient-norm clip of each inner step (None: none).
        lr_scaling: :data:`LrScaling`.
    """

    def __init__(
        self,
        objective: Annotated[str, OneOf(AMORTIZATION_OBJECTIVES)] = "log_l2",
        log_l2_weight: float = 0.0,
        optimizer: Annotated[Section, OPTIMIZER] = "adam",
        inner_steps: int = 3,
        clip_norm: Optional[float] = 1.0,
        lr_scaling: LrScaling = "none",
    ):
        penalty = AMORTIZATION_OBJECTIVES.get(objective)  # an unknown name fails here, with the valid ones
        bound: Bound = OPTIMIZER.take(optimizer, "fit.optimizer")  # a recipe's was bound at load
        lr = bound.option("lr")
        if lr is None:
            raise ValueError(f"fit.optimizer: inner optimizer {bound.name!r} needs 'lr'")
        lr = float(lr)
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if int(inner_steps) < 1:
            raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")
        self.objective = objective
        self._penalty = penalty  # looked up once: run() takes 2 * inner_steps Stage I losses a step
        self.log_l2_weight = float(log_l2_weight)
        self.optimizer_name = bound.name
        self._optimizer = bound.without("lr")  # built at every re-initialisation, at the scaled lr
        self.optimizer_options = dict(self._optimizer.options)
        self.lr = lr
        self.inner_steps = int(inner_steps)
        self.clip_norm = clip_norm
        self.lr_scaling = choice("lr_scaling", lr_scaling, LR_SCALINGS)

    def inner_lr(self, world_size: int) -> float:
        """The inner learning rate on ``world_size`` processes: ``lr`` times the ``lr_scaling`` factor."""
        return self.lr * (world_size if self.lr_scaling == "world_size" else 1)

    def new_optimizer(self, params, world_size: int) -> torch.optim.Optimizer:
        """A fresh inner optimiser over ``params`` at :meth:`inner_lr` of ``world_size`` processes."""
        return self._optimizer.build(params, lr=self.inner_lr(world_size))

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
