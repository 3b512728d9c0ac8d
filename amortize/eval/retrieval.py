"""Image-text retrieval: recall@k in both directions, with one or several captions per image."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from amortize.eval.features import encode_images, encode_texts


def recall_at_k(scores: torch.Tensor, positives: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of queries with at least one positive among their k best-scored candidates.

    Args:
        scores: (Q, K) similarity of each query to each candidate.
        positives: bool (Q, K), True where the candidate matches the query.
        ks: values of k (clipped to K).

    Returns:
        ``{k: recall}``.
    """
    order = scores.argsort(dim=1, descending=True)
    ranked_pos = positives.gather(1, order)
    return {k: ranked_pos[:, :min(k, scores.shape[1])].any(dim=1).float().mean().item() for k in ks}


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      text_to_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k for image-to-text and text-to-image retrieval.

    Args:
        image_features: (Ni, d) normalised.
        text_features: (Nt, d) normalised.
        text_to_image: (Nt,) long, the image each caption describes.
        ks: values of k.

    Returns:
        ``image_to_text_R@k``, ``text_to_image_R@k`` for each k, and ``mean_R@1`` (DataComp's
        ``mean_recall@1``: the average of the two R@1).
    """
    scores = text_features @ image_features.T  # (Nt, Ni)
    pos = torch.zeros_like(scores, dtype=torch.bool)
    pos[torch.arange(len(text_to_image)), text_to_image] = True
    out = {}
    for k, v in recall_at_k(scores.T, pos.T, ks).items():
        out[f"image_to_text_R@{k}"] = v
    for k, v in recall_at_k(scores, pos, ks).items():
        out[f"text_to_image_R@{k}"] = v
    if 1 in ks:
        out["mean_R@1"] = 0.5 * (out["image_to_text_R@1"] + out["text_to_image_R@1"])
    return out


def flatten_captions(captions: Sequence[str | Sequence[str]]) -> tuple[list[str], torch.Tensor]:
    """Flatten per-image captions.

    Args:
        captions: for each of Ni images, one caption or a list of captions.

    Returns:
        (texts of length Nt, LongTensor (Nt,) of the image index of each text).
    """
    texts, owner = [], []
    for i, c in enumerate(captions):
        for t in ([c] if isinstance(c, str) else list(c)):
            texts.append(t)
            owner.append(i)
    return texts, torch.tensor(owner, dtype=torch.long)


@dataclass
class RetrievalTask:
    """An image-text retrieval task.

    Attributes:
        name: task name used in the report rows.
        images: Tensor (Ni, 3, H, W), an [`ImageArray`][amortize.data.transforms.ImageArray] or an
            iterable of float batches.
        captions: for each image, its caption or list of captions.
    """

    name: str
    images: object
    captions: Sequence[str | Sequence[str]]
    ks: Sequence[int] = field(default=(1, 5, 10))

    def run(self, model, tokenizer: Callable, *, batch_size: int = 256,
            device: str | torch.device = "cpu") -> list[dict]:
        """Rows ``{"task", "metric", "value"}`` for recall@k both ways and ``mean_R@1``."""
        texts, owner = flatten_captions(self.captions)
        img = encode_images(model, self.images, batch_size=batch_size, device=device)
        if img.shape[0] != len(self.captions):
            raise ValueError(f"task {self.name}: {img.shape[0]} images but {len(self.captions)} caption lists")
        txt = encode_texts(model, tokenizer, texts, batch_size=batch_size, device=device)
        metrics = retrieval_metrics(img, txt, owner, self.ks)
        return [{"task": self.name, "metric": m, "value": v} for m, v in metrics.items()]
