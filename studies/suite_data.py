"""The datasets of the small-batch transfer suite (``studies/transfer.py``), built from what packages ship.

    python -m studies.suite_data            # build every dataset, print its split sizes and examples

Three real image-text sources of different kinds, each with ``train`` / ``val`` / ``test`` splits
drawn by image (identical images always fall on the same side), deterministic in ``data_seed``:

* ``emoji``: the compositional emoji benchmark of :mod:`studies.small_batch` (shipped emoji
  with their CLDR names, and composites of 2-4 tiles captioned by joining the tiles' names),
  with fewer training composites so that one run takes seconds. Unique captions; metric: mean
  R@1 of image-text retrieval over the evaluation split.
* ``fashion``: the shipped Fashion-MNIST images (``amortize/data/shipped``) with their varied
  training captions (one of 12 templates per image around the class phrase, "a grayscale photo
  of a sneaker."). Captions repeat (10 classes), so in-batch negatives are often false
  negatives; metric: zero-shot top-1 accuracy on 10 classes with the 5 held-out prompt
  templates (ensembled), on 2000 images of the shipped test split.
* ``glyphs``: every named character of the DejaVu Sans font (Debian ``fonts-dejavu-core``)
  rendered at 24 x 24, captioned by its Unicode name ("latin small letter e with circumflex and
  tilde", "cyrillic capital letter a"). Naturally noisy: different characters are drawn the
  same (Latin, Greek and Cyrillic capitals, a unit sign and its letter) and small marks carry the
  difference; metric: mean R@1 of retrieval over the evaluation split.

Every dataset is a :class:`SuiteData`: a pool of flattened images and, per split, ``(N, 4)``
pool ids (``-1`` pads; only composites use more than the first column), captions and compact
token ids, so one tower (:class:`studies.small_batch.SmallTwoTower`) reads them all.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from studies.small_batch import MAX_TILES, BenchData, Split, build_data

DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
GLYPH_SIZE = 24
FASHION_SIZE = 14

__all__ = ["SuiteData", "DATASETS", "build", "glyph_font_missing", "compact_tokens"]


@dataclass
class SuiteData(BenchData):
    """One dataset of the suite (a :class:`~studies.small_batch.BenchData` with its metric).

    Attributes:
        name: the dataset's name in :data:`DATASETS`.
        metric: ``"retrieval"`` (mean R@1, one caption per image) or ``"zeroshot"`` (top-1).
        labels: for ``"zeroshot"``: split -> long (N,) class ids.
        class_tokens: for ``"zeroshot"``: long (C, P, L) token ids of P prompts per class.
    """

    name: str = ""
    metric: str = "retrieval"
    labels: dict[str, Tensor] = field(default_factory=dict)
    class_tokens: Optional[Tensor] = None


def compact_tokens(splits: dict[str, Split], extra: Sequence[str] = (), context_length: int = 48):
    """Tokenise every split's captions into a vocabulary of the training captions' tokens.

    Sets ``split.tokens`` in place. Tokens that never occur in training map to 1 (unknown), padding
    to 0.

    Returns:
        ``(vocab_size, encode)``: ``encode(texts)`` gives (N, L) compact ids of other texts (prompts).
    """
    from amortize.data.tokenizer import Tokenizer

    tok = Tokenizer(context_length=context_length)
    raw = {k: tok(s.captions) for k, s in splits.items()}
    ids = torch.unique(raw["train"])
    ids = ids[ids != 0]
    lut = torch.ones(tok.vocab_size, dtype=torch.long)
    lut[0] = 0
    lut[ids] = torch.arange(2, 2 + len(ids))
    for k, s in splits.items():
        s.tokens = lut[raw[k]]
    return 2 + len(ids), (lambda texts: lut[tok(list(texts))])


def _single(ids: np.ndarray) -> Tensor:
    t = torch.full((len(ids), MAX_TILES), -1, dtype=torch.long)
    t[:, 0] = torch.as_tensor(ids, dtype=torch.long)
    return t


def _grey(images: np.ndarray) -> Tensor:
    """uint8 (N, H, W) -> float (N, H * W) in [-1, 1]."""
    return torch.as_tensor(images, dtype=torch.float32).div(127.5).sub(1.0).flatten(1)


def _split_groups(keys: Sequence, rng: np.random.Generator, val: float, test: float) -> dict[str, np.ndarray]:
    """Indices per split, drawn by group key (equal keys always in the same split)."""
    uniq = sorted(set(keys))
    perm = rng.permutation(len(uniq))
    n_val, n_test = int(round(val * len(uniq))), int(round(test * len(uniq)))
    side = {}
    for r, g in enumerate(perm):
        side[uniq[g]] = "test" if r < n_test else "val" if r < n_test + n_val else "train"
    out = {s: np.array([i for i, k in enumerate(keys) if side[k] == s], dtype=np.int64) for s in ("train", "val", "test")}
    return out


def build_emoji(data_seed: int = 0, train_composites: int = 600, eval_composites: int = 400) -> SuiteData:
    """The compositional emoji set, smaller than :mod:`studies.small_batch`'s (see the module docstring)."""
    d = build_data(data_seed, train_composites=train_composites, eval_composites=eval_composites, context_length=48)
    return SuiteData(d.pixels, d.splits, d.vocab_size, name="emoji", metric="retrieval")


def build_fashion(data_seed: int = 0, val_fraction: float = 0.1, test_images: int = 2000, train_images: int = 3000) -> SuiteData:
    """Fashion-MNIST with its varied training captions; zero-shot accuracy on held-out prompts."""
    from amortize.data.shipped import fashion_mnist_meta, load_arrays
    from amortize.data.transforms import uint8_to_float

    rng = np.random.default_rng(data_seed)
    meta = fashion_mnist_meta()
    tr, te = load_arrays("fashion_mnist_train.npz"), load_arrays("fashion_mnist_test.npz")
    n_tr = len(tr["labels"])
    small = lambda a: uint8_to_float(a, FASHION_SIZE, mean=(0.5,) * 3, std=(0.5,) * 3)[:, 0].flatten(1)
    test_ids = np.sort(rng.permutation(len(te["labels"]))[:test_images])
    pixels = torch.cat([small(tr["images"]), small(te["images"][test_ids])])
    perm = rng.permutation(n_tr)
    n_val = int(n_tr * val_fraction)
    caps = [meta["train_templates"][int(t)].format(meta["phrases"][int(c)]) for t, c in zip(tr["templates"], tr["labels"])]
    ids = {"train": np.sort(perm[n_val : n_val + train_images]), "val": np.sort(perm[:n_val]), "test": n_tr + np.arange(test_images)}
    labels = {"train": torch.as_tensor(tr["labels"][ids["train"]].astype(np.int64)),
              "val": torch.as_tensor(tr["labels"][ids["val"]].astype(np.int64)),
              "test": torch.as_tensor(te["labels"][test_ids].astype(np.int64))}
    zs = meta["zeroshot_templates"]
    splits = {
        "train": Split(_single(ids["train"]), [caps[i] for i in ids["train"]]),
        "val": Split(_single(ids["val"]), [caps[i] for i in ids["val"]]),
        "test": Split(_single(ids["test"]), [zs[0].format(meta["phrases"][int(c)]) for c in labels["test"]]),
    }
    vocab, encode = compact_tokens(splits)
    prompts = [t.format(p) for p in meta["phrases"] for t in zs]
    class_tokens = encode(prompts).view(len(meta["phrases"]), len(zs), -1)
    return SuiteData(pixels, splits, vocab, name="fashion", metric="zeroshot", labels=labels,
                     class_tokens=class_tokens)


def glyph_font_missing() -> Optional[str]:
    """Why the glyph set cannot be built here, or None."""
    if not DEJAVU.exists():
        return f"{DEJAVU} not found (Debian package fonts-dejavu-core)"
    try:
        import fontTools  # noqa: F401
    except ImportError:
        return "fontTools is not installed (it comes with matplotlib)"
    return None


def _render_glyphs(chars: Sequence[str], size: int = GLYPH_SIZE) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(DEJAVU), int(size * 0.8))
    out = np.zeros((len(chars), size, size), dtype=np.uint8)
    for i, ch in enumerate(chars):
        img = Image.new("L", (size, size), 0)
        ImageDraw.Draw(img).text((size / 2, size / 2), ch, fill=255, font=font, anchor="mm")
        out[i] = np.asarray(img)
    return out


def build_glyphs(data_seed: int = 0, val: float = 0.1, test: float = 0.1) -> SuiteData:
    """DejaVu Sans characters named by Unicode (see the module docstring)."""
    why = glyph_font_missing()
    if why:
        raise FileNotFoundError(f"cannot build the glyph set: {why}")
    from fontTools.ttLib import TTFont

    cmap = TTFont(str(DEJAVU)).getBestCmap()
    chars = [chr(c) for c in sorted(cmap)
             if unicodedata.name(chr(c), "") and unicodedata.category(chr(c))[0] in "LNSP"]
    images = _render_glyphs(chars)
    keep = images.reshape(len(chars), -1).max(1) > 0  # drawn at all
    chars, images = [c for c, k in zip(chars, keep) if k], images[keep]
    keys = [hashlib.sha1(im.tobytes()).hexdigest() for im in images]  # identical drawings: one group
    ids = _split_groups(keys, np.random.default_rng(data_seed), val, test)
    caps = [unicodedata.name(c).lower() for c in chars]
    splits = {k: Split(_single(v), [caps[i] for i in v]) for k, v in ids.items()}
    vocab, _ = compact_tokens(splits)
    return SuiteData(_grey(images), splits, vocab, name="glyphs", metric="retrieval")


DATASETS: dict[str, Callable[..., SuiteData]] = {"emoji": build_emoji, "fashion": build_fashion, "glyphs": build_glyphs}
"""The suite's datasets: name -> builder (``data_seed`` as its only argument that runs change)."""

_CACHE: dict[tuple[str, int], SuiteData] = {}


def build(name: str, data_seed: int = 0) -> SuiteData:
    """The dataset ``name`` (cached per process)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    if (name, data_seed) not in _CACHE:
        _CACHE[(name, data_seed)] = DATASETS[name](data_seed)
    return _CACHE[(name, data_seed)]


def main() -> None:
    """Build every dataset; print split sizes, vocabulary and a few captions."""
    for name in DATASETS:
        d = build(name)
        sizes = {k: len(s) for k, s in d.splits.items()}
        print(f"{name}: {sizes} pool {tuple(d.pixels.shape)} vocab {d.vocab_size} metric {d.metric}")
        for c in d.splits["train"].captions[:: max(1, len(d.splits['train']) // 4)][:4]:
            print("   ", c)


if __name__ == "__main__":
    main()
