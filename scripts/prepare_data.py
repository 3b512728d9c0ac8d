#!/usr/bin/env python
"""Build the small image-text datasets shipped in ``amortize/data/shipped/``.

Sources (Debian packages, no network):

* ``dataset-fashion-mnist`` -> ``/usr/share/datasets/fashion-mnist/*.gz`` (MIT/Expat, Zalando SE).
* ``fonts-noto-color-emoji`` -> ``/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf`` (SIL OFL 1.1),
  rendered with Pillow (needs its libraqm layout engine for skin-tone and ZWJ sequences) and
  named with the CLDR short names of the ``emoji`` Python package.

Outputs (all deterministic; ``tests/data/test_prepare_data.py`` re-runs this script and compares):

* ``fashion_mnist_train.npz``: ``images`` uint8 (N, 28, 28), ``labels`` uint8 (N,),
  ``templates`` uint8 (N,) index into the training templates, ``source_index`` int32 (N,)
  position in the original 60k training file. N = 10 * ``--per-class``.
* ``fashion_mnist_test.npz``: ``images`` uint8 (10000, 28, 28), ``labels`` uint8 (10000,).
* ``fashion_mnist.json``: class names, caption phrases, training and zero-shot templates.
* ``emoji.npz``: ``images`` uint8 (M, 28, 28, 3) RGB on white, ``split`` uint8 (M,)
  (0 train, 1 held out), ``group`` int32 (M,) index of the base emoji (skin tones removed).
* ``emoji.json``: ``names`` (M,) unique caption names, ``chars`` (M,) the emoji strings,
  ``caption_template``.

Usage::

    python scripts/prepare_data.py [--out amortize/data/shipped] [--per-class 600]
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import zlib
from pathlib import Path

import numpy as np

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "amortize" / "data" / "shipped"

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# Noun phrases with their article, used inside the templates.
FASHION_PHRASES = [
    "a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat",
    "a sandal", "a shirt", "a sneaker", "a bag", "an ankle boot",
]
# Captions seen in training. Zero-shot prompts below never appear here.
TRAIN_TEMPLATES = [
    "a photo of {}.",
    "a grayscale photo of {}.",
    "{} on a black background.",
    "a small picture of {}.",
    "a low resolution image of {}.",
    "a product photo of {}.",
    "{}.",
    "a centered photo of {}.",
    "a pixelated image of {}.",
    "a blurry photo of {}.",
    "a fashion catalogue picture of {}.",
    "a tiny thumbnail of {}.",
]
ZEROSHOT_TEMPLATES = [
    "a picture showing {}.",
    "an image of {}.",
    "a close-up of {}.",
    "a black and white picture of {}.",
    "this is {}.",
]

EMOJI_CAPTION_TEMPLATE = "an emoji of {}."
EMOJI_FONT_SIZE = 109  # the only strike size of the CBDT bitmaps (136 x 128 pixels)
EMOJI_GLYPH = (136, 128)
EMOJI_CANVAS = 140  # glyph centred on a 140 x 140 white square, then 5 x 5 block mean -> 28
IMAGE_SIZE = 28
SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}
HELD_OUT_BUCKETS = 10  # 1 bucket of 10 held out, chosen by CRC32 of the base emoji


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format).

    Args:
        path: ``*-idx1-ubyte.gz`` (labels, shape (N,)) or ``*-idx3-ubyte.gz`` (images, (N, H, W)).

    Returns:
        uint8 array with the shape stored in the header.
    """
    raw = gzip.decompress(path.read_bytes())
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, found {data.size} bytes")
    return data.reshape(shape)


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` samples of every class, in file order.

    Args:
        labels: (N,) integer class labels.
        per_class: how many to keep per class.

    Returns:
        int32 (C * per_class,) sorted indices.
    """
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if idx.size < per_class:
            raise ValueError(f"class {c} has only {idx.size} samples, asked for {per_class}")
        keep.append(idx[:per_class])
    return np.sort(np.concatenate(keep)).astype(np.int32)


def template_ids(labels: np.ndarray, n_templates: int) -> np.ndarray:
    """Deterministic template choice: the k-th sample of class c gets template (k + 3c) mod T.

    Args:
        labels: (N,) class labels.
        n_templates: T.

    Returns:
        uint8 (N,).
    """
    out = np.zeros(labels.shape, dtype=np.uint8)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        out[idx] = (np.arange(idx.size) + 3 * int(c)) % n_templates
    return out


def prepare_fashion(src: Path, out: Path, per_class: int) -> None:
    """Write the Fashion-MNIST train subset, the test set and their metadata to ``out``."""
    tr_x = read_idx(src / "train-images-idx3-ubyte.gz")
    tr_y = read_idx(src / "train-labels-idx1-ubyte.gz")
    te_x = read_idx(src / "t10k-images-idx3-ubyte.gz")
    te_y = read_idx(src / "t10k-labels-idx1-ubyte.gz")
    keep = first_per_class(tr_y, per_class)
    np.savez_compressed(
        out / "fashion_mnist_train.npz",
        images=tr_x[keep], labels=tr_y[keep],
        templates=template_ids(tr_y[keep], len(TRAIN_TEMPLATES)), source_index=keep,
    )
    np.savez_compressed(out / "fashion_mnist_test.npz", images=te_x, labels=te_y)
    meta = {
        "classes": FASHION_CLASSES,
        "phrases": FASHION_PHRASES,
        "train_templates": TRAIN_TEMPLATES,
        "zeroshot_templates": ZEROSHOT_TEMPLATES,
        "train_per_class": per_class,
        "source": "Debian dataset-fashion-mnist, /usr/share/datasets/fashion-mnist",
    }
    (out / "fashion_mnist.json").write_text(json.dumps(meta, indent=1) + "\n")


def emoji_name(cldr: str) -> str:
    """``':waving_hand_medium_skin_tone:'`` -> ``'waving hand medium skin tone'``."""
    return re.sub(r"\s+", " ", cldr.strip(":").replace("_", " ")).strip()


def base_emoji(chars: str) -> str:
    """The emoji with skin-tone modifiers removed (groups variants for the held-out split)."""
    return "".join(ch for ch in chars if ch not in SKIN_TONES)


def is_held_out(base: str) -> bool:
    """Deterministic ~10% split by CRC32 of the base emoji's UTF-8 bytes."""
    return zlib.crc32(base.encode("utf-8")) % HELD_OUT_BUCKETS == 0


def block_mean(img: np.ndarray, factor: int) -> np.ndarray:
    """Area downsampling with round-half-up integer arithmetic (exact everywhere).

    Args:
        img: uint8 (H, W, C) with H and W divisible by ``factor``.
        factor: block size.

    Returns:
        uint8 (H / factor, W / factor, C).
    """
    h, w, c = img.shape
    blocks = img.reshape(h // factor, factor, w // factor, factor, c).astype(np.int64)
    total = blocks.sum(axis=(1, 3))
    n = factor * factor
    return ((2 * total + n) // (2 * n)).astype(np.uint8)


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Alpha-composite straight-alpha RGBA over white with integer rounding.

    Args:
        rgba: uint8 (H, W, 4).

    Returns:
        uint8 (H, W, 3).
    """
    rgb = rgba[..., :3].astype(np.int64)
    a = rgba[..., 3:].astype(np.int64)
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def render_emoji(font, chars: str) -> np.ndarray | None:
    """Render one emoji to a (28, 28, 3) uint8 RGB thumbnail, or None if it is not one glyph."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(chars)
    if (right - left, bottom - top) != EMOJI_GLYPH:
        return None  # not a single glyph: unsupported sequence rendered as several glyphs
    layer = Image.new("RGBA", EMOJI_GLYPH, (0, 0, 0, 0))
    ImageDraw.Draw(layer).text((-left, -top), chars, font=font, embedded_color=True)
    glyph = np.asarray(layer, dtype=np.uint8)
    canvas = np.full((EMOJI_CANVAS, EMOJI_CANVAS, 3), 255, dtype=np.uint8)
    y0 = (EMOJI_CANVAS - EMOJI_GLYPH[1]) // 2
    x0 = (EMOJI_CANVAS - EMOJI_GLYPH[0]) // 2
    canvas[y0:y0 + EMOJI_GLYPH[1], x0:x0 + EMOJI_GLYPH[0]] = composite_on_white(glyph)
    return block_mean(canvas, EMOJI_CANVAS // IMAGE_SIZE)


def prepare_emoji(font_path: Path, out: Path) -> None:
    """Render every fully-qualified emoji the font draws as one glyph; write images and names."""
    import emoji
    from PIL import ImageFont, features

    if not features.check("raqm"):
        raise RuntimeError("Pillow was built without libraqm: skin-tone and ZWJ emoji would not "
                           "shape into single glyphs, and the output would differ.")
    font = ImageFont.truetype(str(font_path), EMOJI_FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)
    missing = render_emoji(font, "\U0010fffd")  # a private-use code point: the font's .notdef
    fully_qualified = emoji.STATUS["fully_qualified"]
    candidates = sorted(
        (chars for chars, d in emoji.EMOJI_DATA.items() if d["status"] == fully_qualified),
        key=lambda s: [ord(ch) for ch in s],
    )
    images, names, chars_kept, bases = [], [], [], []
    seen_names: set[str] = set()
    for chars in candidates:
        name = emoji_name(emoji.EMOJI_DATA[chars]["en"])
        if name.lower() in seen_names:
            continue
        img = render_emoji(font, chars)
        if img is None or (missing is not None and np.array_equal(img, missing)) or img.min() == 255:
            continue
        seen_names.add(name.lower())
        images.append(img)
        names.append(name)
        chars_kept.append(chars)
        bases.append(base_emoji(chars))
    base_ids = {b: i for i, b in enumerate(sorted(set(bases), key=lambda s: [ord(c) for c in s]))}
    np.savez_compressed(
        out / "emoji.npz",
        images=np.stack(images),
        split=np.array([is_held_out(b) for b in bases], dtype=np.uint8),
        group=np.array([base_ids[b] for b in bases], dtype=np.int32),
    )
    meta = {
        "names": names,
        "chars": chars_kept,
        "caption_template": EMOJI_CAPTION_TEMPLATE,
        "source": "Debian fonts-noto-color-emoji (NotoColorEmoji.ttf) rendered at size 109; "
                  f"names from the emoji package {emoji.__version__} (CLDR short names)",
    }
    (out / "emoji.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--per-class", type=int, default=600,
                        help="Fashion-MNIST training images kept per class")
    parser.add_argument("--fashion-dir", type=Path, default=FASHION_DIR)
    parser.add_argument("--emoji-font", type=Path, default=EMOJI_FONT)
    parser.add_argument("--only", choices=["fashion", "emoji"], default=None)
    args = parser.parse_args(argv)
    for need, what in [(args.fashion_dir, "dataset-fashion-mnist"),
                       (args.emoji_font, "fonts-noto-color-emoji")]:
        if not need.exists():
            print(f"error: {need} not found; install the Debian package {what}", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "fashion"):
        prepare_fashion(args.fashion_dir, args.out, args.per_class)
    if args.only in (None, "emoji"):
        prepare_emoji(args.emoji_font, args.out)
    for p in sorted(args.out.glob("*.np[zy]")) + sorted(args.out.glob("*.json")):
        print(f"{p.name}: {p.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
