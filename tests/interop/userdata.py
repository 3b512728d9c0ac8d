"""Small user datasets on disk and weights exports for the interop and user-data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "white": (245, 245, 245)}


def write_image(path: Path, rgb, seed: int, size=(36, 30)) -> Path:
    """A noisy image of one colour (not square, not the model's size: resize and crop are exercised)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb)[None, None] + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def write_class_folder(root: Path, per_class: int = 3) -> Path:
    """root/<colour>/<i>.png for five colours."""
    for c, (name, rgb) in enumerate(COLOURS.items()):
        for i in range(per_class):
            write_image(root / name / f"{i}.png", rgb, seed=10 * c + i)
    return root


def write_caption_folder(root: Path) -> Path:
    """root/<colour>.png with root/<colour>.txt (two captions each)."""
    for c, (name, rgb) in enumerate(COLOURS.items()):
        write_image(root / f"{name}.png", rgb, seed=100 + c)
        (root / f"{name}.txt").write_text(f"a {name} square\na patch of {name}\n")
    return root


def write_caption_csv(root: Path, image_column: str = "filepath", caption_column: str = "title") -> Path:
    """root/pairs.csv naming root/images/<colour>.png, one row per caption."""
    rows = [f"{image_column},{caption_column}"]
    for c, (name, rgb) in enumerate(COLOURS.items()):
        write_image(root / "images" / f"{name}.png", rgb, seed=200 + c)
        rows += [f"images/{name}.png,a {name} square", f"images/{name}.png,\"the colour {name}, noisy\""]
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root / "pairs.csv"


def recipe_dict(**model) -> dict:
    """A resolved recipe (plain Python) of the tiny model."""
    from amortize.train.config import load_recipe_dict, recipe_to_dict

    return recipe_to_dict(load_recipe_dict({"model": {"name": "tiny", **model}, "data": {"name": "synthetic"}}))


def write_weights_export(path: Path, seed: int = 0, objective: str = "linearized") -> Path:
    """A ``model.pt`` as ``amortize train`` writes it, of tiny towers with random (not initial) weights."""
    from amortize.train.builders import build_two_tower
    from amortize.train.config import load_recipe_dict, recipe_to_dict
    from amortize.weights_export import export_payload

    recipe = load_recipe_dict({"model": {"name": "tiny"}, "data": {"name": "synthetic"},
                               "loss": {"objective": objective}, "method": "test"})
    torch.manual_seed(seed)
    model = build_two_tower(recipe)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(export_payload(recipe_to_dict(recipe), model.state_dict(), {}, epoch=1, batch=3), path)
    return path
