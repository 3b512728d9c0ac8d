"""Small stand-ins for an open_clip model used by the evaluation tests."""

from __future__ import annotations

import numpy as np
import torch


class TinyClip(torch.nn.Module):
    """Random linear image encoder on (3, H, W) inputs and a bag-of-tokens text encoder."""

    def __init__(self, image_size: int = 8, dim: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.image_proj = torch.nn.Parameter(torch.randn(3 * image_size * image_size, dim, generator=g))
        self.token_emb = torch.nn.Parameter(torch.randn(49408, dim, generator=g))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.image_proj

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens > 0).float().unsqueeze(-1)
        return (self.token_emb[tokens] * mask).sum(1) / mask.sum(1).clamp_min(1)


def pil_transform(size: int = 8):
    """PIL image -> float (3, size, size) in [0, 1]."""

    def f(im):
        arr = np.asarray(im.convert("RGB").resize((size, size)), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1)

    return f
