"""Encoder optimisers by name, open_clip's parameter groups, and learning-rate schedulers by name.

Optimisers come from torch (``adamw``, ``adam``, ``sgd``) and torch-optimizer (``lamb``, ``lars``,
``radam``, ``adabelief``, ``novograd``, ``adamp``, ``madgrad``), imported when built.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from amortize.train.config import OptimizerConfig, SchedulerConfig
from amortize.registry import Registry

__all__ = ["OPTIMIZERS", "SCHEDULERS", "is_no_decay", "param_groups", "build_optimizer", "build_scheduler"]

OPTIMIZERS: Registry[torch.optim.Optimizer] = Registry("optimizer")
"""Optimiser constructors: ``(param_groups, cfg: OptimizerConfig) -> Optimizer``."""

SCHEDULERS: Registry[Any] = Registry("scheduler")
"""Composer scheduler constructors: ``(cfg: SchedulerConfig) -> ComposerScheduler``."""


def _adam_like(ctor_path: str) -> Callable[[list, OptimizerConfig], torch.optim.Optimizer]:
    def build(groups: list, cfg: OptimizerConfig) -> torch.optim.Optimizer:
        module, name = ctor_path.rsplit(".", 1)
        import importlib

        cls = getattr(importlib.import_module(module), name)
        return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)

    return build


def _sgd_like(ctor_path: str) -> Callable[[list, OptimizerConfig], torch.optim.Optimizer]:
    def build(groups: list, cfg: OptimizerConfig) -> torch.optim.Optimizer:
        module, name = ctor_path.rsplit(".", 1)
        import importlib

        cls = getattr(importlib.import_module(module), name)
        return cls(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    return build


for _name, _path in (
    ("adamw", "torch.optim.AdamW"),
    ("adam", "torch.optim.Adam"),
    ("lamb", "torch_optimizer.Lamb"),
    ("radam", "torch_optimizer.RAdam"),
    ("adabelief", "torch_optimizer.AdaBelief"),
    ("novograd", "torch_optimizer.NovoGrad"),
    ("adamp", "torch_optimizer.AdamP"),
):
    OPTIMIZERS.register(_name, _adam_like(_path))
for _name, _path in (("sgd", "torch.optim.SGD"), ("lars", "torch_optimizer.LARS"), ("madgrad", "torch_optimizer.MADGRAD")):
    OPTIMIZERS.register(_name, _sgd_like(_path))


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """open_clip's rule: no weight decay on gains, biases, rank < 2 tensors and the logit scale/bias.

    Args:
        name: the parameter's qualified name.
        param: the parameter.
    """
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def param_groups(module: nn.Module, cfg: OptimizerConfig) -> list[dict[str, Any]]:
    """Parameter groups as open_clip forms them, from the parameters that require grad.

    Groups (empty ones dropped): ``decay`` (weight decay ``cfg.weight_decay``), ``no_decay``
    (gains, biases, embeddings of rank < 2, the logit bias; no decay) and ``logit_scale``
    (no decay, learning rate ``cfg.logit_scale_lr`` or ``cfg.lr``). Amortizer networks and the
    parameters of locked towers (``model.lock_image`` / ``model.lock_text``) have
    ``requires_grad=False`` and so are in no group: no update and no weight decay touches them,
    and as they never get a gradient, gradient clipping's norm is over the trainable ones only.

    Args:
        module: the model (its ``named_parameters`` are grouped).
        cfg: the optimiser config.

    Returns:
        A list of dicts ``{"params", "weight_decay", "name"[, "lr"]}`` for a torch optimiser.
    """
    decay, no_decay, scale = [], [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("logit_scale"):
            scale.append(p)
        elif is_no_decay(name, p):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        {"params": scale, "weight_decay": 0.0, "name": "logit_scale",
         "lr": cfg.logit_scale_lr if cfg.logit_scale_lr is not None else cfg.lr},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(module: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The encoder optimiser named by ``cfg.name`` over :func:`param_groups`.

    Raises:
        ValueError: for an unknown optimiser (listing the valid ones) or a model with nothing to train.
    """
    groups = param_groups(module, cfg)
    if not groups:
        raise ValueError("the model has no parameter with requires_grad=True")
    return OPTIMIZERS.build(cfg.name, groups, cfg)


def _cosine(cfg: SchedulerConfig):
    from composer.optim import CosineAnnealingWithWarmupScheduler

    return CosineAnnealingWithWarmupScheduler(t_warmup=cfg.t_warmup, alpha_f=cfg.alpha_f)


def _linear(cfg: SchedulerConfig):
    from composer.optim import LinearWithWarmupScheduler

    return LinearWithWarmupScheduler(t_warmup=cfg.t_warmup, alpha_f=cfg.alpha_f)


def _constant_warmup(cfg: SchedulerConfig):
    from composer.optim import ConstantWithWarmupScheduler

    return ConstantWithWarmupScheduler(t_warmup=cfg.t_warmup)


def _constant(cfg: SchedulerConfig):
    from composer.optim import ConstantScheduler

    return ConstantScheduler(alpha=1.0)


SCHEDULERS.register("cosine_with_warmup", _cosine)
SCHEDULERS.register("linear_with_warmup", _linear)
SCHEDULERS.register("constant_with_warmup", _constant_warmup)
SCHEDULERS.register("constant", _constant)


def build_scheduler(cfg: SchedulerConfig) -> Optional[Any]:
    """The Composer scheduler named by ``cfg.name``.

    Raises:
        ValueError: for an unknown scheduler, listing the valid ones.
    """
    return SCHEDULERS.build(cfg.name, cfg)
