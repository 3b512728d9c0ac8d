"""Recipe -> Composer ``Trainer``: the one place where a recipe becomes a training run.

>>> from amortize.train.config import load_recipe
>>> trainer = build_trainer(load_recipe("recipes/default.yaml", ["max_duration=2ba"]))  # doctest: +SKIP
>>> trainer.fit()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Iterator, Optional, Sequence

from composer import Trainer
from composer.algorithms import GradientClipping
from composer.utils import dist, reproducibility
from torch.utils.data import DataLoader

from amortize.interop.pretrained import locked_summary
from amortize.options import keyed
from amortize.train.algorithms import (ClampLogitScale, EpochSchedules, EstimatorMonitorCallback, ExportWeights,
                                       FullBatchGuard, LogLossTerms, monitors_estimator)
from amortize.train.components import build_dataset, build_eval_tasks, build_loss, build_tokenizer, build_two_tower
from amortize.train.config import Recipe, RecipeError, recipe_to_dict
from amortize.train.compat import install_atomic_checkpoint_writes
from amortize.train.gradcache import microbatch_trainer_kwargs
from amortize.train.guards import DataSkipReport, DivergenceGuard, SaveOnInterrupt
from amortize.train.model import ContrastiveComposerModel
from amortize.train.model import unwrap as _unwrap
from amortize.train.optim import build_optimizer, build_scheduler
from amortize.train.plan import decide_start
from amortize.train.sections import bindings
from amortize.train.validate import check_microbatch_model, check_shards_exist

__all__ = ["per_process_batch_size", "build_dataloader", "build_composer_model", "build_trainer", "dry_run"]


@contextlib.contextmanager
def _section(key: str) -> Iterator[None]:
    """Put a constructor's ``ValueError``/``TypeError`` under the recipe key of what it builds."""
    try:
        yield
    except (ValueError, TypeError) as e:
        raise keyed(key, e) from None


def per_process_batch_size(recipe: Recipe) -> int:
    """``data.batch_size`` (global) divided by the number of processes.

    A ``device_train_microbatch_size`` smaller than that turns on the exact gradient cache
    (:mod:`amortize.train.gradcache`); it need not divide the per-process batch.

    Raises:
        RecipeError: if it does not divide evenly.
    """
    world = dist.get_world_size()
    if recipe.data.batch_size % world:
        raise RecipeError(f"data.batch_size={recipe.data.batch_size} is not divisible by the {world} processes")
    return recipe.data.batch_size // world


def build_dataloader(recipe: Recipe, tokenizer: Any, image_size: int) -> tuple[Any, Optional[int]]:
    """The training DataLoader of a recipe and the dataset size (None if unknown).

    Map-style datasets are sharded over processes by a seeded ``DistributedSampler``
    (Composer sets its epoch); ``webdataset`` shards are split by node and worker.
    """
    per = per_process_batch_size(recipe)
    d = recipe.data
    if d.name == "webdataset":
        if not d.shards:
            raise RecipeError("data.shards must name the .tar shards for data.name 'webdataset'")
        from amortize.data.webdataset import (SkipCounter, epoch_batches, expand_shards, make_pipeline,
                                              open_clip_transform, shard_sizes)

        try:
            urls = expand_shards(d.shards)
        except ValueError as e:
            raise RecipeError(f"data.shards: {e}") from None
        sizes = shard_sizes(urls)  # stats / sizes.json / a count cached beside the shards
        total = sum(sizes.values())
        if total == 0:
            missing = [u for u in urls if not os.path.isfile(u)]
            what = (f"{len(missing)} of the {len(urls)} shards do not exist (first: {missing[0]})" if missing
                    else f"none of the {len(urls)} shards holds a readable sample")
            raise RecipeError(f"data.shards: no training data: {what}; check the pattern {d.shards!r}")
        check_shards_exist(urls, d.shards)  # amortize.train.validate: a named shard that is missing is refused
        offsets, start = {}, 0
        for u, n in sizes.items():
            offsets[u], start = start, start + n
        epoch_samples = d.num_samples or total
        if epoch_samples < recipe.data.batch_size:
            raise RecipeError(f"data.batch_size={recipe.data.batch_size} exceeds the {epoch_samples} samples of an "
                              "epoch (data.num_samples or the shards' count)")
        # batches per process and epoch, split over its DataLoader workers (each counts its own);
        # the loader's length lets Composer convert epochs (max_duration, warmup, save_interval)
        # (amortize.data.webdataset.epoch_batches: split sampling shares a process's shards among its workers)
        per_worker, epoch_len = epoch_batches(epoch_samples, recipe.data.batch_size, d.num_workers, len(urls),
                                              dist.get_world_size(), d.sampling == "resampled")
        pipeline = make_pipeline(
            urls, transform=open_clip_transform(image_size, is_train=True), tokenizer=tokenizer,
            batch_size=per, resampled=d.sampling == "resampled",
            shuffle_buffer=d.shuffle_buffer, seed=recipe.seed, epoch_batches=per_worker, offsets=offsets,
            drop_last=d.drop_last, counter=SkipCounter(d.max_skip_fraction, min_seen=d.skip_min_seen),
        ).with_length(epoch_len, silent=True)
        loader = DataLoader(pipeline, batch_size=None, num_workers=d.num_workers,
                            persistent_workers=d.num_workers > 0)
        return loader, total
    from amortize.train.components import DATASETS

    if d.name not in DATASETS:
        raise RecipeError(f"data.name: unknown dataset {d.name!r}; valid: {', '.join(sorted([*DATASETS, 'webdataset']))}")
    with _section("data"):
        dataset = build_dataset(recipe, tokenizer, image_size)
    if len(dataset) < recipe.data.batch_size:
        raise RecipeError(f"data.batch_size={recipe.data.batch_size} exceeds the dataset size {len(dataset)}")
    if not d.drop_last and -(-len(dataset) // dist.get_world_size()) % per == 1:
        # the sampler pads every process to ceil(N / W) samples: one left over is a batch without a negative
        raise RecipeError(f"data.drop_last=false would end every epoch with a one-sample batch ({len(dataset)} samples, "
                          f"{per} a batch per process), which has no negative: keep drop_last=true or change data.batch_size")
    sampler = dist.get_sampler(dataset, shuffle=True, drop_last=d.drop_last, seed=recipe.seed)
    loader = DataLoader(dataset, batch_size=per, sampler=sampler, drop_last=d.drop_last,
                        num_workers=d.num_workers, persistent_workers=d.num_workers > 0)
    return loader, len(dataset)


def build_composer_model(recipe: Recipe, num_samples: Optional[int] = None) -> ContrastiveComposerModel:
    """The :class:`ContrastiveComposerModel` of a recipe (towers, loss, the recipe as metadata)."""
    towers = build_two_tower(recipe)
    loss_fn = build_loss(recipe, towers.embed_dim, num_samples=num_samples)
    return ContrastiveComposerModel(towers, loss_fn, recipe=recipe_to_dict(recipe))


def build_trainer(
    recipe: Recipe,
    *,
    callbacks: Sequence[Any] = (),
    loggers: Sequence[Any] = (),
    train_dataloader: Any = None,
    num_samples: Optional[int] = None,
) -> Trainer:
    """Build everything a recipe names and return Composer's ``Trainer`` (call ``.fit()``).

    Args:
        recipe: the checked recipe.
        callbacks: extra Composer callbacks.
        loggers: extra Composer logger destinations.
        train_dataloader: use this instead of the recipe's data (tests); yields batch dicts.
        num_samples: dataset size when ``train_dataloader`` is given (moving averages).

    Returns:
        The Trainer, with the model, optimiser, scheduler, algorithms and checkpointing set up. A loss
        with a stateful estimator gets an :class:`~amortize.train.algorithms.EstimatorMonitorCallback`
        unless the recipe's ``callbacks:`` (or ``callbacks``) already holds one.
    """
    microbatching = microbatch_trainer_kwargs(recipe.device_train_microbatch_size, per_process_batch_size(recipe))
    reproducibility.seed_all(recipe.seed)
    if recipe.autoresume and dist.get_global_rank() == 0:
        # checkpoints are renamed into place; after a crash, point `latest` at the newest whole one
        from amortize.checkpoints import filename_regex, recover_latest

        recover_latest(recipe.resolved_save_folder(), recipe.save_latest_filename.format(rank=0),
                       filename_regex(recipe.save_filename, rank=0))
    plan = decide_start(recipe)
    model, tokenizer, train_dataloader, optimizer, scheduler = _components(recipe, train_dataloader, num_samples)
    if plan.replaced and dist.get_global_rank() == 0:
        for path in plan.replaced:  # save_overwrite=true: the earlier run's files go, so autoresume cannot mix them
            if os.path.lexists(path):
                os.unlink(path)
    algorithms: list[Any] = [FullBatchGuard(), *microbatching.pop("algorithms"), EpochSchedules(),
                             ClampLogitScale(recipe.max_scale)]
    if recipe.grad_clip_norm is not None:
        algorithms.append(GradientClipping(clipping_type="norm", clipping_threshold=recipe.grad_clip_norm))
    save_folder = recipe.resolved_save_folder()
    dv = recipe.divergence
    algorithms.append(DivergenceGuard(dv.policy, max_consecutive_skips=dv.max_consecutive_skips,
                                      restore_estimator=dv.restore_estimator, save_folder=save_folder))
    export = ExportWeights(save_folder)
    cbs: list[Any] = [LogLossTerms(), export,
                      SaveOnInterrupt(save_folder, recipe.save_filename, recipe.save_latest_filename, export)]
    counter = getattr(getattr(train_dataloader, "dataset", None), "counter", None)
    if counter is not None:
        cbs.append(DataSkipReport(counter))
    install_atomic_checkpoint_writes()
    e = recipe.eval
    if e.tasks != "none" and (e.every_n_epochs > 0 or e.every_n_batches > 0 or e.at_fit_end):
        from amortize.eval.callback import EvalCallback

        tasks = build_eval_tasks(recipe, image_size=_unwrap(model).model.image_size)
        cbs.append(EvalCallback(tokenizer, tasks, every_n_epochs=e.every_n_epochs, every_n_batches=e.every_n_batches,
                                at_fit_end=e.at_fit_end, batch_size=e.batch_size, print_table=True))
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
            optimizers=optimizer,
            schedulers=scheduler,
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
            # Composer sees one microbatch per batch (its own splitting would shrink the negatives;
            # it cannot infer the batch size of a webdataset loader); a smaller recipe microbatch
            # runs the gradient cache inside that step
            **microbatching,
            seed=recipe.seed,
            deterministic_mode=recipe.deterministic_mode,
        )
    trainer.amortize_plan = plan  # type: ignore[attr-defined]
    return trainer


def _components(recipe: Recipe, train_dataloader: Any = None, num_samples: Optional[int] = None) -> tuple:
    """(model, tokenizer, loader, optimizer, scheduler) of a recipe, errors named by recipe section."""
    import torch

    device = recipe.device or ("gpu" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and (recipe.precision or "fp32") != "fp32":
        raise RecipeError(f"precision: {recipe.precision} needs a GPU, and this run would use the CPU "
                          f"(device={recipe.device}); set precision=fp32 (or null) for the CPU")
    towers = build_two_tower(recipe)
    check_microbatch_model(recipe, towers)  # amortize.train.validate
    tokenizer = build_tokenizer(recipe, towers.context_length)
    if train_dataloader is None:
        train_dataloader, num_samples = build_dataloader(recipe, tokenizer, towers.image_size)
    loss_fn = build_loss(recipe, towers.embed_dim, num_samples=num_samples)
    model = ContrastiveComposerModel(towers, loss_fn, recipe=recipe_to_dict(recipe))
    with _section("optimizer"):
        optimizer = build_optimizer(model, recipe.optimizer)
    with _section("scheduler"):
        scheduler = build_scheduler(recipe.scheduler)
    return model, tokenizer, train_dataloader, optimizer, scheduler


def _recipe_extras(recipe: Recipe) -> dict[str, list[Any]]:
    """The recipe's ``loggers``, ``callbacks`` and ``algorithms``, each built once from its bound section."""
    b = bindings(recipe)
    return {key: [bound.build() for bound in b.many(key)] for key in ("loggers", "callbacks", "algorithms")}


def dry_run(recipe: Recipe) -> list[str]:
    """Build everything the run would (model, loss and estimator, data loader, optimizer, scheduler,
    the start decision) without training or writing a file.

    Returns:
        Lines describing what was built, for the console.

    Raises:
        RecipeError: naming the recipe key of anything that would fail when the run starts.
    """
    per = per_process_batch_size(recipe)
    plan = decide_start(recipe)
    model, _, loader, optimizer, scheduler = _components(recipe)
    extra = _recipe_extras(recipe)
    try:
        batches = len(loader)
    except TypeError:
        batches = None
    n_params = sum(p.numel() for p in model.model.parameters())
    est = type(model.loss_fn.estimator).__name__ if getattr(model.loss_fn, "estimator", None) is not None else "none"
    return [
        f"model: {recipe.model.name}, {n_params:,} encoder parameters; loss: {recipe.loss.objective}, estimator {est}",
        f"data: {recipe.data.name}, {batches if batches is not None else 'unknown'} batches of {per} per process "
        f"and epoch",
        f"optimizer: {type(optimizer).__name__}; scheduler: {type(scheduler).__name__ if scheduler else 'none'}",
        *(f"{key}: {', '.join(type(x).__name__ for x in built)}" for key, built in extra.items() if built),
        f"start: {plan.describe()}; checkpoints in {recipe.resolved_save_folder()}/",
        f"towers: {'from ' + recipe.model.pretrained if recipe.model.pretrained else 'initialised'}; "
        f"{locked_summary(model.model)}",
    ]

