"""The recipe schema: typed dataclasses, a safe YAML loader, ``key.sub=value`` overrides.

A recipe is YAML read with :func:`yaml.safe_load` (no Python objects can be named) and checked
against :class:`Recipe` at load time: an unknown key fails with its dotted name and the valid
keys, a mistyped value with its name, the expected type and what it got. Keys that Composer's
``Trainer`` names keep its names (``max_duration``, ``seed``, ``save_folder``, ``save_interval``,
``precision``, ``device_train_microbatch_size`` ...), so ``max_duration=20ba`` shortens any recipe.

This module imports neither Composer nor open_clip.

>>> r = load_recipe_dict({"max_duration": "20ba", "loss": {"objective": "infonce"}})
>>> r.max_duration, r.loss.objective
('20ba', 'infonce')
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

__all__ = [
    "RecipeError",
    "ModelConfig",
    "MovingAverageConfig",
    "AmortizerConfig",
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
]

ScheduleSpec = Union[float, dict, None]
"""A float (constant) or a schedule dict ``{"kind": ..., ...}`` (see :func:`amortize.schedules.build_schedule`)."""

# Values whose allowed set is known here; the registries check the others when building.
_CHOICES: dict[str, tuple[str, ...]] = {
    "loss.objective": ("infonce", "sigmoid", "amortized"),
    "loss.estimator": ("in_batch", "moving_average", "amortized"),
    "loss.distributed": ("gather", "ring", "local"),
    "loss.moving_average.init": ("first_batch", "zero"),
    "loss.amortizer.normalizer": ("previous_blend", "ema_target"),
    "loss.amortizer.reinit": ("every_epoch", "never"),
    "precision": ("fp32", "amp_fp16", "amp_bf16"),
    "data.sampling": ("split", "resampled"),
    "eval.tasks": ("default", "none"),
    "divergence.policy": ("skip", "stop", "none"),
}


class RecipeError(ValueError):
    """A recipe key or value is invalid; the message names the dotted key."""


@dataclass
class ModelConfig:
    """The two-tower model.

    Attributes:
        name: a model config name: ``tiny``, ``cpu-small`` or an open_clip name (``RN50``, ``ViT-B-32``).
        image_size: override of the vision tower's input side (None: the config's).
        context_length: override of the text tower's token positions (None: the config's).
        init_logit_scale: initial ``log s``; None: ``log(1/0.07)``, or ``log 10`` for ``sigmoid``.
        init_logit_bias: initial bias; None: no bias, or -10 for ``sigmoid``.
    """

    name: str = "tiny"
    image_size: Optional[int] = None
    context_length: Optional[int] = None
    init_logit_scale: Optional[float] = None
    init_logit_bias: Optional[float] = None


@dataclass
class MovingAverageConfig:
    """Options of the ``moving_average`` estimator (SogCLR / FastCLIP).

    Attributes:
        gamma: weight of the new batch estimate: a float or a schedule over epochs (FastCLIP:
            ``{kind: cosine_decay, start: 1.0, end: 0.2, decay_epochs: ...}``).
        init: how an unseen sample starts: ``first_batch`` or ``zero``.
        num_samples: dataset size; None: taken from the training dataset.
    """

    gamma: ScheduleSpec = 0.9
    init: str = "first_batch"
    num_samples: Optional[int] = None


@dataclass
class AmortizerConfig:
    """Options of the ``amortized`` estimator (AmorLIP); see :class:`amortize.estimators.AmortizedEstimator`.

    Attributes:
        network: amortizer network name (``residual_mlp``, ``linear``, ``random_fourier``).
        width_factor: ``f_d`` of the residual MLP (0.5 medium, 1.0 large).
        init_log_z: initial output bias of the networks (a rough ``log Z``, e.g. ``log B``).
        objective: Stage I objective: ``log_l2``, ``kl`` or ``js``.
        log_l2_weight: weight of the log-L2 regulariser (0.1 with ``kl``/``js``).
        lr: the amortizer's Adam learning rate.
        inner_steps: ``T_lambda``.
        update_every: ``T_online``.
        ema_decay: ``alpha``.
        ema_every: ``T_target``.
        beta: previous-epoch blending schedule (``{kind: beta_warmup, final: 0.8, warmup_epochs: 16}``).
        normalizer: ``previous_blend`` (authors' code) or ``ema_target`` (paper Eq. 6).
        reinit: ``every_epoch`` or ``never``.
        clip_norm: gradient clip of the inner steps (None: none).
        seed: seed of the online networks' (re-)initialisation.
    """

    network: str = "residual_mlp"
    width_factor: float = 0.5
    init_log_z: float = 0.0
    objective: str = "log_l2"
    log_l2_weight: float = 0.0
    lr: float = 1e-3
    inner_steps: int = 3
    update_every: int = 1
    ema_decay: float = 0.92
    ema_every: int = 2
    beta: ScheduleSpec = field(default_factory=lambda: {"kind": "beta_warmup", "final": 0.8, "warmup_epochs": 16})
    normalizer: str = "previous_blend"
    reinit: str = "every_epoch"
    clip_norm: Optional[float] = 1.0
    seed: int = 0


@dataclass
class LossConfig:
    """The objective and its partition-function estimator (see :class:`amortize.losses.ContrastiveLoss`).

    Attributes:
        objective: ``infonce`` (CLIP), ``sigmoid`` (SigLIP) or ``amortized``.
        estimator: for ``amortized``: ``in_batch``, ``moving_average`` (SogCLR/FastCLIP) or ``amortized`` (AmorLIP).
        pos_weight: ``c``, weight of the positive inside partition sums.
        rho: temperature-rescaling schedule (FastCLIP/AmorLIP), or None.
        chunk_size: rows per chunk for the exact chunked objectives, or None (dense).
        distributed: how negatives travel between processes: ``gather``, ``ring`` or ``local``.
        moving_average: options of the ``moving_average`` estimator.
        amortizer: options of the ``amortized`` estimator.
    """

    objective: str = "amortized"
    estimator: str = "in_batch"
    pos_weight: float = 1.0
    rho: ScheduleSpec = None
    chunk_size: Optional[int] = None
    distributed: str = "gather"
    moving_average: MovingAverageConfig = field(default_factory=MovingAverageConfig)
    amortizer: AmortizerConfig = field(default_factory=AmortizerConfig)


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
    batch_size: int = 256
    shards: Optional[str] = None
    num_samples: Optional[int] = None
    num_workers: int = 0
    shuffle_buffer: int = 1000
    tokenizer: str = "simple"
    drop_last: bool = True
    max_skip_fraction: float = 0.05
    skip_min_seen: int = 100
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
    max_consecutive_skips: int = 10
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
    lr: float = 1e-3
    weight_decay: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.9
    logit_scale_lr: Optional[float] = None


@dataclass
class SchedulerConfig:
    """The learning-rate schedule (Composer schedulers, stepped every batch).

    Attributes:
        name: ``cosine_with_warmup``, ``linear_with_warmup``, ``constant_with_warmup`` or ``constant``.
        t_warmup: warmup length as a Composer time string (``10000ba``, ``1ep``).
        alpha_f: final learning-rate multiplier.
    """

    name: str = "cosine_with_warmup"
    t_warmup: str = "0ba"
    alpha_f: float = 0.0


@dataclass
class EvalConfig:
    """Evaluation during training and by ``amortize eval``.

    Attributes:
        tasks: ``default`` (Fashion-MNIST zero-shot and emoji retrieval) or ``none``. The DataComp
            suite needs its data directory: run ``amortize eval CKPT --tasks datacomp --datacomp-root DIR``.
        every_n_epochs: evaluate at the end of every n-th epoch (0: never during training).
        at_fit_end: evaluate when training ends (``default`` tasks only).
        batch_size: images or texts per forward pass.
    """

    tasks: str = "none"
    every_n_epochs: int = 0
    at_fit_end: bool = False
    batch_size: int = 256


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
        max_logit_scale: clamp of ``s`` after every optimiser step.
        save_folder: checkpoint folder (None: ``runs/<run_name>``).
        save_interval: Composer time string between checkpoints.
        save_filename: Composer's checkpoint file name pattern.
        save_latest_filename: Composer's name of the latest-checkpoint link.
        save_overwrite: overwrite existing checkpoints.
        save_num_checkpoints_to_keep: Composer's retention (-1: all).
        load_path: resume from this checkpoint.
        autoresume: resume from the latest checkpoint in ``save_folder`` when there is one.
        deterministic_mode: Composer's deterministic mode (deterministic kernels).
        progress_bar: Composer's progress bar.
        log_to_console: Composer's console logger.
        console_log_interval: Composer time string between console logs.
    """

    run_name: str = "default"
    method: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    max_duration: str = "1ep"
    seed: int = 0
    precision: Optional[str] = None
    device: Optional[str] = None
    device_train_microbatch_size: Optional[int] = None
    grad_clip_norm: Optional[float] = 1.0
    max_logit_scale: float = 100.0
    save_folder: Optional[str] = None
    save_interval: str = "1ep"
    save_filename: str = "ep{epoch}-ba{batch}-rank{rank}.pt"
    save_latest_filename: str = "latest-rank{rank}.pt"
    save_overwrite: bool = True
    save_num_checkpoints_to_keep: int = -1
    load_path: Optional[str] = None
    autoresume: bool = False
    deterministic_mode: bool = False
    progress_bar: bool = False
    log_to_console: bool = True
    console_log_interval: str = "10ba"

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
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in hints or k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"unknown key {key!r}{hint}; valid keys{' of ' + prefix if prefix else ''}: {', '.join(names)}")
        value = _convert(v, hints[k], key)
        if key in _CHOICES and value is not None and value not in _CHOICES[key]:
            raise RecipeError(f"{key}: {value!r} is not one of {', '.join(_CHOICES[key])}")
        kwargs[k] = value
    return cls(**kwargs)


def _check_consistency(r: Recipe) -> None:
    if r.loss.objective != "amortized" and r.loss.estimator != "in_batch":
        raise RecipeError(
            f"loss.estimator: {r.loss.estimator!r} needs loss.objective 'amortized' "
            f"(objective {r.loss.objective!r} computes its own partition function)"
        )
    if r.data.batch_size < 2:
        raise RecipeError(f"data.batch_size must be >= 2 for contrastive training, got {r.data.batch_size}")
    mb = r.device_train_microbatch_size
    if mb is not None and mb < 1:
        raise RecipeError(f"device_train_microbatch_size must be >= 1 or null, got {mb}")
    if r.loss.chunk_size is not None and r.loss.chunk_size < 1:
        raise RecipeError(f"loss.chunk_size must be >= 1 or null, got {r.loss.chunk_size}")
    if r.data.sampling == "resampled" and r.data.name == "webdataset" and not r.data.num_samples:
        raise RecipeError("data.sampling 'resampled' needs data.num_samples (it sets the epoch length)")
    from amortize.schedules import build_schedule

    for key, spec in (
        ("loss.rho", r.loss.rho),
        ("loss.amortizer.beta", r.loss.amortizer.beta),
        ("loss.moving_average.gamma", r.loss.moving_average.gamma),
    ):
        try:
            build_schedule(spec)
        except (TypeError, ValueError) as e:
            raise RecipeError(f"{key}: {e}") from None


def load_recipe_dict(data: Optional[dict]) -> Recipe:
    """Check a parsed recipe mapping against :class:`Recipe`.

    Args:
        data: the mapping (e.g. ``yaml.safe_load`` output); None is the all-defaults recipe.

    Returns:
        The typed :class:`Recipe`.

    Raises:
        RecipeError: naming the offending dotted key, with the valid keys or the expected type.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a mapping at the top level, got {type(data).__name__}")
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
        value = yaml.safe_load(raw) if raw.strip() else None
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
        overrides: e.g. ``["max_duration=20ba", "loss.amortizer.lr=0.002"]``.

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
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: invalid YAML: {e}") from None
    try:
        return load_recipe_dict(apply_overrides(data or {}, list(overrides or [])))
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None


def recipe_to_dict(recipe: Recipe) -> dict:
    """The recipe as plain Python (dicts, lists, str, int, float, bool, None)."""
    return dataclasses.asdict(recipe)


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML text (round-trips through :func:`load_recipe_dict`)."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
