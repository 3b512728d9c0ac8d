"""Loaders for the small real datasets shipped in ``amortize/data/shipped/``.

Everything here reads local ``.npz``/``.json`` files with numpy: no network, no system package.
The arrays are produced by ``scripts/prepare_data.py``:

| file | arrays |
|---|---|
| ``fashion_mnist_train.npz`` | ``images`` uint8 (6000, 28, 28), ``labels`` uint8 (6000,), ``templates`` uint8 (6000,), ``source_index`` int32 (6000,) |
| ``fashion_mnist_test.npz`` | ``images`` uint8 (10000, 28, 28), ``labels`` uint8 (10000,) |
| ``emoji.npz`` | ``images`` uint8 (3789, 28, 28, 3), ``split`` uint8 (3789,) 0 train / 1 held out, ``group`` int32 (3789,) |

Datasets return dicts ``{"image": float (3, S, S), "text": long (L,), "index": long ()}`` where
``index`` is the sample's position in the dataset (the key of the per-sample moving averages).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from amortize.data.transforms import CLIP_MEAN, CLIP_STD, ImageArray

SHIPPED_DIR = Path(__file__).resolve().with_name("shipped")
"""Folder holding the shipped arrays (``.npz``), their metadata (``.json``) and licence notes."""

TokenizerFn = Callable[[Sequence[str]], torch.Tensor]
"""A tokenizer: a list of N captions -> (N, L) int64 token ids."""


def shipped_path(filename: str) -> Path:
    """Path of a shipped file, with a clear error when it is absent.

    Args:
        filename: e.g. ``"emoji.npz"``.

    Raises:
        FileNotFoundError: naming the file and how to regenerate it.
    """
    path = SHIPPED_DIR / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"shipped data file {path} is missing; regenerate it with "
            "`python scripts/prepare_data.py` or reinstall the package")
    return path


@lru_cache(maxsize=None)
def load_arrays(filename: str) -> dict[str, np.ndarray]:
    """All arrays of a shipped ``.npz`` file (cached; treat them as read-only)."""
    with np.load(shipped_path(filename)) as f:
        return {k: f[k] for k in f.files}


@lru_cache(maxsize=None)
def load_meta(filename: str) -> dict:
    """The parsed JSON of a shipped metadata file (cached)."""
    return json.loads(shipped_path(filename).read_text(encoding="utf-8"))


def tokenize_unique(tokenizer: TokenizerFn, captions: Sequence[str]) -> torch.Tensor:
    """Tokenise N captions, running the tokenizer once per distinct caption.

    Returns:
        LongTensor (N, L).
    """
    uniq: dict[str, int] = {}
    inverse = [uniq.setdefault(c, len(uniq)) for c in captions]
    tokens = tokenizer(list(uniq))
    return tokens[torch.tensor(inverse, dtype=torch.long)].long()


class ImageTextDataset(Dataset):
    """Paired images and captions held in memory.

    Args:
        pixels: uint8 (N, H, W) or (N, H, W, 3).
        captions: N strings.
        tokenizer: callable mapping captions to LongTensor (n, L).
        image_size: side S of the returned images.
        labels: optional int (N,) class labels, kept as ``self.labels`` (not returned by items).

    Items are ``{"image": float (3, S, S), "text": long (L,), "index": long ()}``.
    ``self.images`` is an [`ImageArray`][amortize.data.transforms.ImageArray] for batch access,
    ``self.tokens`` the LongTensor (N, L).
    """

    def __init__(self, pixels: np.ndarray, captions: Sequence[str], tokenizer: TokenizerFn, *,
                 image_size: int = 28, labels: np.ndarray | None = None,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        if len(pixels) != len(captions):
            raise ValueError(f"{len(pixels)} images but {len(captions)} captions")
        empty = [i for i, c in enumerate(captions) if not c.strip()]
        if empty:
            raise ValueError(f"{len(empty)} empty captions, first at index {empty[0]}")
        self.images = ImageArray(pixels, image_size, mean, std)
        self.captions = list(captions)
        self.tokens = tokenize_unique(tokenizer, self.captions)
        self.labels = None if labels is None else np.asarray(labels)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            i += len(self)
        return {"image": self.images[i], "text": self.tokens[i],
                "index": torch.tensor(i, dtype=torch.long)}


def fashion_mnist_meta() -> dict:
    """Class names, caption phrases, ``train_templates`` and the disjoint ``zeroshot_templates``."""
    return load_meta("fashion_mnist.json")


def fashion_mnist_train_captions() -> list[str]:
    """The 6000 training captions: template ``templates[i]`` filled with the class phrase."""
    meta, arr = fashion_mnist_meta(), load_arrays("fashion_mnist_train.npz")
    return [meta["train_templates"][t].format(meta["phrases"][y])
            for y, t in zip(arr["labels"].tolist(), arr["templates"].tolist())]


def fashion_mnist_train(tokenizer: TokenizerFn, image_size: int = 28) -> ImageTextDataset:
    """Fashion-MNIST training subset (600 per class) with templated captions.

    Returns:
        Dataset of 6000 items; images (3, S, S), text (L,).
    """
    arr = load_arrays("fashion_mnist_train.npz")
    return ImageTextDataset(arr["images"], fashion_mnist_train_captions(), tokenizer,
                            image_size=image_size, labels=arr["labels"])


def emoji_captions() -> list[str]:
    """One unique caption per emoji (3789), e.g. ``"an emoji of waving hand medium skin tone."``."""
    meta = load_meta("emoji.json")
    return [meta["caption_template"].format(n) for n in meta["names"]]


def emoji_indices(split: str) -> np.ndarray:
    """Row indices into ``emoji.npz`` of ``split``: ``"train"``, ``"test"`` (held out) or ``"all"``."""
    s = load_arrays("emoji.npz")["split"]
    if split == "all":
        return np.arange(len(s))
    if split not in ("train", "test"):
        raise ValueError(f"unknown emoji split {split!r}; expected 'train', 'test' or 'all'")
    return np.flatnonzero(s == (1 if split == "test" else 0))


def emoji_pairs(tokenizer: TokenizerFn, split: str = "train", image_size: int = 28) -> ImageTextDataset:
    """Emoji image-caption pairs of one split (train 3421, test 368 held out by base emoji)."""
    idx = emoji_indices(split)
    caps = emoji_captions()
    return ImageTextDataset(load_arrays("emoji.npz")["images"][idx], [caps[i] for i in idx],
                            tokenizer, image_size=image_size)


def default_train_dataset(tokenizer: TokenizerFn, image_size: int = 28) -> ImageTextDataset:
    """Training data of the default recipe: Fashion-MNIST subset followed by the emoji train split.

    Greyscale Fashion-MNIST is repeated over 3 channels so both parts share one image format.

    Args:
        tokenizer: callable mapping captions to LongTensor (n, L).
        image_size: side S of the returned images.

    Returns:
        Dataset of 6000 + 3421 = 9421 items ``{"image": (3, S, S), "text": (L,), "index": ()}``;
        ``index`` runs over the concatenation.
    """
    fm = load_arrays("fashion_mnist_train.npz")
    em_idx = emoji_indices("train")
    em_pixels = load_arrays("emoji.npz")["images"][em_idx]
    fm_rgb = np.repeat(fm["images"][..., None], 3, axis=-1)
    caps = emoji_captions()
    captions = fashion_mnist_train_captions() + [caps[i] for i in em_idx]
    return ImageTextDataset(np.concatenate([fm_rgb, em_pixels]), captions, tokenizer,
                            image_size=image_size)
