import json

import numpy as np
import torch

from amortize.data import default_train_dataset, emoji_pairs, get_tokenizer
from amortize.eval import default_tasks as default_eval_tasks
from amortize.data.shipped import (
    emoji_captions,
    emoji_indices,
    fashion_mnist_meta,
    fashion_mnist_train_captions,
    load_arrays,
    load_meta,
)


def test_array_shapes_and_types():
    tr, te, em = (load_arrays(f) for f in ("fashion_mnist_train.npz", "fashion_mnist_test.npz", "emoji.npz"))
    assert tr["images"].shape == (6000, 28, 28) and tr["images"].dtype == np.uint8
    assert np.bincount(tr["labels"]).tolist() == [600] * 10
    assert te["images"].shape == (10000, 28, 28) and np.bincount(te["labels"]).tolist() == [1000] * 10
    assert em["images"].shape[1:] == (28, 28, 3) and len(em["split"]) == len(load_meta("emoji.json")["names"])


def test_captions_and_prompts():
    meta = fashion_mnist_meta()
    assert not set(meta["zeroshot_templates"]) & set(meta["train_templates"])
    caps = fashion_mnist_train_captions()
    assert len(set(caps)) > 50 and all(c.strip() for c in caps)
    assert len(set(emoji_captions())) == len(emoji_captions())


def test_emoji_split_keeps_skin_tones_together():
    em = load_arrays("emoji.npz")
    for g in np.unique(em["group"]):
        assert len(np.unique(em["split"][em["group"] == g])) == 1
    n_test = len(emoji_indices("test"))
    assert 200 < n_test < 600 and n_test + len(emoji_indices("train")) == len(em["split"])
    names = load_meta("emoji.json")["names"]
    toned = [n for n in names if "skin tone" in n]
    assert toned, "skin-tone variants should be present"


def test_default_train_dataset_items():
    tok = get_tokenizer(context_length=32)
    ds = default_train_dataset(tok)
    assert len(ds) == 6000 + len(emoji_indices("train"))
    for i in (0, 5999, 6000, len(ds) - 1):
        item = ds[i]
        assert item["image"].shape == (3, 28, 28) and item["image"].dtype == torch.float32
        assert item["text"].shape == (32,) and item["text"].dtype == torch.long
        assert item["index"].shape == () and item["index"].item() == i
    assert ds.captions[-1].startswith("an emoji of")
    big = emoji_pairs(tok, "test", image_size=32)
    assert big[0]["image"].shape == (3, 32, 32)


def test_default_eval_tasks():
    zs, ret = default_eval_tasks()
    assert zs.name == "fashion_mnist_test" and len(zs.images) == 10000 and len(zs.classnames) == 10
    assert ret.name == "emoji_heldout" and len(ret.images) == len(ret.captions)
    assert zs.images[0:4].shape == (4, 3, 28, 28)
