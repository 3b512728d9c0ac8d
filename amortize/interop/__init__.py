"""open_clip in and out: export trained towers, start from pretrained weights, lock towers.

* :mod:`amortize.interop.export`: ``amortize export`` -- the towers as an open_clip model folder
  (``open_clip_config.json``, ``open_clip_model.safetensors``, the model config), which
  ``open_clip.create_model_and_transforms("local-dir:DIR")`` loads without ``amortize``.
* :mod:`amortize.interop.pretrained`: ``model.pretrained`` (an open_clip checkpoint or state dict,
  or an export of ours, checked key by key against the recipe's model) and ``model.lock_image`` /
  ``model.lock_text`` (open_clip's LiT locking).

Nothing here imports Composer; open_clip (the ``clip`` extra) is imported when used.
"""

from amortize.interop.export import export_model, open_clip_config, open_clip_state_dict
from amortize.interop.pretrained import PretrainedError, apply_locks, load_pretrained, read_state_dict

__all__ = [
    "PretrainedError",
    "apply_locks",
    "export_model",
    "load_pretrained",
    "open_clip_config",
    "open_clip_state_dict",
    "read_state_dict",
]
