"""Recipe -> components -> Composer ``Trainer``: the one place where a recipe's sections are built.

Every component a recipe names is built here, once, from its section bound at load
(:mod:`amortize.train.sections`): the two towers, the loss (objective, estimator, layout), the
tokenizer, the training data and its loader, the optimiser and the schedule, the evaluation
tasks, the recipe's loggers, callbacks and algorithms, and the ``Trainer`` that joins them.
Constructors' errors come back under the section's key (:meth:`amortize.registry.Bound.build`).

Composer is imported only by the functions that need it (:func:`build_trainer`,
:func:`build_composer_model`, :func:`build_dataloader`, :func:`dry_run`), so ``amortize eval`` and
notebooks rebuild a trained model from a recipe (:func:`build_two_tower`, :func:`build_tokenizer`)
without it.

>>> from amortize.train.config import load_recipe
>>> trainer = build_trainer(load_recipe("recipes/default.yaml", ["max_duration=2ba"]))  # doctest: +SKIP
>>> trainer.fit()  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, NamedTuple, Optional, Sequence

from amortize.losses import ContrastiveLoss
from amortize.models import TwoTowerModel
from amortize.options import Options, RecipeError
from amortize.registry import Bound
from amortize.train.config import Recipe, recipe_to_dict
from amortize.train.plan import decide_start, shown_folder
from amortize.train.sections import bindings

__all__ = ["build_two_tower", "build_loss", "build_tokenizer", "build_eval_tasks", "per_process_batch_size",
           "build_dataloader", "build_composer_model", "build_trainer", "dry_run"]


def build_two_tower(recipe: Recipe, start: bool = True) -> TwoTowerModel:
    """The two-tower model of a recipe (its initial ``log s`` and bias were resolved at load).

    Binds and builds the ``model`` section only: the loss sections and the recipe's ``imports``
    are not needed to rebuild the towers (``amortize eval``).

    Args:
        recipe: the recipe.
        start: build what a run starts from, ``model.pretrained`` loaded and ``model.lock_image`` /
            ``model.lock_text`` applied; False builds the bare towers (``amortize eval`` loads the
            trained weights into them, and the pretrained file need not exist any more).
    """
    m = recipe.model
    if not start and any(m.get(k) is not None for k in ("pretrained", "lock_image", "lock_text")):
        bare = Options({**m, "pretrained": None, "lock_image": None, "lock_text": None})
        recipe = dataclasses.replace(recipe, model=bare)
    return bindings(recipe).get("model").build()


def build_loss(recipe: Recipe, embed_dim: int, num_samples: Optional[int] = None) -> ContrastiveLoss:
    """The :class:`~amortize.losses.ContrastiveLoss` of a recipe, from its bound ``loss.*`` sections.

    Args:
        recipe: the recipe.
        embed_dim: the model's embedding width ``d`` (offered as ``dim`` to an estimator naming it).
        num_samples: dataset size (offered as ``num_samples`` to an estimator naming it; None: unknown).

    Raises:
        RecipeError: naming the ``loss.*`` key of a bad value, or a per-sample estimator whose size
            is unknown or smaller than the dataset.
    """
    b = bindings(recipe)
    est = b.get("loss.estimator")
    estimator = None
    if est is not None:
        dim = est.options.get("dim")  # the width is the model's; a section may only repeat it
        if dim is not None and int(dim) != int(embed_dim):
            raise RecipeError(f"{dim} is not the model's embedding dimension {embed_dim}; remove the key (it is set "
                              "from the model)", key=f"{est.key}.dim")
        _check_estimator_size(est, num_samples)
        estimator = est.build(dim=embed_dim, num_samples=num_samples)
    parts = {"objective": b.get("loss.objective").build(), "layout": b.get("loss.layout").build()}
    if estimator is not None:
        parts["estimator"] = estimator
    rho = b.get("loss.rho")  # None: no schedule, or a constant the loss section holds
    if rho is not None:
        parts["rho"] = rho.build()
    return b.get("loss").with_parts(**parts).build(context={"dim": embed_dim, "num_samples": num_samples})


def _check_estimator_size(est: Bound, num_samples: Optional[int]) -> None:
    """Per-sample tables must hold every index the data yields (checked before the first step)."""
    if not est.takes("num_samples"):
        return
    given = est.options.get("num_samples")
    if given is None and not num_samples:
        raise RecipeError("the dataset size is unknown; set it (or data.num_samples)", key=f"{est.key}.num_samples")
    if given is not None and num_samples and given < num_samples:
        raise RecipeError(f"{est.key}.num_samples={given} is smaller than the dataset ({num_samples} samples, "
                          "indices 0..N-1); leave it out to size the estimator from the data")


def build_tokenizer(recipe: Recipe, context_length: int):
    """The tokenizer of a recipe (``data.tokenizer``) with the model's context length."""
    from amortize.data.tokenizer import get_tokenizer

    name = recipe.data.tokenizer
    try:
        return get_tokenizer(None if name == "simple" else name, context_length=context_length)
    except ValueError as e:
        raise RecipeError(str(e), key="data.tokenizer") from None


def build_eval_tasks(recipe: Recipe, image_size: int, check_images: bool = False) -> Optional[list]:
    """The evaluation tasks of ``eval.tasks``: None for ``none``, the shipped ones for ``default``,
    else each bound section built (its folder or CSV read now, its images when evaluated).

    Args:
        recipe: the recipe.
        image_size: the model's input side.
        check_images: also open and decode every image file of the sections once (``--dry-run``
            and the start of training), so an unreadable one stops the run before it trains, not
            at its first evaluation.

    Raises:
        RecipeError: under ``eval.tasks[i]`` for a missing file, a folder that cannot be read or
            (``check_images``) an image that cannot be decoded, naming it.
    """
    tasks = recipe.eval.tasks
    if tasks == "none":
        return None
    if tasks == "default":
        from amortize.eval import default_tasks

        return default_tasks(image_size=image_size)
    out: list = []
    for bound in bindings(recipe).many("eval.tasks"):
        try:
            built = bound.build(image_size=image_size)
        except OSError as e:
            raise RecipeError(str(e), key=bound.key) from None
        built = built if isinstance(built, list) else [built]
        if check_images:
            _check_task_images(built, bound.key)
        out.extend(built)
    return out


def _check_task_images(tasks: list, key: str) -> None:
    """Decode every image file of ``tasks`` (those read from disk) once.

    Raises:
        RecipeError: ``eval.tasks[i]: cannot read image PATH: ...``.
    """
    from amortize.eval.user import ImageFiles, UserDataError

    for task in tasks:
        images = getattr(task, "images", None)
        if isinstance(images, ImageFiles):
            try:
                images.check()
            except UserDataError as e:
                raise RecipeError(f"{e}; fix or remove the file before training", key=key) from None


def _evaluates(recipe: Recipe) -> bool:
    """Whether the run evaluates at all (tasks other than ``none``, at some point)."""
    e = recipe.eval  # resolved: the callback's options with its defaults, and tasks
    return e.tasks != "none" and (e.every_n_epochs > 0 or e.every_n_batches > 0 or e.at_fit_end)


def per_process_batch_size(recipe: Recipe) -> int:
    """``data.batch_size`` (global) divided by the number of processes.

    The exact gradient cache (:mod:`amortize.train.gradcache`) is on when the recipe's microbatches
    are smaller than that; they need not divide it.

    Raises:
        RecipeError: if it does not divide evenly.
    """
    from composer.utils import dist

    world, batch = dist.get_world_size(), recipe.data.batch_size
    if batch % world:
        raise RecipeError(f"data.batch_size={batch} is not divisible by the {world} processes: set data.batch_size to "
                          f"a multiple of {world} (e.g. {-(-batch // world) * world}), or run on a number of processes "
                          f"that divides {batch} (a resumed run keeps its checkpoint's global batch)")
    return batch // world


def build_dataloader(recipe: Recipe, tokenizer: Any, image_size: int) -> tuple[Any, Optional[int]]:
    """The training DataLoader of a recipe's ``data`` section and the dataset size (None if unknown).

    The section's dataset (:data:`amortize.data.DATASETS`) is built once. A map-style dataset is
    sharded over processes by :class:`~amortize.data.resume.EpochSampler` (``DistributedSampler``'s
    order; Composer sets its epoch); an iterable one (``webdataset``) yields per-process batches
    itself and says its size as ``dataset_size``. Both are read through an
    :class:`~amortize.data.resume.EpochLoader`, which keeps the data's position (the epoch and
    the next global batch) for Composer's dataset protocol, so a mid-epoch resume starts at its
    batch instead of spinning (the ``resampled`` shard pipeline has no state and is spun).
    """
    return _dataloader(recipe, tokenizer, image_size, per_process_batch_size(recipe))


def _dataloader(recipe: Recipe, tokenizer: Any, image_size: int, per: int) -> tuple[Any, Optional[int]]:
    """:func:`build_dataloader` with the per-process batch already checked (``per``)."""
    from composer.utils import dist
    from torch.utils.data import DataLoader, IterableDataset

    from amortize.data.resume import EpochLoader, EpochPosition, EpochSampler, ResumableDataset

    bound = bindings(recipe).get("data")
    loader = bound.shared  # batch_size, num_workers, drop_last, tokenizer
    workers, drop_last = loader["num_workers"], loader["drop_last"]
    data = bound.build(tokenizer, image_size, batch_size=loader["batch_size"], world_size=dist.get_world_size(),
                       seed=recipe.seed, num_workers=workers, drop_last=drop_last)
    if isinstance(data, IterableDataset):
        position = getattr(data, "position", None)
        if isinstance(position, EpochPosition) and hasattr(data, "set_position"):
            # the shard pipeline: told its epoch and first batch by the loader before each pass (workers
            # are started per epoch, so they see it), resumable through Composer's dataset protocol
            return (EpochLoader(data, position=position, batch_size=None, num_workers=workers,
                                persistent_workers=False), getattr(data, "dataset_size", None))
        return (DataLoader(data, batch_size=None, num_workers=workers, persistent_workers=workers > 0),
                getattr(data, "dataset_size", None))
    if len(data) < loader["batch_size"]:
        raise RecipeError(f"data.batch_size={loader['batch_size']} exceeds the dataset size {len(data)}")
    if not drop_last and -(-len(data) // dist.get_world_size()) % per == 1:
        # the sampler pads every process to ceil(N / W) samples: one left over is a batch without a negative
        raise RecipeError(f"data.drop_last=false would end every epoch with a one-sample batch ({len(data)} samples, "
                          f"{per} a batch per process), which has no negative: keep drop_last=true or change data.batch_size")
    # DistributedSampler's order (the shipped data trains as every earlier release did), able to start mid-epoch
    sampler = EpochSampler(data, num_replicas=dist.get_world_size(), rank=dist.get_global_rank(), shuffle=True,
                           seed=recipe.seed, drop_last=drop_last)
    per_rank = len(sampler) // per if drop_last else -(-len(sampler) // per)
    position = EpochPosition(loader["batch_size"], dist.get_world_size(), recipe.seed, per_rank)
    return (EpochLoader(ResumableDataset(data, position), position=position, batch_size=per, sampler=sampler,
                        drop_last=drop_last, num_workers=workers, persistent_workers=workers > 0), len(data))


def build_composer_model(recipe: Recipe, num_samples: Optional[int] = None):
    """The :class:`~amortize.train.model.ContrastiveComposerModel` of a recipe (towers, loss, the
    gradient cache the recipe asks for, the recipe as metadata).

    Raises:
        RecipeError: as :func:`per_process_batch_size` and
            :func:`~amortize.train.gradcache.build_gradient_cache`.
    """
    from amortize.train.gradcache import build_gradient_cache

    towers = build_two_tower(recipe)
    gradient_cache = build_gradient_cache(recipe, towers, per_process_batch_size(recipe))
    return _composer_model(recipe, towers, num_samples, gradient_cache)


def _composer_model(recipe: Recipe, towers: TwoTowerModel, num_samples: Optional[int], gradient_cache: Any):
    from amortize.train.model import ContrastiveComposerModel

    loss_fn = build_loss(recipe, towers.embed_dim, num_samples=num_samples)
    return ContrastiveComposerModel(towers, loss_fn, recipe=recipe_to_dict(recipe), gradient_cache=gradient_cache)


def build_trainer(
    recipe: Recipe,
    *,
    callbacks: Sequence[Any] = (),
    loggers: Sequence[Any] = (),
    train_dataloader: Any = None,
    num_samples: Optional[int] = None,
) -> Any:
    """Build everything a recipe names and return Composer's ``Trainer`` (call ``.fit()``).

    Args:
        recipe: the checked recipe.
        callbacks: extra Composer callbacks.
        loggers: extra Composer logger destinations.
        train_dataloader: use this instead of the recipe's data (tests); yields batch dicts.
        num_samples: dataset size when ``train_dataloader`` is given (moving averages).

    Returns:
        The Trainer, with the model, optimiser, scheduler, algorithms and checkpointing set up. A loss
        with a stateful estimator gets an :class:`~amortize.train.callbacks.EstimatorMonitorCallback`
        unless the recipe's ``callbacks:`` (or ``callbacks``) already holds one.
    """
    from composer import Trainer
    from composer.algorithms import GradientClipping
    from composer.utils import dist, reproducibility

    from amortize.train.algorithms import ClampLogitScale, EpochSchedules
    from amortize.train.callbacks import (DataSkipReport, EstimatorMonitorCallback, ExportWeights, LogLossTerms,
                                          SaveOnInterrupt, monitors_estimator)
    from amortize.train.compat import install_atomic_checkpoint_writes
    from amortize.train.gradcache import FullBatchGuard, microbatch_trainer_kwargs
    from amortize.train.model import unwrap

    reproducibility.seed_all(recipe.seed)
    if recipe.autoresume and dist.get_global_rank() == 0:
        # checkpoints are renamed into place; after a crash, point `latest` at the newest whole one
        from amortize.checkpoints import filename_regex, recover_latest

        recover_latest(recipe.resolved_save_folder(), recipe.save_latest_filename.format(rank=0),
                       filename_regex(recipe.save_filename, rank=0))
    plan = decide_start(recipe)
    parts = _components(recipe, train_dataloader, num_samples)
    model, tokenizer, train_dataloader = parts.model, parts.tokenizer, parts.loader
    microbatching = microbatch_trainer_kwargs(parts.gradient_cache, parts.per_process_batch)
    if plan.replaced and dist.get_global_rank() == 0:
        for path in plan.replaced:  # save_overwrite=true: the earlier run's files go, so autoresume cannot mix them
            if os.path.lexists(path):
                os.unlink(path)
    algorithms: list[Any] = [FullBatchGuard(), *microbatching.pop("algorithms"), EpochSchedules(),
                             ClampLogitScale(recipe.max_scale)]
    if recipe.grad_clip_norm is not None:
        algorithms.append(GradientClipping(clipping_type="norm", clipping_threshold=recipe.grad_clip_norm))
    save_folder = recipe.resolved_save_folder()
    algorithms.append(bindings(recipe).get("divergence").build(save_folder=save_folder))
    export = ExportWeights(save_folder)
    cbs: list[Any] = [LogLossTerms(), export,
                      SaveOnInterrupt(save_folder, recipe.save_filename, recipe.save_latest_filename, export)]
    counter = getattr(getattr(train_dataloader, "dataset", None), "counter", None)
    if counter is not None:
        cbs.append(DataSkipReport(counter))
    install_atomic_checkpoint_writes()
    if _evaluates(recipe):
        tasks = build_eval_tasks(recipe, image_size=unwrap(model).model.image_size, check_images=True)
        cbs.append(bindings(recipe).get("eval").build(tokenizer=tokenizer, tasks=tasks, print_table=True))
    extra = _recipe_extras(recipe)
    algorithms.extend(extra["algorithms"])
    cbs.extend([*extra["callbacks"], *callbacks])
    if monitors_estimator(model.loss_fn) and not any(isinstance(c, EstimatorMonitorCallback) for c in cbs):
        cbs.append(EstimatorMonitorCallback())  # on by default; `callbacks: [{name: estimator_monitor, policy: none}]`
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(deterministic|microbatch|No optimizer|step_schedulers).*")
        trainer = Trainer(
            model=model,
            train_dataloader=train_dataloader,
            max_duration=recipe.max_duration,
            optimizers=parts.optimizer,
            schedulers=parts.scheduler,
            step_schedulers_every_batch=True,
            algorithms=algorithms,
            callbacks=cbs,
            loggers=[*extra["loggers"], *loggers],
            run_name=recipe.run_name,
            progress_bar=recipe.progress_bar,
            log_to_console=recipe.log_to_console,
            console_log_interval=recipe.console_log_interval,
            save_folder=save_folder,
            save_interval=recipe.save_interval,
            save_filename=recipe.save_filename,
            save_latest_filename=recipe.save_latest_filename,
            save_overwrite=recipe.save_overwrite,  # decide_start refused a folder holding another run
            save_num_checkpoints_to_keep=recipe.save_num_checkpoints_to_keep,
            load_path=plan.checkpoint if plan.mode in ("load", "weights") else None,
            load_weights_only=plan.mode == "weights",
            load_strict_model_weights=plan.mode != "weights",
            # weights only: the encoders; the estimator starts fresh and the recipe stays this one
            load_ignore_keys=["state/model/loss_fn.*", "state/model/_extra_state"] if plan.mode == "weights" else None,
            autoresume=recipe.autoresume,
            device=recipe.device,
            precision=recipe.precision,
            # Composer never splits a batch (its splitting would shrink the negatives; it cannot
            # infer the batch size of a webdataset loader); the model's gradient cache, decided
            # once above (_components), splits the encoders' work inside that step
            **microbatching,
            seed=recipe.seed,
            deterministic_mode=recipe.deterministic_mode,
        )
    trainer.amortize_plan = plan  # type: ignore[attr-defined]
    _resume_data(trainer)
    return trainer


def _resume_data(trainer: Any) -> None:
    """After a checkpoint was loaded: a checkpoint without the data's state (written before the data
    had one) resumes as it did, by spinning the loader to its batch, and says so."""
    state = trainer.state
    position = getattr(getattr(state.train_dataloader, "dataset", None), "position", None)
    if position is None or not getattr(position, "legacy_resume", False):
        return
    state.dataset_resumption.pop("train", None)  # Composer spins the loader again
    position.legacy_resume = False
    import sys

    from composer.utils import dist

    if dist.get_global_rank() == 0:
        print(f"resuming: the checkpoint holds no data state (written before exact data resume); spinning the "
              f"loader through the {int(state.timestamp.batch_in_epoch)} batches of epoch {int(state.timestamp.epoch)} "
              "already trained, as before", file=sys.stderr, flush=True)


class _Parts(NamedTuple):
    """What :func:`_components` builds, with the per-process batch and the gradient cache it decided once."""

    model: Any
    tokenizer: Any
    loader: Any
    optimizer: Any
    scheduler: Any
    per_process_batch: int
    gradient_cache: Any


def _components(recipe: Recipe, train_dataloader: Any = None, num_samples: Optional[int] = None) -> _Parts:
    """The model, tokenizer, loader, optimizer and scheduler of a recipe, errors named by recipe
    section, with the per-process batch and the gradient cache (each checked once)."""
    import torch

    from amortize.train.gradcache import build_gradient_cache
    from amortize.train.optim import build_optimizer

    device = recipe.device or ("gpu" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and (recipe.precision or "fp32") != "fp32":
        raise RecipeError(f"precision: {recipe.precision} needs a GPU, and this run would use the CPU "
                          f"(device={recipe.device}); set precision=fp32 (or null) for the CPU")
    towers = build_two_tower(recipe)
    per = per_process_batch_size(recipe)
    gradient_cache = build_gradient_cache(recipe, towers, per)  # the towers checked before the data is read
    tokenizer = build_tokenizer(recipe, towers.context_length)
    if train_dataloader is None:
        train_dataloader, num_samples = _dataloader(recipe, tokenizer, towers.image_size, per)
    model = _composer_model(recipe, towers, num_samples, gradient_cache)
    optimizer = build_optimizer(model, bindings(recipe).get("optimizer"), recipe.data.batch_size)
    scheduler = bindings(recipe).get("scheduler").build()
    return _Parts(model, tokenizer, train_dataloader, optimizer, scheduler, per, gradient_cache)


def _recipe_extras(recipe: Recipe) -> dict[str, list[Any]]:
    """The recipe's ``loggers``, ``callbacks`` and ``algorithms``, each built once from its bound section."""
    b = bindings(recipe)
    return {key: [bound.build() for bound in b.many(key)] for key in ("loggers", "callbacks", "algorithms")}


def warmup_warning(recipe: Recipe, batches_per_epoch: Optional[int]) -> Optional[str]:
    """:func:`amortize.train.optim.warmup_note` of the recipe's scheduler and run (``--dry-run`` and the
    start of training say it), or None."""
    from amortize.train.optim import warmup_note

    return warmup_note(bindings(recipe).get("scheduler").resolved.get("t_warmup"), recipe.max_duration,
                       batches_per_epoch, recipe.data.batch_size)


def dry_run(recipe: Recipe) -> list[str]:
    """Build everything the run would (model, loss and estimator, data loader, optimizer, scheduler,
    the evaluation tasks with every image of their files decoded once, the start decision) without
    training or writing a file.

    Returns:
        Lines describing what was built, for the console.

    Raises:
        RecipeError: naming the recipe key of anything that would fail when the run starts.
    """
    from amortize.interop.pretrained import locked_summary
    from amortize.train.optim import describe_optimizer

    plan = decide_start(recipe)
    model, _, loader, optimizer, scheduler, per, _ = _components(recipe)
    guard = bindings(recipe).get("divergence").build(save_folder=recipe.resolved_save_folder())
    evaluates, shipped = _evaluates(recipe), recipe.eval.tasks == "default"  # the shipped tasks need no check
    tasks = build_eval_tasks(recipe, model.model.image_size, check_images=True) if evaluates and not shipped else None
    extra = _recipe_extras(recipe)
    try:
        batches = len(loader)
    except TypeError:
        batches = None
    n_params = sum(p.numel() for p in model.model.parameters())
    est = type(model.loss_fn.estimator).__name__ if getattr(model.loss_fn, "estimator", None) is not None else "none"
    from amortize.train.plan import untrained_data_note

    warm = warmup_warning(recipe, batches)
    untrained = untrained_data_note(recipe)  # after the data was built: the shards' sizes are counted
    return [
        *([f"warning: {warm}"] if warm else []),
        *([f"warning: {untrained}"] if untrained else []),
        f"model: {recipe.model.name}, {n_params:,} encoder parameters; loss: {bindings(recipe).get('loss.objective').name}, "
        f"estimator {est}",
        f"data: {recipe.data.name}, {batches if batches is not None else 'unknown'} batches of {per} per process "
        f"and epoch",
        f"optimizer: {describe_optimizer(optimizer, recipe.data.batch_size)}; scheduler: {type(scheduler).__name__ if scheduler else 'none'}; "
        f"divergence: {guard.policy}",
        *(f"{key}: {', '.join(type(x).__name__ for x in built)}" for key, built in extra.items() if built),
        f"eval: {'default' if evaluates and shipped else ', '.join(t.name for t in tasks) if tasks else 'none'}",
        f"start: {plan.describe()}; checkpoints in {shown_folder(recipe.resolved_save_folder())}",
        f"towers: {'from ' + recipe.model.pretrained if recipe.model.pretrained else 'initialised'}; "
        f"{locked_summary(model.model)}",
    ]

