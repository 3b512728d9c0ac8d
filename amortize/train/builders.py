"""Recipe -> Composer ``Trainer``: the one place where a recipe becomes a training run.

>>> from amortize.train.config import load_recipe
>>> trainer = build_trainer(load_recipe("recipes/default.yaml", ["max_duration=2ba"]))  # doctest: +SKIP
>>> trainer.fit()  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

from composer import Trainer
from composer.algorithms import GradientClipping
from composer.utils import dist, reproducibility
from torch.utils.data import DataLoader

from amortize.train.algorithms import ClampLogitScale, EpochSchedules, ExportWeights, FullBatchGuard, LogLossTerms
from amortize.train.components import build_dataset, build_loss, build_tokenizer, build_two_tower
from amortize.train.config import Recipe, RecipeError, recipe_to_dict
from amortize.train.gradcache import microbatch_trainer_kwargs
from amortize.train.guards import DataSkipReport, DivergenceGuard, install_atomic_checkpoint_writes
from amortize.train.model import ContrastiveComposerModel
from amortize.train.optim import build_optimizer, build_scheduler

__all__ = ["per_process_batch_size", "build_dataloader", "build_composer_model", "build_trainer"]


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
        from amortize.data.webdataset import SkipCounter, make_pipeline, open_clip_transform

        epoch_batches = None
        if d.num_samples:
            # batches per process and epoch, split over its DataLoader workers (each counts its own)
            epoch_batches = max(1, d.num_samples // recipe.data.batch_size // max(1, d.num_workers))
        pipeline = make_pipeline(
            d.shards, transform=open_clip_transform(image_size, is_train=True), tokenizer=tokenizer,
            batch_size=per, resampled=d.sampling == "resampled",
            shuffle_buffer=d.shuffle_buffer, seed=recipe.seed, epoch_batches=epoch_batches,
            drop_last=d.drop_last, counter=SkipCounter(d.max_skip_fraction, min_seen=d.skip_min_seen),
        )
        loader = DataLoader(pipeline, batch_size=None, num_workers=d.num_workers,
                            persistent_workers=d.num_workers > 0)
        return loader, d.num_samples
    dataset = build_dataset(recipe, tokenizer, image_size)
    if len(dataset) < recipe.data.batch_size:
        raise RecipeError(f"data.batch_size={recipe.data.batch_size} exceeds the dataset size {len(dataset)}")
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
        The Trainer, with the model, optimiser, scheduler, algorithms and checkpointing set up.
    """
    microbatching = microbatch_trainer_kwargs(recipe.device_train_microbatch_size, per_process_batch_size(recipe))
    reproducibility.seed_all(recipe.seed)
    towers = build_two_tower(recipe)
    tokenizer = build_tokenizer(recipe, towers.context_length)
    if train_dataloader is None:
        train_dataloader, num_samples = build_dataloader(recipe, tokenizer, towers.image_size)
    loss_fn = build_loss(recipe, towers.embed_dim, num_samples=num_samples)
    model = ContrastiveComposerModel(towers, loss_fn, recipe=recipe_to_dict(recipe))
    optimizer = build_optimizer(model, recipe.optimizer)
    algorithms: list[Any] = [FullBatchGuard(), *microbatching.pop("algorithms"), EpochSchedules(),
                             ClampLogitScale(recipe.max_logit_scale)]
    if recipe.grad_clip_norm is not None:
        algorithms.append(GradientClipping(clipping_type="norm", clipping_threshold=recipe.grad_clip_norm))
    save_folder = recipe.resolved_save_folder()
    dv = recipe.divergence
    algorithms.append(DivergenceGuard(dv.policy, max_consecutive_skips=dv.max_consecutive_skips,
                                      restore_estimator=dv.restore_estimator, save_folder=save_folder))
    cbs: list[Any] = [LogLossTerms(), ExportWeights(save_folder)]
    counter = getattr(getattr(train_dataloader, "dataset", None), "counter", None)
    if counter is not None:
        cbs.append(DataSkipReport(counter))
    # checkpoints are renamed into place; after a crash, point `latest` at the newest whole one
    install_atomic_checkpoint_writes()
    if recipe.autoresume and dist.get_global_rank() == 0:
        from amortize.checkpoints import filename_regex, recover_latest

        recover_latest(save_folder, recipe.save_latest_filename.format(rank=0),
                       filename_regex(recipe.save_filename, rank=0))
    e = recipe.eval
    if e.tasks == "default" and (e.every_n_epochs > 0 or e.at_fit_end):
        from amortize.eval.callback import EvalCallback

        cbs.append(EvalCallback(tokenizer, every_n_epochs=e.every_n_epochs, at_fit_end=e.at_fit_end,
                                batch_size=e.batch_size, print_table=True))
    elif e.tasks not in ("none", "default"):
        raise RecipeError(f"eval.tasks: {e.tasks!r} is not one of default, none")
    cbs.extend(callbacks)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(deterministic|microbatch|No optimizer|step_schedulers).*")
        trainer = Trainer(
            model=model,
            train_dataloader=train_dataloader,
            max_duration=recipe.max_duration,
            optimizers=optimizer,
            schedulers=build_scheduler(recipe.scheduler),
            step_schedulers_every_batch=True,
            algorithms=algorithms,
            callbacks=cbs,
            loggers=list(loggers),
            run_name=recipe.run_name,
            progress_bar=recipe.progress_bar,
            log_to_console=recipe.log_to_console,
            console_log_interval=recipe.console_log_interval,
            save_folder=save_folder,
            save_interval=recipe.save_interval,
            save_filename=recipe.save_filename,
            save_latest_filename=recipe.save_latest_filename,
            save_overwrite=recipe.save_overwrite,
            save_num_checkpoints_to_keep=recipe.save_num_checkpoints_to_keep,
            load_path=recipe.load_path,
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
    return trainer

