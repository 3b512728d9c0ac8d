"""Evaluation on your own files: a retrieval CSV or folder, a zero-shot folder of class sub-folders.

Three layouts, read by :func:`retrieval_task` and :func:`zeroshot_task`:

* a CSV (or TSV) with an image-path column and a caption column (open_clip's training CSV names,
  ``filepath`` and ``title``, by default); paths are relative to the CSV's folder; several rows
  with the same image give it several captions::

      filepath,title
      images/cat.png,a cat on a sofa

* a folder of images, each with a sidecar caption file of the same name (``cat.png`` +
  ``cat.txt``, one caption per line);
* for zero-shot classification, a folder with one sub-folder of images per class; the class names
  are the sub-folder names (``_`` read as a space), put into the prompt templates (default
  ``{}``: the class name alone).

Images are read lazily with Pillow and transformed as open_clip's evaluation transform
(``open_clip.image_transform(size, is_train=False)``, what an ``amortize export`` declares), so a
model's features here are the ones open_clip computes from the export.

A problem with the files raises :class:`UserDataError` (or ``FileNotFoundError``) naming the file,
the column or the folder. The tasks are those of :mod:`amortize.eval` and print the same tables.
``eval.tasks`` recipe sections name them through :data:`EVAL_TASKS`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from amortize.eval.retrieval import RetrievalTask
from amortize.eval.zeroshot import ZeroShotTask
from amortize.registry import Registry
from amortize.textfiles import NotUTF8, read_utf8

__all__ = ["IMAGE_SUFFIXES", "UserDataError", "ImageFiles", "read_caption_csv", "read_caption_folder",
           "read_class_folder", "read_text", "csv_separator", "rgb_image", "retrieval_task", "zeroshot_task",
           "EVAL_TASKS"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
"""File suffixes read as images (case-insensitive)."""


class UserDataError(ValueError):
    """An evaluation dataset on disk that cannot be read as asked (names the file, column or folder)."""


def read_text(path: Path, what: str = "file") -> str:
    """The text of a caption CSV or sidecar file: UTF-8, a leading byte-order mark dropped (as
    spreadsheet programs save "CSV UTF-8").

    Raises:
        UserDataError: naming the file and the first byte that is not UTF-8.
    """
    try:
        return read_utf8(path, bom=True)
    except NotUTF8 as e:
        raise UserDataError(f"{what} {e}; save it as UTF-8") from None


def csv_separator(separator: Optional[str], path: Path) -> str:
    """The field separator of a CSV: ``separator`` checked (the two characters ``\\t`` read as a
    tab), or tab for ``.tsv`` and comma otherwise when it is None.

    Raises:
        UserDataError: ``separator ';;': must be one character ...``.
    """
    if separator is None:
        return "\t" if path.suffix.lower() == ".tsv" else ","
    if separator == "\\t":
        return "\t"
    if len(separator) != 1 or separator in '"\r\n':
        raise UserDataError(f"separator {separator!r}: must be one character other than a quote or a line break "
                            "(',', ';', a tab written \\t ...)")
    return separator


def rgb_image(im, path: Path):
    """``im`` as 8-bit RGB; 16-bit and 32-bit integer greyscale (PNG's ``I;16``, ``I``) scaled to 8 bit.

    Pillow's own ``convert("RGB")`` clips such pixels at 255, which turns every 16-bit image white.

    Raises:
        UserDataError: for integer pixels outside 0..65535 (naming the file).
    """
    import numpy as np
    from PIL import Image

    if not (im.mode == "I" or im.mode.startswith("I;16")):
        return im.convert("RGB")
    pixels = np.asarray(im, dtype=np.int64)
    low, high = (int(pixels.min()), int(pixels.max())) if pixels.size else (0, 0)
    if low < 0 or high > 65535:
        raise UserDataError(f"cannot read image {path}: its {im.mode} pixels span {low}..{high}, outside 0..65535")
    sixteen = im.mode.startswith("I;16") or im.format == "PNG" or high > 255  # PNG's I is its 16-bit greyscale
    scaled = np.round(pixels * (255 / 65535)) if sixteen else pixels
    return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class ImageFiles:
    """Image files as a sliceable sequence of float batches (what the evaluation tasks encode).

    Args:
        paths: N image files.
        image_size: the model's input side S.

    ``files[a:b]`` opens, converts to RGB and transforms those files: float (b - a, 3, S, S).
    """

    def __init__(self, paths: Sequence[Path], image_size: int):
        self.paths = [Path(p) for p in paths]
        self.image_size = int(image_size)
        self._transform: Optional[Callable] = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def transform(self) -> Callable:
        """open_clip's evaluation transform for side S (built on first use)."""
        if self._transform is None:
            import open_clip

            self._transform = open_clip.image_transform(self.image_size, is_train=False)
        return self._transform

    def load(self, path: Path) -> torch.Tensor:
        """One file -> float (3, S, S)."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                return self.transform(rgb_image(im, path))
        except (OSError, UnidentifiedImageError) as e:
            raise UserDataError(f"cannot read image {path}: {e}") from None

    def check(self) -> None:
        """Open and decode every file once (no transform): an unreadable one is found before a run.

        Raises:
            UserDataError: ``cannot read image PATH: ...`` for the first file that cannot be decoded.
        """
        from PIL import Image, UnidentifiedImageError

        for path in self.paths:
            try:
                with Image.open(path) as im:
                    rgb_image(im, path)
            except (OSError, UnidentifiedImageError) as e:
                raise UserDataError(f"cannot read image {path}: {e}") from None

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, slice):
            return torch.stack([self.load(p) for p in self.paths[idx]])
        return self.load(self.paths[idx])


def read_caption_csv(path: Path, image_column: str = "filepath", caption_column: str = "title",
                     separator: Optional[str] = None) -> tuple[list[Path], list[list[str]]]:
    """Images and their captions from a CSV/TSV (rows sharing an image give it several captions).

    Args:
        path: the file; image paths in it are relative to its folder (or absolute).
        image_column: the column of image paths.
        caption_column: the column of captions.
        separator: the field separator (None: tab for ``.tsv``, else comma; see :func:`csv_separator`).

    The file is read as UTF-8; a byte-order mark before the header is dropped.

    Raises:
        UserDataError: for a file that is not UTF-8, a separator that is not one character, a line
            the csv module cannot split, a missing column (listing those present), an empty
            caption, no rows.
        FileNotFoundError: for an image the CSV names that does not exist.
    """
    sep = csv_separator(separator, path)
    order: dict[Path, list[str]] = {}
    reader = csv.DictReader(io.StringIO(read_text(path, "caption file"), newline=""), delimiter=sep)
    try:
        columns = reader.fieldnames or []
        for col, option in ((image_column, "image column"), (caption_column, "caption column")):
            if col not in columns:
                raise UserDataError(f"{path} has no {option} {col!r} (its columns: {', '.join(columns) or 'none'}); "
                                    f"name the columns with --image-column / --caption-column")
        for row in reader:
            _add_row(order, row, path, reader.line_num, image_column, caption_column)
    except csv.Error as e:
        raise UserDataError(f"{path} line {reader.line_num}: {e}") from None
    if not order:
        raise UserDataError(f"{path} has a header but no rows")
    return list(order), list(order.values())


def _add_row(order: dict[Path, list[str]], row: dict, path: Path, line: int, image_column: str,
             caption_column: str) -> None:
    """Add one CSV row's caption to its image (paths relative to the CSV's folder)."""
    name, caption = (row.get(image_column) or "").strip(), (row.get(caption_column) or "").strip()
    if not name or not caption:
        raise UserDataError(f"{path} line {line}: empty {'image path' if not name else 'caption'}")
    image = Path(name).expanduser()
    image = image if image.is_absolute() else path.parent / image
    if not image.is_file():
        raise FileNotFoundError(f"{path} line {line}: image {image} does not exist")
    order.setdefault(image, []).append(caption)


def read_caption_folder(folder: Path) -> tuple[list[Path], list[list[str]]]:
    """Images of a folder and the captions of their sidecar ``.txt`` files (one per line).

    Raises:
        UserDataError: for a folder without images, an image without a caption file, an empty one
            or one that is not UTF-8 (a byte-order mark is dropped).
    """
    images = _images_in(folder)
    if not images:
        raise UserDataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    captions = []
    for im in images:
        side = im.with_suffix(".txt")
        if not side.is_file():
            raise UserDataError(f"image {im} has no caption file {side.name}")
        lines = [ln.strip() for ln in read_text(side, "caption file").splitlines() if ln.strip()]
        if not lines:
            raise UserDataError(f"caption file {side} is empty")
        captions.append(lines)
    return images, captions


def read_class_folder(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    """Images, labels and class names of a folder with one sub-folder per class (sorted by name).

    Raises:
        UserDataError: for fewer than two class sub-folders or a class without images.
    """
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise UserDataError(f"{folder} needs at least two class sub-folders of images, found {len(classes)}")
    paths, labels = [], []
    for c, sub in enumerate(classes):
        images = _images_in(sub)
        if not images:
            raise UserDataError(f"class folder {sub} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        paths += images
        labels += [c] * len(images)
    return paths, labels, [p.name.replace("_", " ") for p in classes]


def _existing(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what} {p} does not exist")
    return p


def retrieval_task(path: str | Path, *, image_size: int, label: Optional[str] = None, image_column: str = "filepath",
                   caption_column: str = "title", separator: Optional[str] = None) -> RetrievalTask:
    """A :class:`~amortize.eval.retrieval.RetrievalTask` of a CSV/TSV or a folder with sidecar captions.

    Args:
        path: the CSV/TSV file or the folder.
        image_size: the model's input side.
        label: the task name in the tables (default: the file or folder name).
        image_column: see :func:`read_caption_csv` (CSV only).
        caption_column: see :func:`read_caption_csv` (CSV only).
        separator: see :func:`read_caption_csv` (CSV only).
    """
    p = _existing(path, "retrieval data")
    images, captions = read_caption_folder(p) if p.is_dir() else read_caption_csv(
        p, image_column=image_column, caption_column=caption_column, separator=separator)
    return RetrievalTask(name=label or p.stem or p.name, images=ImageFiles(images, image_size), captions=captions)


def zeroshot_task(path: str | Path, *, image_size: int, label: Optional[str] = None,
                  templates: Sequence[str] = ("{}",)) -> ZeroShotTask:
    """A :class:`~amortize.eval.zeroshot.ZeroShotTask` of a folder with one sub-folder per class.

    Args:
        path: the folder.
        image_size: the model's input side.
        label: the task name in the tables (default: the folder name).
        templates: prompt templates with ``{}`` (or ``{c}``) where the class name goes.

    Raises:
        UserDataError: for a template that cannot take a class name (see
            :func:`~amortize.eval.zeroshot.template_problem`), or a bad folder (see :func:`read_class_folder`).
    """
    from amortize.eval.zeroshot import template_problem

    p = _existing(path, "zero-shot folder")
    if not p.is_dir():
        raise UserDataError(f"zero-shot data {p} is a file; give a folder with one sub-folder of images per class")
    templates = [templates] if isinstance(templates, str) else list(templates)
    if not templates:
        raise UserDataError("templates: give at least one template with '{}' where the class name goes")
    for t in templates:
        problem = template_problem(t)
        if problem:
            raise UserDataError(f"template {t!r} {problem}")
    paths, labels, classnames = read_class_folder(p)
    return ZeroShotTask(name=label or p.name, images=ImageFiles(paths, image_size),
                        labels=torch.tensor(labels, dtype=torch.long), classnames=classnames, templates=templates)


def _default(*, image_size: int) -> list:
    from amortize.eval import default_tasks

    return default_tasks(image_size=image_size)


EVAL_TASKS: Registry[Any] = Registry("evaluation task")
"""``eval.tasks`` sections: ``default`` (the shipped tasks), ``retrieval`` and ``zeroshot`` (your files).

Each constructor takes ``image_size`` (passed by the builder) and the section's options, e.g.
``{name: retrieval, path: data/pairs.csv, caption_column: caption}``; ``eval.tasks`` entries are
bound when the recipe loads (:data:`amortize.train.sections.SECTIONS`) and built when the run
starts (:func:`amortize.train.builders.build_eval_tasks`)."""
EVAL_TASKS.register("default", _default)
EVAL_TASKS.register("retrieval", retrieval_task)
EVAL_TASKS.register("zeroshot", zeroshot_task)
