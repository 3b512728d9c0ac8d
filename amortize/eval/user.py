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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from amortize.eval.retrieval import RetrievalTask
from amortize.eval.zeroshot import ZeroShotTask
from amortize.registry import Registry

__all__ = ["IMAGE_SUFFIXES", "UserDataError", "ImageFiles", "read_caption_csv", "read_caption_folder",
           "read_class_folder", "retrieval_task", "zeroshot_task", "EVAL_TASKS"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
"""File suffixes read as images (case-insensitive)."""


class UserDataError(ValueError):
    """An evaluation dataset on disk that cannot be read as asked (names the file, column or folder)."""


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
                return self.transform(im.convert("RGB"))
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
        separator: the field separator (None: tab for ``.tsv``, else comma).

    Raises:
        UserDataError: for a missing column (listing those present), an empty caption, no rows.
        FileNotFoundError: for an image the CSV names that does not exist.
    """
    sep = separator if separator is not None else ("\t" if path.suffix.lower() == ".tsv" else ",")
    order: dict[Path, list[str]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=sep)
        columns = reader.fieldnames or []
        for col, option in ((image_column, "image column"), (caption_column, "caption column")):
            if col not in columns:
                raise UserDataError(f"{path} has no {option} {col!r} (its columns: {', '.join(columns) or 'none'}); "
                                    f"name the columns with --image-column / --caption-column")
        for line, row in enumerate(reader, start=2):
            name, caption = (row.get(image_column) or "").strip(), (row.get(caption_column) or "").strip()
            if not name or not caption:
                raise UserDataError(f"{path} line {line}: empty {'image path' if not name else 'caption'}")
            image = Path(name).expanduser()
            image = image if image.is_absolute() else path.parent / image
            if not image.is_file():
                raise FileNotFoundError(f"{path} line {line}: image {image} does not exist")
            order.setdefault(image, []).append(caption)
    if not order:
        raise UserDataError(f"{path} has a header but no rows")
    return list(order), list(order.values())


def read_caption_folder(folder: Path) -> tuple[list[Path], list[list[str]]]:
    """Images of a folder and the captions of their sidecar ``.txt`` files (one per line).

    Raises:
        UserDataError: for a folder without images, an image without a caption file, an empty one.
    """
    images = _images_in(folder)
    if not images:
        raise UserDataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    captions = []
    for im in images:
        side = im.with_suffix(".txt")
        if not side.is_file():
            raise UserDataError(f"image {im} has no caption file {side.name}")
        lines = [ln.strip() for ln in side.read_text(encoding="utf-8").splitlines() if ln.strip()]
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
        UserDataError: for a template without ``{}``/``{c}``, or a bad folder (see :func:`read_class_folder`).
    """
    p = _existing(path, "zero-shot folder")
    if not p.is_dir():
        raise UserDataError(f"zero-shot data {p} is a file; give a folder with one sub-folder of images per class")
    templates = [templates] if isinstance(templates, str) else list(templates)
    bad = next((t for t in templates if "{}" not in t and "{c}" not in t), None)
    if not templates or bad is not None:
        raise UserDataError(f"template {bad!r} has no '{{}}' where the class name goes")
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
