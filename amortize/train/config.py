"""The recipe schema: typed dataclasses, a safe YAML loader, ``key.sub=value`` overrides.

A recipe is YAML read with a safe loader (:func:`read_yaml`: no Python objects can be named, and
``2e-3`` is a float as in YAML 1.2, not a string as in YAML 1.1) and checked
against :class:`Recipe` at load time: an unknown key fails with its dotted name and the valid
keys, a mistyped value with its name, the expected type and what it got. Keys that Composer's
``Trainer`` names keep its names (``max_duration``, ``seed``, ``save_folder``, ``save_interval``,
``precision``, ``device_train_microbatch_size`` ...), so ``max_duration=20ba`` shortens any recipe.

This module imports neither Composer nor open_clip.

>>> r = load_recipe_dict({"max_duration": "20ba", "loss": {"objective": "infonce"}})
>>> r.max_duration, r.loss.objective
('20ba', 'infonce')

The loss section chooses components by name with their constructor options, as in llm-foundry:
``loss.objective: {name: linearized, pos_weight: 0.001}``, ``loss.estimator: {name: amortized,
lr: 0.001, amortizer: {name: residual_mlp, width_factor: 0.5}}``. Such a section is checked
against the registered constructor's signature at load time; its defaults live only in the
constructor. A recipe's top-level ``imports:`` lists Python files (relative to the recipe) or
modules imported before the recipe is checked, so that their registrations are visible.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

__all__ = [
    "RecipeError",
    "Range",
    "TimeString",
    "TowerLock",
    "ModelConfig",
    "LossConfig",
    "DataConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "EvalConfig",
    "DivergenceConfig",
    "Recipe",
    "load_recipe",
    "load_recipe_dict",
    "apply_overrides",
    "check_unique_overrides",
    "recipe_to_dict",
    "recipe_to_yaml",
    "run_imports",
    "read_yaml",
]

ScheduleSpec = Union[float, dict, None]
"""A float (constant) or a schedule section ``{"name": ..., ...}`` (see :func:`amortize.schedules.build_schedule`)."""

SectionSpec = Union[str, dict]
"""A component section: a registered name, or ``{"name": ..., <constructor options>}``."""

# Values whose allowed set is known here; the registries check the others when building.
_CHOICES: dict[str, tuple[str, ...]] = {
    "precision": ("fp32", "amp_fp16", "amp_bf16"),
    "device": ("cpu", "gpu", "mps"),
    "data.sampling": ("split", "resampled"),
    "divergence.policy": ("skip", "stop", "none"),
    "load_mode": ("full", "weights"),
}


# Keys of recipes written before 0.2, and where their values live now.
_MOVED: dict[str, str] = {
    "loss.amortizer": "loss.estimator (with name: amortized; 'network' and 'width_factor' go into its "
                      "amortizer section, e.g. amortizer: {name: residual_mlp, width_factor: 0.5})",
    "loss.moving_average": "loss.estimator (with name: moving_average)",
    "loss.pos_weight": "loss.objective (e.g. objective: {name: linearized, pos_weight: 0.001})",
    "loss.distributed": "loss.layout",
    "max_logit_scale": "max_scale",
}


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads exponent floats without a dot (``2e-3``, ``1e5``) as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(text: str) -> Any:
    """Parse YAML safely (plain data only); ``2e-3`` is the float 0.002, as in YAML 1.2.

    Raises:
        yaml.YAMLError: for invalid YAML or a tag that names a Python object.
    """
    return yaml.load(text, Loader=_Loader)


class RecipeError(ValueError):
    """A recipe key or value is invalid; the message names the dotted key."""


@dataclass(frozen=True)
class Range:
    """The allowed interval of a numeric recipe option, declared next to the option.

    ``lo``/``hi`` are bounds (None: unbounded); ``open_lo``/``open_hi`` exclude them. A list value
    (``optimizer.betas``) is checked element by element, and ``length`` fixes its length.

    >>> Range(lo=0, open_lo=True).check(-1.0, "optimizer.lr")
    Traceback (most recent call last):
    ...
    amortize.train.config.RecipeError: optimizer.lr: must be > 0, got -1.0
    """

    lo: Optional[float] = None
    hi: Optional[float] = None
    open_lo: bool = False
    open_hi: bool = False
    length: Optional[int] = None

    def describe(self) -> str:
        """``> 0``, ``>= 0``, ``in [0, 1)`` ..."""
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.open_lo else '['}{self.lo:g}, {self.hi:g}{')' if self.open_hi else ']'}"
        if self.lo is not None:
            return f"{'>' if self.open_lo else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{'<' if self.open_hi else '<='} {self.hi:g}"
        return "any number"

    def _ok(self, v: float) -> bool:
        if v != v:  # NaN
            return False
        if self.lo is not None and (v <= self.lo if self.open_lo else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.open_hi else v > self.hi))

    def check(self, value: Any, key: str) -> None:
        """Raise :class:`RecipeError` naming ``key`` when ``value`` (not None) is outside the range."""
        if value is None:
            return
        if isinstance(value, list):
            if self.length is not None and len(value) != self.length:
                raise RecipeError(f"{key}: expected {self.length} values, got {len(value)}: {value!r}")
            for i, v in enumerate(value):
                self.check(v, f"{key}[{i}]")
            return
        if not self._ok(float(value)):
            raise RecipeError(f"{key}: must be {self.describe()}, got {value!r}")


_TIME_UNITS = {"ep": "epochs", "ba": "batches", "sp": "samples", "dur": "fraction of the run"}


@dataclass(frozen=True)
class TimeString:
    """A Composer time string option (``30ep``, ``20ba``): its allowed units and whether 0 is allowed.

    Checked here without importing Composer, so ``--dry-run`` refuses ``banana`` or ``-5ep``.
    """

    units: tuple[str, ...] = ("ep", "ba", "sp")
    positive: bool = True

    def check(self, value: Any, key: str) -> None:
        """Raise :class:`RecipeError` naming ``key`` when ``value`` is not a valid time string."""
        import re

        m = re.fullmatch(r"\s*(-?[0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*([a-z]+)\s*", str(value))
        example = " or ".join(f"10{u}" for u in self.units)
        if not m or m.group(2) not in self.units:
            raise RecipeError(f"{key}: {value!r} is not a time string; write a number and a unit "
                              f"({', '.join(f'{u} = {_TIME_UNITS[u]}' for u in self.units)}), e.g. {example}")
        number, unit = float(m.group(1)), m.group(2)
        if unit in ("ep", "ba", "sp") and number != int(number):
            raise RecipeError(f"{key}: {value!r} must be a whole number of {_TIME_UNITS[unit]}")
        if number < 0 or (self.positive and number == 0):
            raise RecipeError(f"{key}: must be {'> 0' if self.positive else '>= 0'}, got {value!r}")


def _opt(default: Any = dataclasses.MISSING, *, check: Any = None, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose allowed values (a :class:`Range` or :class:`TimeString`) sit beside it."""
    meta = {"check": check} if check is not None else {}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


_POS = Range(lo=0, open_lo=True)
_NONNEG = Range(lo=0)
_UNIT = Range(lo=0, hi=1)


@dataclass
class TowerLock:
    """A locked tower, as open_clip's LiT options (see :mod:`amortize.interop.pretrained`).

    Attributes:
        unlocked_groups: groups left trainable, counted from the output end (0: the whole tower is locked).
        freeze_norm: keep the tower's norm layers (and batch-norm statistics) frozen in unlocked groups too.
    """

    unlocked_groups: int = _opt(0, check=Range(lo=0))
    freeze_norm: bool = False


@dataclass
class ModelConfig:
    """The two-tower model.

    Attributes:
        name: a model config name: ``tiny``, ``cpu-small`` or an open_clip name (``RN50``, ``ViT-B-32``).
        image_size: override of the vision tower's input side (None: the config's).
        context_length: override of the text tower's token positions (None: the config's).
        init_logit_scale: initial ``log s`` (the model's parameter is ``log s``); None: the
            objective's preference (``log 10`` for ``sigmoid``), else ``log(1/0.07)``. The loader
            writes the resolved value into the recipe.
        init_logit_bias: initial bias; None: the objective's preference (-10 for ``sigmoid``), else
            no bias.
        pretrained: start from these weights (an open_clip checkpoint or state dict, an ``amortize
            export`` folder, a ``model.pt`` or run folder; a relative path is read from the working
            directory, as ``save_folder``); they must fit the model key by key.
        lock_image: lock the image tower (``{unlocked_groups: N, freeze_norm: bool}``; None: train it).
        lock_text: lock the text tower the same way.
    """

    name: str = "tiny"
    image_size: Optional[int] = None
    context_length: Optional[int] = None
    init_logit_scale: Optional[float] = None
    init_logit_bias: Optional[float] = None
    pretrained: Optional[str] = None
    lock_image: Optional[TowerLock] = None
    lock_text: Optional[TowerLock] = None


@dataclass
class LossConfig:
    """The objective, its partition-function estimator and the process layout (see :class:`amortize.losses.ContrastiveLoss`).

    Attributes:
        objective: a section naming a registered objective (:data:`amortize.objectives.OBJECTIVES`:
            ``infonce`` for CLIP, ``sigmoid`` for SigLIP, ``linearized``) with its options, e.g.
            ``{name: linearized, pos_weight: 0.001}``.
        estimator: for objectives that take normalisers (``linearized``), a section naming a
            registered estimator (:data:`amortize.estimators.ESTIMATORS`: ``in_batch``,
            ``moving_average`` for SogCLR/FastCLIP, ``amortized`` for AmorLIP) with its options;
            None: in-batch. The builder passes ``dim`` (the embedding width) and ``num_samples``
            (the dataset size) to constructors that take them, unless the section sets them.
        layout: how negatives travel between processes: ``gather``, ``ring`` or ``local``.
        rho: temperature-rescaling schedule (FastCLIP/AmorLIP), or None.
        chunk_size: rows per chunk (exact, ``O(B * chunk)`` memory), or None (one chunk).
    """

    objective: SectionSpec = "linearized"
    estimator: Optional[SectionSpec] = None
    layout: str = "gather"
    rho: ScheduleSpec = None
    chunk_size: Optional[int] = None


@dataclass
class DataConfig:
    """The training data.

    Attributes:
        name: a registered dataset: ``shipped`` (Fashion-MNIST + emoji, in the package),
            ``webdataset`` (img2dataset shards) or ``synthetic`` (random tensors, for tests).
        batch_size: the GLOBAL batch size (split evenly over processes).
        shards: brace pattern of ``.tar`` shards (``webdataset``), e.g. ``/data/cc3m/{00000..00331}.tar``.
        num_samples: dataset size (``webdataset``: for the moving averages and epoch length;
            ``synthetic``: how many samples).
        num_workers: DataLoader worker processes.
        shuffle_buffer: webdataset sample shuffle buffer.
        tokenizer: open_clip tokenizer name, or ``simple`` (the bundled CLIP BPE).
        drop_last: drop an incomplete final batch (keep True: contrastive batches should be full).
        max_skip_fraction: (``webdataset``) largest tolerated fraction of skipped samples, and of
            unreadable shards; past it the run stops with ``TooManySkippedError``.
        skip_min_seen: (``webdataset``) samples seen before the fraction is checked.
        sampling: (``webdataset``) ``split``: each epoch reads every shard once, shards split over
            nodes and workers; ``resampled``: every worker draws shards with replacement and an
            epoch is ``num_samples / batch_size`` batches (multi-node runs, uneven shard counts).
    """

    name: str = "shipped"
    batch_size: int = _opt(256, check=Range(lo=2))
    shards: Optional[str] = None
    num_samples: Optional[int] = _opt(None, check=Range(lo=1))
    num_workers: int = _opt(0, check=_NONNEG)
    shuffle_buffer: int = _opt(1000, check=_NONNEG)
    tokenizer: str = "simple"
    drop_last: bool = True
    max_skip_fraction: float = _opt(0.05, check=_UNIT)
    skip_min_seen: int = _opt(100, check=_NONNEG)
    sampling: str = "split"


@dataclass
class DivergenceConfig:
    """What happens on a non-finite loss or gradient (see :class:`amortize.train.guards.DivergenceGuard`).

    Attributes:
        policy: ``skip`` the step (no parameter, optimiser or estimator change), ``stop`` the run
            with a message and a checkpoint of the last good state, or ``none`` (no check).
        max_consecutive_skips: with ``skip``, stop after this many non-finite steps in a row (0: never).
        restore_estimator: roll the estimator's state back on a non-finite step (one copy of it per step).
    """

    policy: str = "skip"
    max_consecutive_skips: int = _opt(10, check=_NONNEG)
    restore_estimator: bool = True


@dataclass
class OptimizerConfig:
    """The encoder optimiser, with open_clip's parameter groups.

    Gains, biases, embeddings of rank < 2 and the logit scale get no weight decay; the logit
    scale has its own learning rate. Parameters with ``requires_grad=False`` (the amortizers) are
    never in the groups.

    Attributes:
        name: ``adamw``, ``adam``, ``sgd`` (torch) or ``lamb``, ``radam``, ``adabelief``,
            ``novograd``, ``lars`` ... (torch-optimizer, see :data:`amortize.train.optim.OPTIMIZERS`).
        lr: base learning rate.
        weight_decay: decoupled weight decay of the decayed group.
        betas: Adam-style betas.
        eps: Adam-style epsilon.
        momentum: SGD-style momentum (``sgd``).
        logit_scale_lr: the logit scale's learning rate (None: ``lr``).
    """

    name: str = "adamw"
    lr: float = _opt(1e-3, check=_POS)
    weight_decay: float = _opt(0.2, check=_NONNEG)
    betas: list[float] = _opt(factory=lambda: [0.9, 0.999], check=Range(lo=0, hi=1, open_hi=True, length=2))
    eps: float = _opt(1e-8, check=_POS)
    momentum: float = _opt(0.9, check=Range(lo=0, hi=1, open_hi=True))
    logit_scale_lr: Optional[float] = _opt(None, check=_NONNEG)


@dataclass
class SchedulerConfig:
    """The learning-rate schedule (Composer schedulers, stepped every batch).

    Attributes:
        name: ``cosine_with_warmup``, ``linear_with_warmup``, ``constant_with_warmup`` or ``constant``.
        t_warmup: warmup length as a Composer time string (``10000ba``, ``1ep``).
        alpha_f: final learning-rate multiplier.
    """

    name: str = "cosine_with_warmup"
    t_warmup: str = _opt("0ba", check=TimeString(("ep", "ba", "sp", "dur"), positive=False))
    alpha_f: float = _opt(0.0, check=_UNIT)


@dataclass
class EvalConfig:
    """Evaluation during training and by ``amortize eval``.

    Attributes:
        tasks: ``default`` (Fashion-MNIST zero-shot and emoji retrieval), ``none``, or a list of
            sections of :data:`amortize.eval.user.EVAL_TASKS` (your files), e.g.
            ``[{name: retrieval, path: pairs.csv}, {name: zeroshot, path: classes/}, default]``. The
            DataComp suite needs its data directory: run ``amortize eval CKPT --tasks datacomp --datacomp-root DIR``.
        every_n_epochs: evaluate at the end of every n-th epoch (0: never during training).
        every_n_batches: evaluate after every n-th batch (0: never).
        at_fit_end: evaluate when training ends (``default`` tasks only).
        batch_size: images or texts per forward pass.
    """

    tasks: Union[str, list[Any]] = "none"
    every_n_epochs: int = _opt(0, check=_NONNEG)
    every_n_batches: int = _opt(0, check=_NONNEG)
    at_fit_end: bool = False
    batch_size: int = _opt(256, check=Range(lo=1))


@dataclass
class Recipe:
    """A training recipe.

    Attributes:
        run_name: Composer's run name (also the default checkpoint folder ``runs/<run_name>``).
        method: a free-form label of the method (``amorlip-log-l2``, ``clip`` ...) for reports.
        model: the two-tower model.
        loss: objective and estimator.
        data: training data.
        optimizer: encoder optimiser.
        scheduler: learning-rate schedule.
        eval: evaluation.
        divergence: what a non-finite loss or gradient does.
        max_duration: Composer time string (``30ep``, ``20ba``).
        seed: global seed (weights, data order, amortizer re-initialisation).
        precision: ``fp32``, ``amp_bf16`` or ``amp_fp16`` (None: Composer's default for the device).
        device: ``cpu``, ``gpu`` or None (Composer picks).
        device_train_microbatch_size: rows per microbatch of the exact gradient cache (None: the
            whole per-process batch at once). Smaller than the per-process batch, the encoders run
            on microbatches of this size (peak memory of their activations falls with it) while the
            loss still sees every negative; see :mod:`amortize.train.gradcache`.
        grad_clip_norm: encoder gradient-norm clip (None: none).
        imports: Python files (relative to the recipe file) or module names imported before the
            recipe is checked, so that the components they register can be named (stored resolved).
        max_scale: clamp of the inverse temperature ``s`` (not ``log s``) after every optimiser step.
        save_folder: checkpoint folder (None: ``runs/<run_name>``).
        save_interval: Composer time string between checkpoints.
        save_filename: Composer's checkpoint file name pattern.
        save_latest_filename: Composer's name of the latest-checkpoint link.
        save_overwrite: replace the run already in ``save_folder`` (its checkpoints, ``latest`` and
            ``model.pt`` are removed first). Without it, a folder that holds a run is refused unless
            ``autoresume`` continues it.
        save_num_checkpoints_to_keep: Composer's retention (-1: all).
        load_path: start from this checkpoint (see ``load_mode``); refused when it was written by
            another recipe (method, model, loss or optimizer differ) unless ``load_mode`` is ``weights``.
        load_mode: ``full`` (weights, optimizer, schedules, step count: continue that run) or
            ``weights`` (the encoder weights only; everything else starts fresh).
        autoresume: resume from the latest checkpoint in ``save_folder`` when there is one.
        deterministic_mode: Composer's deterministic mode (deterministic kernels).
        progress_bar: Composer's progress bar.
        log_to_console: Composer's console logger.
        console_log_interval: Composer time string between console logs.
    """

    run_name: str = "default"
    method: str = "custom"
    imports: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    max_duration: str = _opt("1ep", check=TimeString())
    seed: int = _opt(0, check=_NONNEG)
    precision: Optional[str] = None
    device: Optional[str] = None
    device_train_microbatch_size: Optional[int] = None
    grad_clip_norm: Optional[float] = _opt(1.0, check=_POS)
    max_scale: float = _opt(100.0, check=_POS)
    save_folder: Optional[str] = None
    save_interval: str = _opt("1ep", check=TimeString())
    save_filename: str = "ep{epoch}-ba{batch}-rank{rank}.pt"
    save_latest_filename: str = "latest-rank{rank}.pt"
    save_overwrite: bool = False
    save_num_checkpoints_to_keep: int = _opt(-1, check=Range(lo=-1))
    load_path: Optional[str] = None
    load_mode: str = "full"
    autoresume: bool = False
    deterministic_mode: bool = False
    progress_bar: bool = False
    log_to_console: bool = True
    console_log_interval: str = _opt("10ba", check=TimeString())

    def resolved_save_folder(self) -> str:
        """``save_folder``, or ``runs/<run_name>`` when unset."""
        return self.save_folder if self.save_folder is not None else f"runs/{self.run_name}"


# ------------------------------------------------------------------------------------- checking


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(arg)}"
    if tp is dict or origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted (int -> float ...)."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, key)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, dict) and any(dataclasses.is_dataclass(a) for a in args):  # Optional[section]: its own errors
            return _convert(value, next(a for a in args if dataclasses.is_dataclass(a)), key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except RecipeError:
                continue
        raise RecipeError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return [_convert(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise RecipeError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if key in _MOVED:
            raise RecipeError(f"{key!r} moved in 0.2: use {_MOVED[key]}; see CHANGELOG.md")
        if k not in hints or k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"unknown key {key!r}{hint}; valid keys{' of ' + prefix if prefix else ''}: {', '.join(names)}")
        value = _convert(v, hints[k], key)
        if key in _CHOICES and value is not None and value not in _CHOICES[key]:
            raise RecipeError(f"{key}: {value!r} is not one of {', '.join(_CHOICES[key])}")
        kwargs[k] = value
    obj = cls(**kwargs)
    for f in fields.values():  # defaults included: a range declared next to an option holds for every value
        check = f.metadata.get("check")
        if check is not None:
            check.check(getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name)
    return obj


def _check_loss(r: Recipe) -> None:
    """Check the loss sections against the registries and resolve the model's initial logit parameters."""
    from amortize.comm import LAYOUTS
    from amortize.estimators import ESTIMATORS
    from amortize.objectives import OBJECTIVES
    from amortize.registry import SectionError
    from amortize.schedules import build_schedule

    c = r.loss
    try:
        name, _ = OBJECTIVES.check_section(c.objective, "loss.objective")
        objective = OBJECTIVES.get(name)
        if c.estimator is not None:
            ESTIMATORS.check_section(c.estimator, "loss.estimator")
        LAYOUTS.get(c.layout)
    except SectionError as e:
        msg = str(e)
        raise RecipeError(msg if msg.startswith("loss.") else f"loss.layout: {msg}") from None
    check_parts = getattr(objective, "check_parts", None)  # a registered factory need not be an Objective
    if check_parts is not None:
        for key, kwargs in (("loss.layout", {"layout": c.layout}), ("loss.estimator", {"estimator": c.estimator is not None})):
            try:
                check_parts(**kwargs)
            except ValueError as e:
                raise RecipeError(f"{key}: {e}") from None
    try:
        build_schedule(c.rho)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"loss.rho: {e}") from None
    _trial_build(c)
    m = r.model
    if m.init_logit_scale is None:
        pref = getattr(objective, "init_logit_scale", None)
        m.init_logit_scale = float(pref) if pref is not None else math.log(1 / 0.07)
    if m.init_logit_bias is None and getattr(objective, "init_logit_bias", None) is not None:
        m.init_logit_bias = float(objective.init_logit_bias)


def _trial_build(c: LossConfig) -> None:
    """Build the objective and the estimator once, small, so that a bad value fails at load time.

    The estimator gets ``dim=8`` and ``num_samples=1`` where its constructor takes them and the
    section does not set them (the real values are known only when the model and data are built).
    """
    from amortize.losses import ContrastiveLoss

    try:
        ContrastiveLoss.from_sections(c.objective, c.estimator, layout=c.layout, rho=c.rho, chunk_size=c.chunk_size,
                                      context={"dim": 8, "num_samples": 1})
    except (TypeError, ValueError) as e:
        msg = str(e)
        raise RecipeError(msg if msg.startswith("loss") else f"loss: {msg}") from None


def _check_consistency(r: Recipe) -> None:
    _check_loss(r)
    from amortize.eval.user import check_task_sections  # eval.tasks sections (issue 20)
    from amortize.registry import SectionError

    try:
        check_task_sections(r.eval.tasks)
    except SectionError as e:
        raise RecipeError(str(e)) from None
    if r.data.batch_size < 2:
        raise RecipeError(f"data.batch_size must be >= 2 for contrastive training, got {r.data.batch_size}")
    mb = r.device_train_microbatch_size
    if mb is not None and mb < 1:
        raise RecipeError(f"device_train_microbatch_size must be >= 1 or null, got {mb}")
    if r.loss.chunk_size is not None and r.loss.chunk_size < 1:
        raise RecipeError(f"loss.chunk_size must be >= 1 or null, got {r.loss.chunk_size}")
    if r.data.sampling == "resampled" and r.data.name == "webdataset" and not r.data.num_samples:
        raise RecipeError("data.sampling 'resampled' needs data.num_samples (it sets the epoch length)")


def run_imports(imports: list, base: Optional[Path] = None) -> list[str]:
    """Import a recipe's ``imports:`` so that their registrations are visible; return them resolved.

    Args:
        imports: Python files (``.py``, relative to ``base``) or module names.
        base: the recipe file's folder (None: the working directory).

    Returns:
        The entries with files made absolute (what the stored recipe keeps).

    Raises:
        RecipeError: naming an entry that is not a string, a missing file, or an import that failed.
    """
    import hashlib
    import importlib
    import importlib.util
    import sys

    resolved = []
    for i, entry in enumerate(imports or []):
        key = f"imports[{i}]"
        if not isinstance(entry, str) or not entry:
            raise RecipeError(f"{key}: expected a Python file or a module name, got {entry!r}")
        if entry.endswith(".py") or "/" in entry or "\\" in entry:
            path = Path(entry).expanduser()
            if not path.is_absolute():
                path = (base or Path.cwd()) / path
            path = path.resolve()
            if not path.is_file():
                raise RecipeError(f"{key}: {entry!r} does not exist (looked for {path})")
            name = f"amortize_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
            if name not in sys.modules:
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except Exception as e:
                    del sys.modules[name]
                    raise RecipeError(f"{key}: importing {path} failed: {type(e).__name__}: {e}") from None
            resolved.append(str(path))
        else:
            try:
                importlib.import_module(entry)
            except Exception as e:
                raise RecipeError(f"{key}: importing module {entry!r} failed: {type(e).__name__}: {e}") from None
            resolved.append(entry)
    return resolved


def load_recipe_dict(data: Optional[dict], base: Optional[Path] = None) -> Recipe:
    """Run a parsed recipe's ``imports`` and check the mapping against :class:`Recipe`.

    Args:
        data: the mapping (e.g. ``yaml.safe_load`` output); None is the all-defaults recipe.
        base: the folder relative file ``imports`` are read from (None: the working directory).

    Returns:
        The typed :class:`Recipe`.

    Raises:
        RecipeError: naming the offending dotted key, with the valid keys or the expected type.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a mapping at the top level, got {type(data).__name__}")
    data = dict(data)
    if "imports" in data:
        if not isinstance(data["imports"], list):
            raise RecipeError(f"imports: expected a list of files or modules, got {data['imports']!r}")
        data["imports"] = run_imports(data["imports"], base)
    recipe = _build(Recipe, data)
    _check_consistency(recipe)
    return recipe


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise RecipeError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {item!r} has an empty key")
    try:
        value = read_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise RecipeError(f"override {item!r}: cannot parse the value: {e}") from None
    return key.split("."), value


def check_unique_overrides(overrides: list[str]) -> None:
    """Refuse a key given twice on one command line.

    A shell expands an unquoted brace pattern (``data.shards=/d/{00000..00331}.tar``) into one
    override per shard, and the last would silently win. Programmatic callers may repeat keys
    (later wins); the command line may not.

    Raises:
        RecipeError: naming the repeated key and how to quote the pattern.
    """
    seen: set[str] = set()
    for item in overrides:
        dotted = ".".join(_parse_override(item)[0])
        if dotted in seen:
            raise RecipeError(
                f"override key {dotted!r} is given twice; give each key once (if your shell expanded a brace "
                "pattern, quote it: 'data.shards=/data/cc3m/{00000..00331}.tar')"
            )
        seen.add(dotted)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a recipe mapping.

    Args:
        data: a parsed recipe mapping (not modified).
        overrides: e.g. ``["max_duration=20ba", "loss.estimator.lr=0.002"]``.

    Returns:
        A new mapping; keys are checked later by :func:`load_recipe_dict`.
    """
    import copy

    out = copy.deepcopy(data) if data else {}
    for item in overrides:
        path, value = _parse_override(item)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif isinstance(nxt, str):  # a section given by name: `loss.estimator.lr=...` adds an option
                nxt = node[part] = {"name": nxt}
            if not isinstance(nxt, dict):
                raise RecipeError(f"override {item!r}: {part!r} is not a mapping")
            node = nxt
        node[path[-1]] = value
    return out


def load_recipe(path: Union[str, Path], overrides: Optional[list[str]] = None) -> Recipe:
    """Read a YAML recipe safely, apply overrides and check it.

    Args:
        path: the ``.yaml`` file.
        overrides: ``key.sub=value`` strings.

    Returns:
        The typed :class:`Recipe`.

    Raises:
        FileNotFoundError: if the file does not exist.
        RecipeError: for an invalid key or value (named), or invalid YAML.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    try:
        data = read_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: invalid YAML: {e}") from None
    if data is None or data == {}:
        raise RecipeError(f"{path} is empty; a recipe names at least its run (start from a file in recipes/, "
                          "e.g. recipes/default.yaml)")
    try:
        return load_recipe_dict(apply_overrides(data, list(overrides or [])), base=path.parent)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None


def recipe_to_dict(recipe: Recipe) -> dict:
    """The recipe as plain Python (dicts, lists, str, int, float, bool, None)."""
    return dataclasses.asdict(recipe)


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML text (round-trips through :func:`load_recipe_dict`)."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
