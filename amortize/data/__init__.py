"""Data: the shipped datasets, the webdataset pipeline for CC3M/CC12M-style shards, tokenisation.

Heavy optional dependencies (open_clip, webdataset) are imported only when used.
"""

from amortize.data.shipped import (
    ImageTextDataset,
    default_train_dataset,
    emoji_pairs,
    fashion_mnist_train,
)
from amortize.data.tokenizer import Tokenizer, get_tokenizer

__all__ = [
    "ImageTextDataset",
    "Tokenizer",
    "default_train_dataset",
    "emoji_pairs",
    "fashion_mnist_train",
    "get_tokenizer",
]
