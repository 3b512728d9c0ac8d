"""Random image-text pairs with a learnable pairing, for tests and smoke runs (``data.name: synthetic``)."""

from __future__ import annotations

from typing import Annotated, Callable, Optional

import torch
from torch.utils.data import Dataset

from amortize.options import Range

__all__ = ["SyntheticPairs", "synthetic_train"]


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


def synthetic_train(tokenizer: Callable, image_size: int, *, batch_size: int, seed: int = 0,
                    num_samples: Annotated[Optional[int], Range(lo=1)] = None,
                    num_classes: Annotated[int, Range(lo=1)] = 16) -> SyntheticPairs:
    """The ``synthetic`` training data of a recipe.

    Args:
        tokenizer: its ``context_length`` sets the token positions.
        image_size: side S.
        batch_size: the global batch (the default size is four of them).
        seed: generator seed (the recipe's).
        num_samples: how many samples (None: ``4 * batch_size``).
        num_classes: distinct pairs.
    """
    n = num_samples if num_samples is not None else 4 * batch_size
    return SyntheticPairs(n, image_size, tokenizer.context_length, num_classes=num_classes, seed=seed)
