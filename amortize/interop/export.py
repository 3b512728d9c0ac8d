"""Export the towers of a trained model as an open_clip model folder (``amortize export``).

The folder holds the towers only (no amortizer, estimator buffers or optimiser state)::

    OUT_DIR/
        open_clip_config.json          {"model_cfg", "preprocess_cfg", "tokenizer", "amortize"}
        open_clip_model.safetensors    open_clip's parameter names (no "clip." prefix)
        <model name>.json              the model config alone, for open_clip.add_model_config
        README.md                      (format "hf") a model card for the Hugging Face Hub

and loads with open_clip alone, in either of its two ways::

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:OUT_DIR")
    tokenizer = open_clip.get_tokenizer("local-dir:OUT_DIR")

    open_clip.add_model_config("OUT_DIR/tiny.json")      # makes the name "tiny" resolve
    model, _, preprocess = open_clip.create_model_and_transforms(
        "tiny", pretrained="OUT_DIR/open_clip_model.safetensors")

``<model name>.json`` is the exported config, size overrides included: registering it replaces any
open_clip config of that name in that process (``local-dir:`` needs no registration).
``preprocess_cfg`` is what ``amortize eval`` uses on image files (open_clip's evaluation
transform: resize the short side with bicubic interpolation, centre crop, CLIP's mean and
standard deviation), so both compute the same features. Format ``hf`` is the same folder plus a
model card: the layout open_clip's ``hf-hub:`` loader reads once uploaded (``huggingface-cli
upload``); it is not a ``transformers`` ``CLIPModel``.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Optional

import torch

__all__ = ["EXPORT_FORMATS", "CONFIG_NAME", "WEIGHTS_NAME", "open_clip_state_dict", "open_clip_config",
           "export_model"]

EXPORT_FORMATS = ("open_clip", "hf")
"""Values of ``amortize export --format``."""

CONFIG_NAME = "open_clip_config.json"
"""The file open_clip's ``local-dir:`` and ``hf-hub:`` loaders read (``model_cfg``, ``preprocess_cfg``)."""

WEIGHTS_NAME = "open_clip_model.safetensors"
"""The weights file name open_clip looks for first in a model folder."""


def open_clip_state_dict(model) -> dict[str, torch.Tensor]:
    """The towers' weights under open_clip's names (a :class:`~amortize.models.TwoTowerModel`'s
    ``clip.`` prefix dropped), detached, contiguous, on the CPU.

    Returns:
        ``{name: tensor}`` that ``open_clip.model.CLIP.load_state_dict(..., strict=True)`` accepts.
    """
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.clip.state_dict().items()}


def preprocess_config(image_size: int) -> dict:
    """open_clip's ``preprocess_cfg`` of the evaluation transform ``amortize eval`` applies to image files."""
    from amortize.data.transforms import CLIP_MEAN, CLIP_STD

    return {"size": int(image_size), "mode": "RGB", "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
            "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}


def open_clip_config(model, *, model_name: str, tokenizer: str = "simple", extra: Optional[dict] = None) -> dict:
    """The ``open_clip_config.json`` of a model.

    Args:
        model: a :class:`~amortize.models.TwoTowerModel`.
        model_name: its config name (``tiny``, ``ViT-B-32`` ...), recorded for the reader.
        tokenizer: the recipe's ``data.tokenizer`` (``simple``: open_clip's CLIP BPE, what open_clip
            uses for a config without ``hf_tokenizer_name``).
        extra: more provenance for the ``amortize`` entry (method, recipe, step).

    Returns:
        ``{"model_cfg", "preprocess_cfg", "tokenizer", "amortize"}``; ``model_cfg`` builds the same
        towers (``init_logit_bias`` is set when the model has a bias, so the weights load strictly).
    """
    import amortize

    cfg = copy.deepcopy(model.config)
    if model.logit_bias is not None:
        cfg["init_logit_bias"] = float(model.logit_bias.detach())
    if tokenizer not in ("simple", None):
        import open_clip

        found = open_clip.get_model_config(tokenizer) or {}
        hf_name = found.get("text_cfg", {}).get("hf_tokenizer_name")
        if hf_name:
            cfg["text_cfg"]["hf_tokenizer_name"] = hf_name
    return {
        "model_cfg": cfg,
        "preprocess_cfg": preprocess_config(model.image_size),
        "tokenizer": {"name": tokenizer or "simple", "context_length": int(model.context_length)},
        "amortize": {"version": amortize.__version__, "model_name": model_name, **(extra or {})},
    }


def config_file_name(model_name: str) -> str:
    """``<name>.json`` with characters outside ``[A-Za-z0-9._-]`` replaced by ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", model_name) + ".json"


def model_card(config: dict, model_name: str) -> str:
    """A Hugging Face model card (front matter for the Hub's open_clip integration)."""
    info = config["amortize"]
    lines = [
        "---",
        "library_name: open_clip",
        "tags: [clip, open_clip, amortize]",
        "---",
        f"# {model_name} trained with amortize {info['version']}",
        "",
        f"Method: {info.get('method', 'custom')}. Towers only (no training state).",
        "",
        "```python",
        "import open_clip",
        "model, _, preprocess = open_clip.create_model_and_transforms('hf-hub:USER/REPO')",
        "tokenizer = open_clip.get_tokenizer('hf-hub:USER/REPO')",
        "```",
        "",
    ]
    return "\n".join(lines)


def export_model(model, out_dir: str | Path, *, model_name: str, tokenizer: str = "simple", fmt: str = "open_clip",
                 extra: Optional[dict] = None, overwrite: bool = False) -> list[Path]:
    """Write the towers of ``model`` as an open_clip model folder (see the module docstring).

    Args:
        model: a :class:`~amortize.models.TwoTowerModel`.
        out_dir: the folder (created; it must not hold files unless ``overwrite``).
        model_name: the model's config name (names ``<model_name>.json``).
        tokenizer: the recipe's ``data.tokenizer``.
        fmt: ``open_clip`` or ``hf`` (adds ``README.md``).
        extra: provenance stored under ``amortize`` in the config.
        overwrite: replace the files of an earlier export in ``out_dir``.

    Returns:
        The paths written.

    Raises:
        ValueError: for an unknown format, or an ``out_dir`` that is a file or holds files.
    """
    from safetensors.torch import save_file

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; valid: {', '.join(EXPORT_FORMATS)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} is not empty; choose a new folder or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    config = open_clip_config(model, model_name=model_name, tokenizer=tokenizer, extra=extra)
    written = [out / CONFIG_NAME, out / WEIGHTS_NAME, out / config_file_name(model_name)]
    written[0].write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(open_clip_state_dict(model), str(written[1]), metadata={"format": "pt", "amortize": config["amortize"]["version"]})
    written[2].write_text(json.dumps(config["model_cfg"], indent=2) + "\n", encoding="utf-8")
    if fmt == "hf":
        written.append(out / "README.md")
        written[-1].write_text(model_card(config, model_name), encoding="utf-8")
    return written
