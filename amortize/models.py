"""Two-tower image-text models: open_clip's towers, built offline from a model config.

Towers come from open_clip's model configs (``RN50``, ``ViT-B-32`` and every other name
:func:`open_clip.list_models` knows), always untrained: nothing is downloaded. Two small
configurations of our own train on a CPU:

* ``tiny``: a 2-layer ViT (patch 7 on 28 px) and a 2-layer text transformer, width 32; for tests.
* ``cpu-small``: a 4-layer ViT (patch 7 on 28 px, width 128) and a 3-layer text transformer
  (width 128, 32 tokens), about 8M parameters (6.3M of them the token embedding); the default recipe.

>>> from amortize.models import build_model
>>> m = build_model("tiny")
>>> m.encode_image(torch.zeros(2, 3, 28, 28)).shape
torch.Size([2, 32])

This module imports open_clip lazily (it is in the ``clip`` extra) and never imports Composer.
"""

from __future__ import annotations

import copy
import math
from typing import Annotated, Any, Optional, TypedDict

import torch
from torch import Tensor, nn

from amortize.options import NONNEGATIVE
from amortize.registry import Registry

__all__ = ["CLIP_INIT_LOGIT_SCALE", "MODELS", "register_model", "TwoTowerModel", "model_config", "check_model_options", "build_model",
           "list_model_configs", "register_open_clip_configs"]

CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)
"""CLIP's initial ``log s`` (temperature 0.07): the towers' one default, which a recipe's ``model``
takes unless its objective prefers another (the sigmoid objective's ``log 10``)."""

_OURS: dict[str, dict[str, Any]] = {
    "tiny": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 28, "patch_size": 7, "layers": 2, "width": 32, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
    "cpu-small": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 28, "patch_size": 7, "layers": 4, "width": 128, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
    },
}

MODELS: Registry[dict] = Registry("model")
"""Model configurations of our own: name -> a function returning an open_clip-format config dict.

Names not registered here are looked up among open_clip's configs (``RN50``, ``ViT-B-32`` ...)."""
for _name, _cfg in _OURS.items():
    MODELS.register(_name, lambda _cfg=_cfg: copy.deepcopy(_cfg))


def register_model(name: str, config: dict[str, Any]) -> None:
    """Register an open_clip-format config (``embed_dim``, ``vision_cfg``, ``text_cfg``) under ``name``."""
    MODELS.register(name, lambda: copy.deepcopy(config))


def list_model_configs() -> list[str]:
    """Names accepted by :func:`build_model`: ours, then open_clip's."""
    import open_clip

    return MODELS.names() + sorted(open_clip.list_models())


def register_open_clip_configs(folder: Optional[str] = None) -> list[str]:
    """Make our model names (``tiny``, ``cpu-small``, any :func:`register_model`) resolve in open_clip.

    Writes each config as ``<name>.json`` into ``folder`` (default: a new temporary folder) and
    adds the folder with ``open_clip.add_model_config``; afterwards
    ``open_clip.create_model("tiny")`` builds the same towers as :func:`build_model`. (An
    ``amortize export`` folder carries its own ``<name>.json`` for processes without ``amortize``.)

    Returns:
        The names registered.
    """
    import json
    import tempfile
    from pathlib import Path

    import open_clip

    out = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="amortize-open-clip-configs-"))
    out.mkdir(parents=True, exist_ok=True)
    names = MODELS.names()
    for name in names:
        (out / f"{name}.json").write_text(json.dumps(MODELS.build(name), indent=2), encoding="utf-8")
    open_clip.add_model_config(out)
    return names


def model_config(name: str, image_size: Optional[int] = None, context_length: Optional[int] = None) -> dict:
    """The open_clip-format config of a model name, with optional size overrides.

    Args:
        name: a name in :data:`MODELS` or an open_clip model name (``"RN50"``, ``"ViT-B-32"``).
        image_size: override of the vision tower's input side.
        context_length: override of the text tower's token positions.

    Returns:
        A fresh dict ``{"embed_dim", "vision_cfg", "text_cfg", ...}``.

    Raises:
        ValueError: for an unknown name, listing our names (open_clip's come from ``open_clip.list_models()``).
    """
    if name in MODELS:
        cfg = MODELS.build(name)
    else:
        import open_clip

        found = open_clip.get_model_config(name)
        if found is None:
            raise ValueError(
                f"unknown model {name!r}; valid: {', '.join(MODELS.names())} or an open_clip model "
                f"name such as RN50, ViT-B-32 (see open_clip.list_models())"
            )
        cfg = copy.deepcopy(found)
    if cfg.get("vision_cfg", {}).get("timm_model_name") or cfg.get("text_cfg", {}).get("hf_model_name"):
        raise ValueError(f"model {name!r} needs timm or Hugging Face towers, which this project does not build offline")
    if image_size is not None:
        cfg["vision_cfg"]["image_size"] = int(image_size)
    if context_length is not None:
        cfg["text_cfg"]["context_length"] = int(context_length)
    return cfg


class TwoTowerModel(nn.Module):
    """An image tower and a text tower with a learnable logit scale (and optional bias).

    Wraps :class:`open_clip.model.CLIP` (as ``self.clip``) so that parameter names follow
    open_clip's and its weights load into open_clip directly (strip the ``clip.`` prefix; ``amortize
    export`` writes them as an open_clip model folder, see :mod:`amortize.interop.export`).

    Args:
        config: an open_clip-format config (see :func:`model_config`).
        init_logit_scale: initial ``log s`` (CLIP: ``log(1 / 0.07)``; SigLIP: ``log 10``).
        init_logit_bias: initial bias ``b`` (SigLIP: -10), or None for no bias parameter.

    Attributes:
        config: the config the towers were built from.
        embed_dim: width ``d`` of the joint embedding.
        image_size: side of the square input images.
        context_length: token positions ``L`` of the text tower.
    """

    def __init__(self, config: dict, init_logit_scale: float = CLIP_INIT_LOGIT_SCALE,
                 init_logit_bias: Optional[float] = None):
        super().__init__()
        from open_clip.model import CLIP

        cfg = copy.deepcopy(config)
        self.config = copy.deepcopy(config)
        self.clip = CLIP(
            embed_dim=cfg.pop("embed_dim"),
            vision_cfg=cfg.pop("vision_cfg"),
            text_cfg=cfg.pop("text_cfg"),
            quick_gelu=cfg.pop("quick_gelu", False),
            init_logit_scale=float(init_logit_scale),
            init_logit_bias=init_logit_bias,
        )
        self.embed_dim = int(config["embed_dim"])
        size = config["vision_cfg"].get("image_size", 224)
        self.image_size = int(size if isinstance(size, int) else size[0])
        self.context_length = int(self.clip.context_length)

    @property
    def logit_scale(self) -> nn.Parameter:
        """0-d parameter ``log s`` (exponentiate for the inverse temperature)."""
        return self.clip.logit_scale

    @property
    def logit_bias(self) -> Optional[nn.Parameter]:
        """0-d parameter ``b``, or None when the model has no bias."""
        return getattr(self.clip, "logit_bias", None)

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        """Embed images.

        Args:
            images: (N, 3, H, W) float images.
            normalize: L2-normalise the output rows.

        Returns:
            (N, d) image features.
        """
        return self.clip.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        """Embed token ids.

        Args:
            tokens: (N, L) int64 token ids.
            normalize: L2-normalise the output rows.

        Returns:
            (N, d) text features.
        """
        return self.clip.encode_text(tokens, normalize=normalize)

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """Normalised features and the logit parameters.

        Args:
            images: (B, 3, H, W) float images.
            tokens: (B, L) int64 token ids.

        Returns:
            ``(x (B, d), y (B, d), s (0-d, exponentiated scale), b (0-d) or None)``.
        """
        x = self.encode_image(images, normalize=True)
        y = self.encode_text(tokens, normalize=True)
        return x, y, self.logit_scale.exp(), self.logit_bias


class TowerLock(TypedDict, total=False):
    """A locked tower, as open_clip's LiT options (``model.lock_image``, ``model.lock_text``; see
    :mod:`amortize.interop.pretrained`, which applies them and holds their defaults).

    Keys:
        unlocked_groups: groups left trainable, counted from the output end (0: the whole tower is locked).
        freeze_norm: keep the tower's norm layers (and batch-norm statistics) frozen in unlocked groups too.
    """

    unlocked_groups: Annotated[int, NONNEGATIVE]
    freeze_norm: bool


def check_model_options(options: dict) -> None:
    """The ``model`` section's checks across its options (bound, with their defaults), at load:
    ``image_size`` a multiple of the vision tower's patch size (and >= 1), ``context_length`` >= 2
    (the start and end tokens).

    Raises:
        RecipeError: naming the key.
    """
    from amortize.options import RecipeError

    size, name, length = options.get("image_size"), options.get("name"), options.get("context_length")
    if size is not None:
        try:
            patch = model_config(name).get("vision_cfg", {}).get("patch_size")
        except Exception:  # an unknown model is named by the model's own check
            patch = None
        if size < max(1, patch or 1) or (patch and size % patch):
            need = f"a multiple of the patch size {patch}" if patch else ">= 1"
            raise RecipeError(f"model.image_size: must be {need} (model {name!r}), got {size}")
    if length is not None and length < 2:
        raise RecipeError(f"model.context_length: must be >= 2 (the start and end tokens), got {length}")


def build_model(
    name: str = "tiny",
    *,
    image_size: Optional[int] = None,
    context_length: Optional[int] = None,
    init_logit_scale: float = CLIP_INIT_LOGIT_SCALE,
    init_logit_bias: Optional[float] = None,
    pretrained: Optional[str] = None,
    lock_image: Optional[TowerLock] = None,
    lock_text: Optional[TowerLock] = None,
) -> TwoTowerModel:
    """Build a two-tower model from a config name (offline), untrained unless ``pretrained`` is given.

    Args:
        name: a name in :data:`MODELS` or an open_clip model name.
        image_size: override of the input side (e.g. 28 for the shipped data).
        context_length: override of the text length.
        init_logit_scale: initial ``log s`` (default :data:`CLIP_INIT_LOGIT_SCALE`; a recipe's
            ``model`` gets its objective's preference where it leaves this unset).
        init_logit_bias: initial bias, or None for none.
        pretrained: weights to load (an open_clip checkpoint or state dict, an ``amortize export``
            folder, a weights export (:mod:`amortize.weights_export`) or run folder; see
            :mod:`amortize.interop.pretrained`).
        lock_image: ``{unlocked_groups: N, freeze_norm: bool}`` to lock the image tower (open_clip's LiT).
        lock_text: the same for the text tower.

    Returns:
        A :class:`TwoTowerModel` in training mode.

    Raises:
        PretrainedError: (a ``RecipeError`` under ``model.pretrained`` / ``model.lock_*``) for
            weights that are missing, unreadable or of another architecture, or a bad lock.
    """
    cfg = model_config(name, image_size=image_size, context_length=context_length)
    model = TwoTowerModel(cfg, init_logit_scale=init_logit_scale, init_logit_bias=init_logit_bias)
    if pretrained is not None or lock_image is not None or lock_text is not None:
        from amortize.interop.pretrained import start_towers

        start_towers(model, pretrained, lock_image, lock_text, model_name=name)
    return model
