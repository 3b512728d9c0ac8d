"""Recipe -> plain-torch components: the two-tower model, the loss, the tokenizer, the datasets.

Nothing here imports Composer, so ``amortize eval`` and notebooks can rebuild a trained model
from a recipe without it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch.utils.data import Dataset

from amortize.losses import ContrastiveLoss
from amortize.models import TwoTowerModel, build_model
from amortize.train.config import DataConfig, Recipe, RecipeError
from amortize.registry import Registry, SectionError

__all__ = [
    "DATASETS",
    "SyntheticPairs",
    "build_two_tower",
    "build_loss",
    "build_tokenizer",
    "build_dataset",
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

    Args:
        recipe: the recipe.
        start: also load ``model.pretrained`` and apply ``model.lock_image`` / ``model.lock_text``
            (what a run starts from); False builds the bare towers (``amortize eval`` then loads
            the trained weights into them).
    """
    m = recipe.model
    scale = m.init_logit_scale if m.init_logit_scale is not None else math.log(1 / 0.07)
    model = build_model(m.name, image_size=m.image_size, context_length=m.context_length,
                        init_logit_scale=scale, init_logit_bias=m.init_logit_bias)
    if start:
        from amortize.interop.pretrained import PretrainedError, start_towers

        try:
            start_towers(model, m.pretrained, m.lock_image, m.lock_text, model_name=m.name)
        except (PretrainedError, FileNotFoundError) as e:
            msg = str(e)
            raise RecipeError(msg if msg.startswith("model.") else f"model.pretrained: {msg}") from None
    return model


def build_loss(recipe: Recipe, embed_dim: int, num_samples: Optional[int] = None) -> ContrastiveLoss:
    """The :class:`~amortize.losses.ContrastiveLoss` of a recipe (:meth:`~amortize.losses.ContrastiveLoss.from_sections`).

    Args:
        recipe: the recipe.
        embed_dim: the model's embedding width ``d`` (``dim`` of the estimator).
        num_samples: dataset size (``num_samples`` of per-sample estimators).

    Raises:
        RecipeError: naming the key of a bad section or a missing dataset size.
    """
    c = recipe.loss
    try:
        return ContrastiveLoss.from_sections(c.objective, c.estimator, layout=c.layout, rho=c.rho,
                                             chunk_size=c.chunk_size,
                                             context={"dim": embed_dim, "num_samples": num_samples})
    except (SectionError, ValueError) as e:
        msg = str(e)
        if "'num_samples'" in msg:
            msg += " or data.num_samples (the dataset size)"
        raise RecipeError(msg) from None


def build_tokenizer(recipe: Recipe, context_length: int):
    """The tokenizer of a recipe (``data.tokenizer``) with the model's context length."""
    from amortize.data.tokenizer import get_tokenizer

    name = recipe.data.tokenizer
    return get_tokenizer(None if name == "simple" else name, context_length=context_length)


def build_dataset(recipe: Recipe, tokenizer: Callable, image_size: int) -> Dataset:
    """The map-style training dataset named by ``data.name`` (see :data:`DATASETS`)."""
    return DATASETS.build(recipe.data.name, recipe.data, tokenizer, image_size, recipe.seed)
