"""Feature extraction shared by the evaluation tasks (features are L2-normalised here)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F


def image_batches(images, batch_size: int) -> Iterable[torch.Tensor]:
    """Yield float batches (b, C, H, W) from a tensor, a sliceable array or an iterable of batches.

    Args:
        images: a Tensor (N, C, H, W), an object whose ``[a:b]`` slice returns such a tensor
            (e.g. [`ImageArray`][amortize.data.transforms.ImageArray]), or an iterable of batches.
        batch_size: b.
    """
    if isinstance(images, torch.Tensor) or (hasattr(images, "__len__") and hasattr(images, "__getitem__")):
        for a in range(0, len(images), batch_size):
            yield images[a:a + batch_size]
    else:
        yield from images


@torch.no_grad()
def encode_images(model, images, *, batch_size: int = 256, device: str | torch.device = "cpu") -> torch.Tensor:
    """Normalised image features.

    Args:
        model: anything with ``encode_image(x) -> (b, d)``.
        images: see [`image_batches`][amortize.eval.features.image_batches].

    Returns:
        float32 (N, d) on the CPU, unit rows.
    """
    feats = [F.normalize(model.encode_image(x.to(device)).float(), dim=-1).cpu()
             for x in image_batches(images, batch_size)]
    if not feats:
        raise ValueError("no images to encode")
    return torch.cat(feats)


@torch.no_grad()
def encode_texts(model, tokenizer: Callable[[Sequence[str]], torch.Tensor], texts: Sequence[str], *,
                 batch_size: int = 256, device: str | torch.device = "cpu") -> torch.Tensor:
    """Normalised text features of N captions.

    Returns:
        float32 (N, d) on the CPU, unit rows.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to encode")
    feats = []
    for a in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[a:a + batch_size]).to(device)
        feats.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(feats)
