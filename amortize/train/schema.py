"""The recipe schema: the typed keys of a recipe that are not a component's constructor options.

A component section (``model``, ``loss``, ``data``, ``optimizer``, ``scheduler``, ``divergence``,
``eval``, ``loss.objective``, ``loss.estimator``, ``loss.rho``, ``loggers`` ...) is a
:data:`SectionSpec` (or a mapping) here, plain data checked by the binding step against its
constructor (:mod:`amortize.train.sections`); its options and their defaults live only in the
constructor (the schema names only which component a recipe gets when it names none: ``data:
shipped``, ``optimizer: adamw``, ``scheduler: cosine_with_warmup``; a section without ``name`` gets
that one), and an option a section holds beside its constructor's is declared by a signature of its
own (``eval.tasks``: :func:`amortize.eval.callback_options.eval_tasks`). The remaining keys are fields of :class:`Recipe`, each
with its default and, beside it, its allowed range (``_opt(check=Range(...))``) or set of choices
(:data:`CHOICES`).

Keys that Composer's ``Trainer`` names keep its names (``max_duration``, ``seed``, ``save_folder``,
``save_interval``, ``precision``, ``device_train_microbatch_size`` ...).

To add a recipe key: a field on :class:`Recipe` (with ``_opt(check=...)`` for a range). To add a
component section: a :data:`SectionSpec` field here and its line in
:data:`amortize.train.sections.SECTIONS`.

This module imports neither Composer nor torch.
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from amortize.options import NONNEGATIVE as _NONNEG
from amortize.options import POSITIVE as _POS
from amortize.options import Options, Range, RecipeError, TimeString

__all__ = [
    "SectionSpec",
    "ScheduleSpec",
    "Recipe",
    "CHOICES",
    "check_across_keys",
    "MAX_SEED",
    "NAME_FIELDS",
    "check_retention",
]

ScheduleSpec = Union[float, dict, None]
"""A float (constant) or a schedule section ``{"name": ..., ...}`` (see :func:`amortize.schedules.build_schedule`)."""

SectionSpec = Union[str, dict]
"""A component section: a registered name, or ``{"name": ..., <constructor options>}``."""

MAX_SEED = 2**32 - 1
"""The largest ``seed``: Composer seeds NumPy, whose seeds are 32-bit."""

NAME_FIELDS = ("run_name", "rank", "local_rank", "world_size", "local_world_size", "node_rank", "epoch", "batch",
               "sample", "token", "batch_in_epoch", "sample_in_epoch", "token_in_epoch")
"""The ``{fields}`` Composer fills in ``save_filename`` and ``save_latest_filename``."""

CHOICES: dict[str, tuple[str, ...]] = {
    "precision": ("fp32", "amp_fp16", "amp_bf16"),
    "device": ("cpu", "gpu", "mps"),
    "load_mode": ("full", "weights"),
}
"""The allowed values of the top-level keys whose set is known here (the registries check a section's name)."""


def _opt(default: Any = dataclasses.MISSING, *, check: Any = None, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose allowed values (a :class:`Range` or :class:`TimeString`) sit beside it."""
    meta = {"check": check} if check is not None else {}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Recipe:
    """A training recipe.

    Attributes:
        run_name: Composer's run name (also the default checkpoint folder ``runs/<run_name>``).
        method: a free-form label of the method (``amorlip-log-l2``, ``clip`` ...) for reports.
        model: the two-tower model: the options of :func:`amortize.models.build_model` (``name``:
            ``tiny``, ``cpu-small`` or an open_clip name; the image size, the context length, the
            initial logit scale and bias (unset: the objective's preference where it states one,
            else the towers' own, taken when the recipe loads: :data:`amortize.train.sections.SECTIONS`),
            ``pretrained``, ``lock_image``, ``lock_text``).
        loss: the options of :meth:`amortize.losses.ContrastiveLoss.from_sections` (``objective``
            and ``estimator``, each a section of its own; ``layout``, ``rho``, ``chunk_size``), with
            its defaults (:data:`amortize.losses.DEFAULT_OBJECTIVE`, :data:`~amortize.losses.DEFAULT_LAYOUT`)
            written in when the recipe loads.
        data: training data, a section of :data:`amortize.data.DATASETS` (``shipped``,
            ``webdataset``, ``synthetic``) with its dataset's options and the loader's
            (:func:`amortize.data.loader_options`: the GLOBAL ``batch_size``, ``num_workers``,
            ``drop_last``, ``tokenizer``).
        optimizer: encoder optimiser, a section of :data:`amortize.train.optim.OPTIMIZERS`: the
            optimiser class's own options (``lr``, ``weight_decay``, ``betas``, ``eps`` for
            ``adamw``; ``momentum`` for ``sgd`` ...) and ``logit_scale_lr``.
        scheduler: learning-rate schedule, a section of :data:`amortize.train.optim.SCHEDULERS`
            (``cosine_with_warmup`` with ``t_warmup`` and ``alpha_f`` ...).
        eval: evaluation during training: the options of
            :class:`~amortize.eval.callback.EvalCallback` (``every_n_epochs``, ``every_n_batches``,
            ``at_fit_end``, ``batch_size``, ``prefix``), with its defaults, and ``tasks``
            (:func:`~amortize.eval.callback_options.eval_tasks`, default ``none``: no evaluation).
        divergence: what a non-finite loss or gradient does: the options of
            :class:`amortize.train.algorithms.DivergenceGuard` (``policy``: ``skip``, ``stop``, ``none``;
            ``max_consecutive_skips``, ``restore_estimator``).
        loggers: Composer logger destinations, each a section (``file``, ``tensorboard``, ``wandb``
            ... see :data:`amortize.train.integrations.LOGGERS`), e.g. ``[{name: file, filename: log.txt}]``.
        callbacks: Composer callbacks, each a section (``lr_monitor``, ``speed_monitor``,
            ``memory_monitor`` ... see :data:`amortize.train.integrations.CALLBACKS`).
        algorithms: Composer algorithms, each a section (``ema`` ... see
            :data:`amortize.train.integrations.ALGORITHMS`), added to the ones every run has.
        max_duration: Composer time string (``30ep``, ``20ba``).
        seed: global seed (weights, data order, amortizer re-initialisation).
        precision: ``fp32``, ``amp_bf16`` or ``amp_fp16`` (None: Composer's default for the device).
        device: ``cpu``, ``gpu`` or None (Composer picks).
        device_train_microbatch_size: rows per microbatch of the exact gradient cache (None: the
            whole per-process batch at once). Smaller than the per-process batch, the encoders run
            on microbatches of this size (peak memory of their activations falls with it) while the
            loss still sees every negative; see :mod:`amortize.train.gradcache`. Its one default; its
            range (at least 1) is checked once, by the object that holds it when the run (or
            ``--dry-run``) is built (:class:`amortize.gradcache.GradientCachePasses`), under this key.
        grad_clip_norm: encoder gradient-norm clip (None: none).
        imports: Python files (relative to the recipe file) or module names imported before the
            recipe is checked, so that the components they register can be named (stored resolved).
        max_scale: clamp of the inverse temperature ``s`` (not ``log s``) after every optimiser step
            (:class:`~amortize.train.algorithms.ClampLogitScale`, which takes it as checked here: the
            one default and the one check).
        save_folder: checkpoint folder (None: ``runs/<run_name>``).
        save_interval: Composer time string between checkpoints.
        save_filename: Composer's checkpoint file name pattern.
        save_latest_filename: Composer's name of the latest-checkpoint link.
        save_overwrite: replace the run already in ``save_folder`` (its checkpoints, ``latest`` and
            weights export :data:`~amortize.weights_export.EXPORT_FILENAME` are removed first).
            Without it, a folder that holds a run is refused unless ``autoresume`` continues it.
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
    model: SectionSpec = field(default_factory=dict)
    loss: dict = field(default_factory=Options)
    data: SectionSpec = "shipped"
    optimizer: SectionSpec = "adamw"
    scheduler: SectionSpec = "cosine_with_warmup"
    eval: dict = field(default_factory=Options)
    divergence: SectionSpec = field(default_factory=dict)
    loggers: list[SectionSpec] = field(default_factory=list)
    callbacks: list[SectionSpec] = field(default_factory=list)
    algorithms: list[SectionSpec] = field(default_factory=list)
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


def check_across_keys(recipe: "Recipe") -> None:
    """The checks across the typed top level's keys: ``seed`` in ``[0, MAX_SEED]``, the file-name
    templates' fields (:data:`NAME_FIELDS`), the retention with ``autoresume``
    (:func:`check_retention`). A key's own type, range and choices are checked when the top level
    is bound (:func:`amortize.train.sections.build_schema`), a section's checks across its options
    by its declaration (:mod:`amortize.train.sections`).

    Raises:
        RecipeError: naming the key.
    """
    if not 0 <= int(recipe.seed) <= MAX_SEED:
        raise RecipeError(f"seed: must be in [0, {MAX_SEED}] (NumPy's seeds are 32-bit), got {recipe.seed}")
    check_retention(recipe)
    for key in ("save_filename", "save_latest_filename"):
        unknown = [f for f in _template_fields(getattr(recipe, key)) if f.split(".")[0].split("[")[0] not in NAME_FIELDS]
        if unknown:
            raise RecipeError(f"{key}: unknown field {{{unknown[0]}}} in {getattr(recipe, key)!r}; "
                              f"valid: {', '.join('{' + f + '}' for f in NAME_FIELDS)}")


def _template_fields(template: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        return [f"<{e}>"]


def check_retention(recipe: Any) -> None:
    """Refuse ``save_num_checkpoints_to_keep=0`` with ``autoresume=true``: Composer then keeps no
    checkpoint, so a stopped run would have nothing to resume from (its work lost).

    Raises:
        RecipeError: naming both keys and the values that keep the latest checkpoint.
    """
    if recipe.autoresume and recipe.save_num_checkpoints_to_keep == 0:
        raise RecipeError("save_num_checkpoints_to_keep=0 with autoresume=true keeps no checkpoint to resume from, "
                          "so a stopped run would lose its work; keep the latest with save_num_checkpoints_to_keep=1 "
                          "(-1 keeps all), or set autoresume=false")
