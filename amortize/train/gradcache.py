"""Gradient-cached microbatching in Composer: ``device_train_microbatch_size`` in a recipe turns it on.

Composer's own microbatching runs the loss once per microbatch, which shrinks the negatives of a
contrastive objective. Instead Composer is told that the batch is one microbatch, and the two
passes of :mod:`amortize.gradcache` run inside that one step:

* ``forward`` (:class:`~amortize.train.model.ContrastiveComposerModel`, given the gradient cache's
  passes by :func:`build_gradient_cache`, which decides the rows per microbatch once, from the
  recipe's ``device_train_microbatch_size`` when that is smaller than the per-process batch, after
  the one check of the towers; :class:`~amortize.gradcache.GradientCachePasses` is the one place
  they are held): encodes the microbatches without a graph; its outputs are leaf tensors.
* ``loss`` and Composer's backward: the loss of the whole per-process batch, once (all negatives,
  one estimator update), backpropagated to those leaves (and scaled by Composer's gradient scaler
  under ``amp_fp16``).
* :class:`GradientCache` on AFTER_BACKWARD: re-encodes each microbatch under the run's precision
  context with its random state replayed and backpropagates the cached gradients into the towers.
  It runs before every other algorithm on that event (see :func:`gradient_cache_first`), so the
  :class:`~amortize.train.algorithms.DivergenceGuard` checks the complete gradients.
* Under several processes the trainer uses Composer's ``forced_sync`` DDP strategy: the whole step
  runs under ``no_sync`` and Composer all-reduces every gradient after AFTER_BACKWARD, so the
  encoder gradients of all microbatches are averaged once.

* :class:`FullBatchGuard` on AFTER_DATALOADER: refuses Composer's own microbatching (a
  ``device_train_microbatch_size`` below the batch, or ``auto``), which would shrink the negatives.

What this relies on in Composer beyond its documented interface is listed in
:data:`COMPOSER_CONTRACT` and checked against the installed Composer by
``tests/integration/test_gradcache.py::test_composer_contract``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from composer.core import Algorithm, Event, State, get_precision_context
from composer.loggers import Logger
from torch import nn

from amortize.gradcache import GradientCachePasses, check_microbatchable
from amortize.options import RecipeError
from amortize.train.compat import PINNED_COMPOSER
from amortize.train.model import unwrap
from amortize.train.schema import Recipe

__all__ = ["GradientCache", "FullBatchGuard", "gradient_cache_first", "build_gradient_cache", "microbatch_trainer_kwargs",
           "COMPOSER_CONTRACT", "COMPOSER_VERSION"]

COMPOSER_VERSION = PINNED_COMPOSER  # the one pin (amortize.train.compat); pyproject.toml states it too
"""The Composer release whose training step :data:`COMPOSER_CONTRACT` was checked against."""

COMPOSER_CONTRACT = (
    "Trainer._train_microbatch runs, in order: the model's forward, loss(), the backward of the loss "
    "scaled by microbatch_size / batch_size (1 with one microbatch per batch), then Event.AFTER_BACKWARD, "
    "all inside ddp_sync_context; under DDPSyncStrategy.FORCED_SYNC that context is no_sync and it "
    "all-reduces and averages every optimizer parameter's gradient when the final microbatch leaves it, "
    "before Event.AFTER_TRAIN_BATCH and the optimizer step."
)
"""The order of Composer's training step the gradient cache relies on (Composer private code)."""


class FullBatchGuard(Algorithm):
    """Refuse Composer's own microbatching: contrastive objectives need the whole per-process batch as negatives.

    A ``Trainer`` whose ``device_train_microbatch_size`` is below the batch splits each batch and
    runs the loss on each microbatch separately, so every sample would contrast only against its
    own microbatch: that cannot be made exact, and is an error. :func:`~amortize.train.builders.build_trainer`
    never asks Composer to split; a recipe's ``device_train_microbatch_size`` runs the exact
    gradient cache inside one Composer microbatch instead (:mod:`amortize.train.gradcache`).
    Composer's automatic microbatching (``auto``) is refused too: after an out-of-memory error it
    retries the batch, which would update the estimator's state twice.
    """

    def match(self, event: Event, state: State) -> bool:
        """Run on AFTER_DATALOADER."""
        return event == Event.AFTER_DATALOADER

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        """Raise if the batch would be split."""
        batch = state.batch.get("image") if isinstance(state.batch, dict) else None
        n = int(batch.shape[0]) if batch is not None else None
        mb = state.device_train_microbatch_size
        if getattr(state, "auto_microbatching", False) or (n is not None and mb is not None and int(mb) < n):
            raise ValueError(
                f"Composer's device_train_microbatch_size={mb} is smaller than the batch ({n}): Composer's "
                "microbatching splits the batch and so shrinks the negatives of the contrastive objective (each "
                "microbatch would contrast only against itself; 'auto' would also retry a batch after running out "
                "of memory and update the estimator twice). Pass the microbatch size to the recipe instead "
                "(device_train_microbatch_size=N with build_trainer), which runs the exact gradient cache "
                "(amortize.train.gradcache.GradientCache) inside one Composer microbatch."
            )


class GradientCache(Algorithm):
    """Run the gradient cache's second pass after Composer's backward (AFTER_BACKWARD).

    The rows per microbatch are held by the model's gradient cache (this algorithm holds no copy);
    the towers were checked for microbatching once, by :func:`build_gradient_cache`, which
    decided that size. On AFTER_BACKWARD it calls the model's ``backward_cached`` under the run's
    precision context.
    """

    def match(self, event: Event, state: State) -> bool:
        """Run on every AFTER_BACKWARD."""
        return event == Event.AFTER_BACKWARD

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        """Run the second pass of the latest batch."""
        with get_precision_context(state.precision, state.precision_config):
            unwrap(state.model).backward_cached()


def gradient_cache_first(algorithms: Sequence[Algorithm], event: Event) -> Sequence[Algorithm]:
    """Composer algorithm pass: on AFTER_BACKWARD, :class:`GradientCache` runs before the others.

    Composer runs AFTER_* events in reverse order of the algorithm list; whatever the order, the
    towers' gradients must be complete before a guard reads them.
    """
    if event != Event.AFTER_BACKWARD:
        return algorithms
    first = [a for a in algorithms if isinstance(a, GradientCache)]
    return first + [a for a in algorithms if not isinstance(a, GradientCache)]


def build_gradient_cache(recipe: Recipe, towers: nn.Module, per_process_batch: int) -> Optional[GradientCachePasses]:
    """The gradient cache of a recipe: ``device_train_microbatch_size`` rows per microbatch when
    that is smaller than the per-process batch, else None (every batch is encoded at once).

    The one check of the towers for microbatching and the one place the size is decided; the
    builder gives the result to the model (whose forward runs its first pass) and to
    :func:`microbatch_trainer_kwargs`.

    Args:
        recipe: the checked recipe (its ``device_train_microbatch_size`` typed at load; its range is
            checked here, by :class:`~amortize.gradcache.GradientCachePasses`).
        towers: the recipe's towers.
        per_process_batch: rows per process and batch.

    Raises:
        RecipeError: ``device_train_microbatch_size: model 'RN50': ... BatchNorm2d ...`` for towers
            the gradient cache cannot make exact (BatchNorm in training mode), or
            ``device_train_microbatch_size: must be >= 1, got 0``, before the run starts.
    """
    rows = recipe.device_train_microbatch_size
    if rows is None:
        return None
    try:
        check_microbatchable(towers)
    except ValueError as e:
        raise RecipeError(f"model {recipe.model.name!r}: {e}", key="device_train_microbatch_size") from None
    if rows >= per_process_batch:
        return None
    try:
        return GradientCachePasses(rows)  # the size's one check (at least 1)
    except RecipeError as e:
        raise RecipeError(e.reason, key="device_train_microbatch_size") from None


def microbatch_trainer_kwargs(gradient_cache: Optional[GradientCachePasses], per_process_batch: int) -> dict[str, Any]:
    """The Trainer arguments for the gradient cache.

    Composer's ``device_train_microbatch_size`` is always the whole per-process batch: Composer
    sees one microbatch per batch. A gradient cache (the one :func:`build_gradient_cache` gave the
    model) turns the cache on: the :class:`GradientCache` algorithm (under ``"algorithms"``: add
    these to the trainer's algorithms), its algorithm pass and the ``forced_sync`` DDP strategy.

    Args:
        gradient_cache: the model's gradient cache, or None (no cache).
        per_process_batch: rows per process and batch.

    Returns:
        ``{"algorithms": [...], "device_train_microbatch_size": per_process_batch}`` plus, with the
        gradient cache, ``"ddp_sync_strategy"`` and ``"algorithm_passes"``.
    """
    out: dict[str, Any] = {"algorithms": [], "device_train_microbatch_size": per_process_batch}
    if gradient_cache is not None:
        out.update(algorithms=[GradientCache()], ddp_sync_strategy="forced_sync",
                   algorithm_passes=[gradient_cache_first])
    return out
