"""Encoder optimisers and learning-rate schedulers by name, and open_clip's parameter groups.

An ``optimizer`` section is bound against the registered optimiser class itself (torch's
``AdamW``, ``Adam``, ``SGD``; torch-optimizer's ``Lamb``, ``LARS`` ...): its options are that
class's keyword arguments with that class's defaults (``{name: sgd, lr: 0.1, momentum: 0.9}``,
``{name: adamw, lr: 0.002, betas: [0.9, 0.98]}``). The ranges of the common ones are declared once
in :data:`OPTIMIZER_OPTIONS`; the option every optimiser takes beside its own, the logit scale's
learning rate, is declared by :func:`group_options`. A ``scheduler`` section is bound against one
of the functions registered in :data:`SCHEDULERS`, whose signatures carry the options and defaults.
A user's ``imports:`` file adds its own with ``OPTIMIZERS.register("name", MyOptimizer)``.

Composer and torch-optimizer are imported when a recipe names one of theirs.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Optional

from torch import nn

from amortize.options import NONNEGATIVE, POSITIVE, UNIT, Range, RecipeError, TimeString
from amortize.registry import Registry

__all__ = ["OPTIMIZERS", "OPTIMIZER_OPTIONS", "SCHEDULERS", "group_options", "is_no_decay", "param_groups",
           "build_optimizer", "beta2_at_batch", "beta2_half_life", "describe_optimizer", "in_batches", "warmup_note"]


def group_options(logit_scale_lr: Annotated[Optional[float], NONNEGATIVE] = None,
                  beta2_reference_batch: Annotated[Optional[int], POSITIVE] = None) -> None:
    """The options every ``optimizer`` section takes beside its class's own.

    Args:
        logit_scale_lr: the logit scale's learning rate (None: the optimiser's ``lr``; see
            :func:`param_groups`).
        beta2_reference_batch: the global batch at which the section's ``betas[1]`` is right;
            the run's ``beta2`` is then :func:`beta2_at_batch` of it at ``data.batch_size``, so a
            changed batch keeps the second moment's half-life in samples. None: ``betas`` as written.
    """


def beta2_at_batch(beta2: float, reference_batch: int, batch: int) -> float:
    """Adam's ``beta2`` at ``batch`` with the half-life in samples it has at ``reference_batch``.

    ``beta2 ** (batch / reference_batch)`` (Marek et al., NeurIPS 2025, arXiv 2507.07101: small
    batches train as well per sample when the second moment averages over a fixed number of samples,
    not of steps). 0.98 at 256 is 0.99874 at 16.

    Args:
        beta2: the value at ``reference_batch``, in [0, 1).
        reference_batch: the batch it was set for (> 0).
        batch: the run's global batch (> 0).
    """
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"beta2 must be in [0, 1), got {beta2}")
    if reference_batch < 1 or batch < 1:
        raise ValueError(f"batches must be >= 1, got reference_batch={reference_batch}, batch={batch}")
    return float(beta2 ** (batch / reference_batch))


def beta2_half_life(beta2: float, batch: int) -> float:
    """The half-life in samples of Adam's second moment: ``batch * ln(1/2) / ln(beta2)`` (0 for ``beta2 = 0``)."""
    return 0.0 if beta2 == 0.0 else batch * math.log(0.5) / math.log(beta2)


OPTIMIZER_OPTIONS: dict[str, Any] = {
    "lr": Annotated[float, POSITIVE],
    "weight_decay": Annotated[float, NONNEGATIVE],
    "betas": Annotated[list[float], Range(lo=0, hi=1, open_hi=True, length=2)],
    "eps": Annotated[float, POSITIVE],
    "momentum": Annotated[float, Range(lo=0, hi=1, open_hi=True)],
}
"""Types and ranges of the optimiser options most classes share, applied to every registered class
(torch annotates ``lr`` as ``float | Tensor`` and checks its ranges only when constructed)."""

OPTIMIZERS: Registry[Any] = Registry("optimizer", shared=group_options, annotations=OPTIMIZER_OPTIONS)
"""Optimiser classes, called as ``cls(param_groups, **section_options)``."""

for _name, _target in (("adamw", "torch.optim:AdamW"), ("adam", "torch.optim:Adam"), ("sgd", "torch.optim:SGD")):
    OPTIMIZERS.register_import(_name, _target)
for _name, _target in (("lamb", "Lamb"), ("radam", "RAdam"), ("adabelief", "AdaBelief"), ("novograd", "NovoGrad"),
                       ("adamp", "AdamP"), ("lars", "LARS"), ("madgrad", "MADGRAD")):
    OPTIMIZERS.register_import(_name, f"torch_optimizer:{_target}", install="pip install torch-optimizer")


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """open_clip's rule: no weight decay on gains, biases, rank < 2 tensors and the logit scale/bias.

    Args:
        name: the parameter's qualified name.
        param: the parameter.
    """
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def param_groups(module: nn.Module, weight_decay: float, logit_scale_lr: Optional[float] = None) -> list[dict[str, Any]]:
    """Parameter groups as open_clip forms them, from the parameters that require grad.

    Groups (empty ones dropped): ``decay`` (weight decay ``weight_decay``), ``no_decay`` (gains,
    biases, embeddings of rank < 2, the logit bias; no decay) and ``logit_scale`` (no decay,
    learning rate ``logit_scale_lr``, or the optimiser's when None). Amortizer networks and the
    parameters of locked towers (``model.lock_image`` / ``model.lock_text``) have
    ``requires_grad=False`` and so are in no group: no update and no weight decay touches them,
    and as they never get a gradient, gradient clipping's norm is over the trainable ones only.

    Args:
        module: the model (its ``named_parameters`` are grouped).
        weight_decay: the decayed group's weight decay (the section's ``weight_decay``).
        logit_scale_lr: the logit scale's learning rate (None: the optimiser's ``lr``).

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
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        {"params": scale, "weight_decay": 0.0, "name": "logit_scale",
         **({"lr": logit_scale_lr} if logit_scale_lr is not None else {})},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(module: nn.Module, section: Any, batch_size: Optional[int] = None) -> Any:
    """The encoder optimiser of an ``optimizer`` section over :func:`param_groups`.

    Args:
        module: the model whose trainable parameters are grouped.
        section: the recipe's bound section (:class:`~amortize.registry.Bound`), or a section
            (``{name: adamw, lr: 0.002}``), bound here.
        batch_size: the run's global batch, for ``beta2_reference_batch``.

    Raises:
        RecipeError: under ``optimizer`` for an unknown optimiser (listing the valid ones), a bad
            option, ``beta2_reference_batch`` with an optimiser without ``betas`` or no batch
            known, or a model with nothing to train.
    """
    from amortize.registry import Bound
    from amortize.train.sections import bind_section

    bound = section if isinstance(section, Bound) else bind_section("optimizer", section)
    shared = dict(bound.shared)
    reference = shared.pop("beta2_reference_batch", None)
    if reference is not None:
        betas = bound.resolved.get("betas")
        if betas is None:
            raise RecipeError(f"beta2_reference_batch scales Adam's betas, and optimizer {bound.name!r} has none; "
                              "remove it", key=f"{bound.key}.beta2_reference_batch")
        if batch_size is None:
            raise RecipeError("beta2_reference_batch needs the run's batch size, which is not known here",
                              key=f"{bound.key}.beta2_reference_batch")
        bound = bound.with_parts(betas=(float(betas[0]), beta2_at_batch(float(betas[1]), reference, batch_size)))
    groups = param_groups(module, bound.resolved.get("weight_decay", 0.0), **shared)
    if not groups:
        raise RecipeError("the model has no parameter with requires_grad=True", key=bound.key)
    return bound.build(groups)


def describe_optimizer(optimizer: Any, batch_size: Optional[int] = None) -> str:
    """One line naming the optimiser, its lr and, where it has them, its betas with beta2's half-life in samples.

    The lr is the one the recipe set (a scheduler's ``initial_lr``), not the schedule's value at step 0
    (0 at the start of a warm-up)."""
    group = optimizer.param_groups[0]
    out = f"{type(optimizer).__name__} (lr {group.get('initial_lr', group['lr']):g}"
    betas = group.get("betas")
    if betas is not None:
        out += f", betas {betas[0]:g} / {betas[1]:.6g}"
        if batch_size:
            out += f": beta2's half-life {beta2_half_life(betas[1], batch_size):,.0f} samples at batch {batch_size}"
    return out + ")"


_WARMUP = TimeString(("ep", "ba", "sp", "dur"), positive=False)


def cosine_with_warmup(t_warmup: Annotated[str, _WARMUP] = "0ba", alpha_f: Annotated[float, UNIT] = 0.0):
    """Composer's ``CosineAnnealingWithWarmupScheduler``: linear warmup for ``t_warmup`` (a time
    string: ``10000ba``, ``1ep``), then a cosine to ``alpha_f`` times the learning rate."""
    from composer.optim import CosineAnnealingWithWarmupScheduler

    return CosineAnnealingWithWarmupScheduler(t_warmup=t_warmup, alpha_f=alpha_f)


def linear_with_warmup(t_warmup: Annotated[str, _WARMUP] = "0ba", alpha_f: Annotated[float, UNIT] = 0.0):
    """Composer's ``LinearWithWarmupScheduler``: warmup for ``t_warmup``, then linear to ``alpha_f``."""
    from composer.optim import LinearWithWarmupScheduler

    return LinearWithWarmupScheduler(t_warmup=t_warmup, alpha_f=alpha_f)


def constant_with_warmup(t_warmup: Annotated[str, _WARMUP] = "0ba"):
    """Composer's ``ConstantWithWarmupScheduler``: warmup for ``t_warmup``, then constant."""
    from composer.optim import ConstantWithWarmupScheduler

    return ConstantWithWarmupScheduler(t_warmup=t_warmup)


def constant():
    """Composer's ``ConstantScheduler``: the optimiser's learning rate throughout."""
    from composer.optim import ConstantScheduler

    return ConstantScheduler(alpha=1.0)


SCHEDULERS: Registry[Any] = Registry("scheduler")
"""Learning-rate schedules (Composer schedulers, stepped every batch), each a function of its options."""

for _fn in (cosine_with_warmup, linear_with_warmup, constant_with_warmup, constant):
    SCHEDULERS.register(_fn.__name__, _fn)


def in_batches(time: str, batches_per_epoch: Optional[int], batch_size: int, total: Optional[float] = None) -> Optional[float]:
    """A Composer time string (``20ba``, ``2ep``, ``512sp``, ``0.1dur``) in batches, or None when
    it cannot be known here (epochs of a loader of unknown length; ``dur`` without ``total``).

    Args:
        time: the time string (checked already: a number and a unit).
        batches_per_epoch: the training loader's length, or None.
        batch_size: the global batch, for samples.
        total: the run's length in batches, for ``dur``.
    """
    import re

    m = re.fullmatch(r"\s*(-?[0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*([a-z]+)\s*", str(time))
    if m is None:
        return None
    n, unit = float(m.group(1)), m.group(2)
    if unit == "ba":
        return n
    if unit == "sp":
        return n / batch_size
    if unit == "ep":
        return None if batches_per_epoch is None else n * batches_per_epoch
    if unit == "dur":
        return None if total is None else n * total
    return None


def warmup_note(t_warmup: Optional[str], max_duration: str, batches_per_epoch: Optional[int],
                batch_size: int) -> Optional[str]:
    """A line saying that the warm-up does not end before the run does (the lr never reaches the
    optimiser's), or None.

    Args:
        t_warmup: the scheduler's warm-up (None: the scheduler has none).
        max_duration: the run's length.
        batches_per_epoch: the training loader's length (None: unknown).
        batch_size: the global batch.
    """
    if t_warmup is None:
        return None
    total = in_batches(max_duration, batches_per_epoch, batch_size)
    warm = in_batches(t_warmup, batches_per_epoch, batch_size, total)
    if total is None or warm is None or warm < total:
        return None
    return (f"scheduler.t_warmup={t_warmup} ({warm:,.0f} batches) does not end before the run does "
            f"(max_duration={max_duration}, {total:,.0f} batches): the learning rate never reaches optimizer.lr; "
            f"set a shorter scheduler.t_warmup")
