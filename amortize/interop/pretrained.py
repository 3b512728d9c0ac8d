"""Start from pretrained weights (``model.pretrained``) and lock towers (``model.lock_image``, ``model.lock_text``).

Accepted by :func:`read_state_dict`:

* an open_clip state dict (``.pt``/``.bin``/``.pth``, or ``.safetensors``), or open_clip's training
  checkpoint ``{"epoch", "state_dict": ...}`` (a ``module.`` prefix is dropped);
* an export of ours: an ``amortize export`` folder, a weights export (:mod:`amortize.weights_export`)
  or a run folder holding one, a Composer checkpoint of ``amortize train``.

Files are read with ``torch.load(weights_only=True)`` or safetensors (no code runs). The weights must
fit the recipe's model exactly (every key, every shape; the logit bias excepted: a model with a bias
keeps its initial value when the checkpoint has none, and a checkpoint's bias is ignored by a model
without one); otherwise :class:`PretrainedError` names the first key that does not.

Locking follows open_clip's LiT options (``--lock-image``, ``--lock-image-unlocked-groups``,
``--lock-image-freeze-bn-stats``, ``--lock-text``, ``--lock-text-unlocked-layers``): a locked tower's
parameters get ``requires_grad=False`` except its last ``unlocked_groups`` groups (ViT image tower:
the stem, each block, the last block with the final norm, the projection; text tower: the embeddings,
each block, the last block with the final norm, the projection). Locked parameters are in no
optimiser group and have no gradient, so gradient clipping and weight decay never touch them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from amortize.options import RecipeError
from amortize.weights_export import EXPORT_FILENAME, is_weights_export

__all__ = ["PretrainedError", "read_state_dict", "check_fits", "load_pretrained", "tower_groups", "apply_locks",
           "locked_summary", "start_towers"]

_IGNORED = ("logit_bias",)
_KEY = "model.pretrained"


class PretrainedError(RecipeError):
    """Pretrained weights that cannot be read or do not fit the model, or a bad lock (a
    :class:`~amortize.options.RecipeError` under ``model.pretrained`` or ``model.lock_*``)."""


def _tensors_only(sd: Any, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(sd, dict) or not sd:
        raise PretrainedError(f"{where} holds no state dict (expected a mapping of parameter names to tensors)",
                              key=_KEY)
    bad = next((k for k, v in sd.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise PretrainedError(f"{where}: entry {bad!r} is a {type(sd[bad]).__name__}, not a tensor", key=_KEY)
    return dict(sd)


def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DDP's ``module.``, Composer's ``model.`` and our ``clip.`` prefixes (towers' keys only)."""
    for prefix in ("module.", "model.clip.", "clip."):
        if any(k.startswith(prefix) for k in sd):
            if prefix == "module.":
                sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
            else:  # a Composer model also holds loss_fn.* and _extra_state: keep the towers
                sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def _weights_file(folder: Path) -> Path:
    """The weights inside a folder: an export's safetensors, a run's weights export or latest checkpoint."""
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", EXPORT_FILENAME, "latest-rank0.pt"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found[0]
    raise PretrainedError(f"{folder} holds no weights (open_clip_model.safetensors, {EXPORT_FILENAME} or latest-rank0.pt)",
                          key=_KEY)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The towers' weights in a file or folder, under open_clip's names (see the module docstring).

    Raises:
        FileNotFoundError: if nothing is at ``path``.
        PretrainedError: if it holds no state dict of tensors.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_dir():
        p = _weights_file(p)
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return _strip(_tensors_only(load_file(str(p)), str(p)))
        except SafetensorError as e:
            raise PretrainedError(f"{p} is not a readable safetensors file: {e}", key=_KEY) from None
    from amortize.checkpoints import safe_load

    try:
        ck = safe_load(p)
    except Exception as e:  # an unreadable or unsafe pickle: name the file
        raise PretrainedError(f"{p} is not a readable checkpoint: {type(e).__name__}: {e}", key=_KEY) from None
    if isinstance(ck, dict):
        if is_weights_export(ck):
            ck = ck.get("model")
        elif isinstance(ck.get("state"), dict) and "model" in ck["state"]:  # Composer
            ck = ck["state"]["model"]
        elif isinstance(ck.get("state_dict"), dict):  # open_clip's training checkpoint
            ck = ck["state_dict"]
        if isinstance(ck, dict):
            ck = {k: v for k, v in ck.items() if not k.endswith("_extra_state")}
    return _strip(_tensors_only(ck, str(p)))


def check_fits(model_sd: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], source: str, model_name: str) -> None:
    """Refuse weights that do not fit the model, naming the first key that differs.

    Args:
        model_sd: the model's ``clip.state_dict()``.
        sd: the pretrained weights (open_clip names).
        source: the path, for the message.
        model_name: the recipe's model name, for the message.

    Raises:
        PretrainedError: ``model.pretrained: <source> does not fit model <name>: <key> ...``.
    """
    head = f"{source} does not fit model {model_name!r}"
    for k, v in model_sd.items():
        if k in _IGNORED:
            continue
        if k not in sd:
            raise PretrainedError(f"{head}: key {k!r} is missing from the checkpoint", key=_KEY)
        if tuple(sd[k].shape) != tuple(v.shape):
            raise PretrainedError(f"{head}: key {k!r} has shape {tuple(sd[k].shape)} in the checkpoint and "
                                  f"{tuple(v.shape)} in the model", key=_KEY)
    extra = next((k for k in sd if k not in model_sd and k not in _IGNORED), None)
    if extra is not None:
        raise PretrainedError(f"{head}: the checkpoint's key {extra!r} is not in the model", key=_KEY)


@torch.no_grad()
def load_pretrained(model, path: str | Path, model_name: str = "") -> int:
    """Copy pretrained weights into a :class:`~amortize.models.TwoTowerModel` (checked by :func:`check_fits`).

    Returns:
        The number of tensors loaded.
    """
    sd = read_state_dict(path)
    own = model.clip.state_dict()
    check_fits(own, sd, str(path), model_name or "?")
    keep = {k: v for k, v in sd.items() if k in own}
    if "logit_bias" in own and "logit_bias" not in keep:
        keep["logit_bias"] = own["logit_bias"]
    model.clip.load_state_dict(keep, strict=True)
    return len(keep)


def _lock_option(lock: Any, key: str) -> Optional[tuple[int, bool]]:
    """``(unlocked_groups, freeze_norm)`` of a lock section (a dataclass or mapping), or None."""
    if lock is None:
        return None
    get = lock.get if isinstance(lock, dict) else (lambda k, d=None: getattr(lock, k, d))
    groups, freeze = get("unlocked_groups", 0), get("freeze_norm", False)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 0:
        raise PretrainedError(f"expected a whole number >= 0, got {groups!r}", key=f"{key}.unlocked_groups")
    return groups, bool(freeze)


def tower_groups(model, tower: str) -> int:
    """How many LiT groups a tower has (``tower``: ``image`` or ``text``); 1 for towers without blocks."""
    clip = model.clip
    if tower == "image":
        blocks = getattr(getattr(clip.visual, "transformer", None), "resblocks", None)
        proj = getattr(clip.visual, "proj", None)
    else:
        blocks = getattr(getattr(clip, "transformer", None), "resblocks", None)
        proj = getattr(clip, "text_projection", None)
    if blocks is None:
        return 1
    return len(blocks) + 1 + (proj is not None)


def _norm_modules(modules: list[nn.Module]) -> list[nn.Module]:
    kinds = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
    return [m for top in modules for m in top.modules() if isinstance(m, kinds)]


def apply_locks(model, lock_image: Any = None, lock_text: Any = None) -> int:
    """Lock the towers named by the recipe's ``model.lock_image`` / ``model.lock_text`` sections.

    Args:
        model: a :class:`~amortize.models.TwoTowerModel`.
        lock_image: None (train the tower) or ``{unlocked_groups: N, freeze_norm: bool}``.
        lock_text: the same for the text tower.

    Returns:
        The number of tower parameters (elements) locked.

    Raises:
        PretrainedError: naming the key when ``unlocked_groups`` exceeds the tower's groups, or asks a
            ResNet image tower (which open_clip locks only whole) for unlocked groups.
    """
    clip = model.clip
    for key, lock, tower in (("model.lock_image", lock_image, "image"), ("model.lock_text", lock_text, "text")):
        opt = _lock_option(lock, key)
        if opt is None:
            continue
        groups, freeze = opt
        n = tower_groups(model, tower)
        if groups > n:
            raise PretrainedError(f"{groups} is more than the {n} groups of the {tower} tower",
                                  key=f"{key}.unlocked_groups")
        if tower == "image":
            if groups and not hasattr(getattr(clip.visual, "transformer", None), "resblocks"):
                raise PretrainedError(f"open_clip locks a {type(clip.visual).__name__} image tower only whole; "
                                      "use 0", key=f"{key}.unlocked_groups")
            clip.lock_image_tower(unlocked_groups=groups, freeze_bn_stats=freeze)
            norm_scope = [clip.visual]
        else:
            clip.lock_text_tower(unlocked_layers=groups)
            norm_scope = [m for m in (getattr(clip, "transformer", None), getattr(clip, "ln_final", None)) if m is not None]
        if freeze:
            for m in _norm_modules(norm_scope):
                for p in m.parameters():
                    p.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if not p.requires_grad)


def locked_summary(model) -> str:
    """``locked 1,234 of 5,678 encoder parameters (image tower 1,000, text tower 234)`` or ``no parameter locked``."""
    clip = model.clip
    total = sum(p.numel() for p in model.parameters())
    locked = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    if not locked:
        return f"no encoder parameter locked ({total:,} trainable)"
    image = sum(p.numel() for p in clip.visual.parameters() if not p.requires_grad)
    return (f"locked {locked:,} of {total:,} encoder parameters (image tower {image:,}, text tower "
            f"{locked - image:,}); they are in no optimiser group and are not clipped")


def start_towers(model, pretrained: Optional[str], lock_image: Any = None, lock_text: Any = None, *,
                 model_name: str = "") -> int:
    """What a run starts from: load ``pretrained`` (if any), then lock the towers (see :func:`apply_locks`).

    Returns:
        The number of locked parameter elements.

    Raises:
        PretrainedError: under ``model.pretrained`` (a missing file too) or ``model.lock_*``.
    """
    if pretrained:
        try:
            load_pretrained(model, pretrained, model_name)
        except FileNotFoundError as e:
            raise PretrainedError(str(e), key=_KEY) from None
    return apply_locks(model, lock_image, lock_text)
