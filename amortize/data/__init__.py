"""Data: the shipped datasets, the webdataset pipeline for CC3M/CC12M-style shards, tokenisation,
and :data:`DATASETS`, the training data a recipe's ``data`` section names.

Heavy optional dependencies (open_clip, webdataset) are imported only when used.
"""

from typing import Annotated

from amortize.data.shipped import (
    ImageTextDataset,
    default_train_dataset,
    emoji_pairs,
    fashion_mnist_train,
)
from amortize.data.tokenizer import Tokenizer, get_tokenizer
from amortize.options import NONNEGATIVE, Range, RecipeError
from amortize.registry import Registry

__all__ = [
    "DATASETS",
    "ImageTextDataset",
    "check_data_options",
    "Tokenizer",
    "default_train_dataset",
    "emoji_pairs",
    "fashion_mnist_train",
    "get_tokenizer",
    "loader_options",
]


def loader_options(batch_size: Annotated[int, Range(lo=2)] = 256, num_workers: Annotated[int, NONNEGATIVE] = 0,
                   drop_last: bool = True, tokenizer: str = "simple") -> None:
    """The options every ``data`` section takes beside its dataset's own (the loader's and the tokenizer's).

    Args:
        batch_size: the GLOBAL batch size (split evenly over processes).
        num_workers: DataLoader worker processes.
        drop_last: drop an incomplete final batch (keep True: contrastive batches should be full).
        tokenizer: open_clip tokenizer name, or ``simple`` (the bundled CLIP BPE).
    """


def check_data_options(options: dict) -> None:
    """The ``data`` section's checks across its options (bound, with their defaults), at load:
    ``sampling: resampled`` needs ``num_samples`` (it sets the epoch length).

    Raises:
        RecipeError: naming the keys.
    """
    if options.get("sampling") == "resampled" and not options.get("num_samples"):
        raise RecipeError("data.sampling 'resampled' needs data.num_samples (it sets the epoch length)")


DATASETS: Registry = Registry("dataset", shared=loader_options)
"""Training data by name, each constructor called as ``ctor(tokenizer, image_size, **options)`` and
offered ``batch_size`` (global), ``world_size``, ``seed``, ``num_workers`` and ``drop_last`` when it
names them. It returns a map-style dataset (sharded over processes by a seeded sampler) or an
iterable of per-process batches with a length (``webdataset``).

* ``shipped``: Fashion-MNIST + emoji, in the package (:func:`~amortize.data.shipped.default_train_dataset`);
* ``webdataset``: img2dataset shards (:func:`~amortize.data.webdataset.webdataset_train`: ``shards``,
  ``num_samples``, ``shuffle_buffer``, ``max_skip_fraction``, ``skip_min_seen``, ``sampling``);
* ``synthetic``: random pairs for tests (:func:`~amortize.data.synthetic.synthetic_train`: ``num_samples``, ``num_classes``).

A user's ``imports:`` file adds its own with ``DATASETS.register("name", my_dataset)``.
"""

DATASETS.register("shipped", default_train_dataset)
DATASETS.register_import("synthetic", "amortize.data.synthetic:synthetic_train")
DATASETS.register_import("webdataset", "amortize.data.webdataset:webdataset_train")
