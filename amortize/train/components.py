"""Recipe -> plain-torch components: the two-tower model, the loss, the tokenizer, the datasets.

Nothing here imports Composer, so ``amortize eval`` and notebooks can rebuild a trained model
from a recipe without it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch
from torch.utils.data import Dataset

from amortize.losses import ContrastiveLoss
from amortize.models import TwoTowerModel, build_model
from amortize.options import RecipeError, keyed
from amortize.registry import Bound, Registry
from amortize.train.schema import DataConfig, Recipe
from amortize.train.sections import bindings
from amortize.train.validate import check_estimator_dim

__all__ = [
    "DATASETS",
    "SyntheticPairs",
    "build_two_tower",
    "build_loss",
    "build_tokenizer",
    "build_dataset",
    "build_eval_tasks",
]

DATASETS: Registry[Any] = Registry("dataset")
"""Map-style training datasets: ``(cfg: DataConfig, tokenizer, image_size, seed) -> Dataset``.

``webdataset`` is not here: it is an iterable pipeline built by
:func:`amortize.train.builders.build_dataloader`.
"""


class SyntheticPairs(Dataset):
    """Random images and token sequences with a learnable pairing, for tests and smoke runs.

    Sample ``i`` belongs to class ``i % num_classes``; its image is the class's pattern plus
    noise and its text the class's token sequence, so contrastive training can fit it.

    Args:
        num_samples: N.
        image_size: side S.
        context_length: token positions L.
        num_classes: distinct pairs.
        seed: generator seed.

    Items: ``{"image": (3, S, S) float, "text": (L,) int64, "index": () int64}``.
    """

    def __init__(self, num_samples: int, image_size: int, context_length: int, num_classes: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        classes = torch.arange(num_samples) % num_classes
        patterns = torch.randn(num_classes, 3, image_size, image_size, generator=g)
        self.images = patterns[classes] + 0.5 * torch.randn(num_samples, 3, image_size, image_size, generator=g)
        words = torch.randint(1, 49000, (num_classes, max(1, context_length - 2)), generator=g)
        self.tokens = torch.zeros(num_samples, context_length, dtype=torch.long)
        self.tokens[:, 0] = 49406  # start of text
        self.tokens[:, 1:-1] = words[classes]
        self.tokens[:, -1] = 49407  # end of text (the argmax pooled position)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "text": self.tokens[i], "index": torch.tensor(i, dtype=torch.long)}


def _shipped(cfg: DataConfig, tokenizer: Callable, image_size: int, seed: int) -> Dataset:
    from amortize.data.shipped import default_train_dataset

    return default_train_dataset(tokenizer, image_size=image_size)


def _synthetic(cfg: DataConfig, tokenizer: Callable, image_size: int, seed: int) -> Dataset:
    n = cfg.num_samples if cfg.num_samples is not None else 4 * cfg.batch_size
    return SyntheticPairs(n, image_size, tokenizer.context_length, seed=seed)


DATASETS.register("shipped", _shipped)
DATASETS.register("synthetic", _synthetic)


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
    if not start and (m.pretrained is not None or m.lock_image is not None or m.lock_text is not None):
        bare = dataclasses.replace(m, pretrained=None, lock_image=None, lock_text=None)
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
    b, c = bindings(recipe), recipe.loss
    check_estimator_dim(c.estimator, embed_dim)  # amortize.train.validate
    est = b.get("loss.estimator")
    estimator = None
    if est is not None:
        _check_estimator_size(est, num_samples)
        estimator = est.build(dim=embed_dim, num_samples=num_samples)
    objective = b.get("loss.objective").build()
    layout = b.get("loss.layout").build()
    rho = b.get("loss.rho")
    try:
        return ContrastiveLoss(objective, estimator, layout=layout, rho=rho.build() if rho is not None else c.rho,
                               chunk_size=c.chunk_size)
    except (TypeError, ValueError) as e:
        raise keyed("loss", e) from None


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
    return get_tokenizer(None if name == "simple" else name, context_length=context_length)


def build_dataset(recipe: Recipe, tokenizer: Callable, image_size: int) -> Dataset:
    """The map-style training dataset named by ``data.name`` (see :data:`DATASETS`)."""
    return DATASETS.build(recipe.data.name, recipe.data, tokenizer, image_size, recipe.seed)


def build_eval_tasks(recipe: Recipe, image_size: int) -> Optional[list]:
    """The evaluation tasks of ``eval.tasks``: None for ``none``, the shipped ones for ``default``,
    else each bound section built (its folder or CSV read now, its images when evaluated).

    Raises:
        RecipeError: under ``eval.tasks[i]`` for a missing file or a folder that cannot be read.
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
        out.extend(built if isinstance(built, list) else [built])
    return out
