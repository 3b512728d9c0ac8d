"""Image conversions shared by the shipped datasets and the evaluation tasks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD (copied so that this module needs no open_clip).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel RGB mean of CLIP's image normalisation."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel RGB standard deviation of CLIP's image normalisation."""


def uint8_to_float(
    images: np.ndarray | torch.Tensor,
    image_size: int | None = None,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """Convert uint8 pixels to normalised float images.

    Args:
        images: uint8 (N, H, W) greyscale or (N, H, W, 3) RGB.
        image_size: output side S; ``None`` keeps H x W. Resizing is bilinear with antialiasing.
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation divided by.

    Returns:
        float32 (N, 3, S, S); greyscale is repeated over the three channels.
    """
    x = torch.as_tensor(np.asarray(images))
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {x.dtype}")
    if x.ndim == 3:
        x = x.unsqueeze(-1).expand(*x.shape, 3)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W) or (N, H, W, 3) images, got {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if image_size is not None and tuple(x.shape[-2:]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True,
                          align_corners=False)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


class ImageArray:
    """Lazily normalised view of a uint8 image array; slicing returns float batches.

    Args:
        pixels: uint8 (N, H, W) or (N, H, W, 3).
        image_size: output side S (``None``: keep the stored size).
        mean: normalisation mean.
        std: normalisation standard deviation.

    ``array[i]`` gives float (3, S, S); ``array[a:b]`` or ``array[index_tensor]`` gives (n, 3, S, S).
    """

    def __init__(self, pixels: np.ndarray, image_size: int | None = None,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        self.pixels = pixels
        self.image_size = image_size
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, (int, np.integer)):
            return uint8_to_float(self.pixels[int(idx)][None], self.image_size, self.mean, self.std)[0]
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        return uint8_to_float(self.pixels[idx], self.image_size, self.mean, self.std)
