"""Evaluation: zero-shot classification, image-text retrieval, the DataComp 38-task runner.

``import amortize.eval`` does not import Composer; the Composer callback lives in
``amortize.eval.callback``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from amortize.eval.report import format_jsonl, format_markdown
from amortize.eval.retrieval import RetrievalTask
from amortize.eval.zeroshot import ZeroShotTask


def default_tasks(image_size: int = 28) -> list:
    """The default recipe's evaluation: Fashion-MNIST test zero-shot and held-out emoji retrieval.

    Args:
        image_size: side of the images given to the model.

    Returns:
        ``[ZeroShotTask("fashion_mnist_test", ...), RetrievalTask("emoji_heldout", ...)]``.
    """
    import numpy as np

    from amortize.data.shipped import emoji_captions, emoji_indices, fashion_mnist_meta, load_arrays
    from amortize.data.transforms import ImageArray

    meta = fashion_mnist_meta()
    te = load_arrays("fashion_mnist_test.npz")
    idx = emoji_indices("test")
    caps = emoji_captions()
    return [
        ZeroShotTask(name="fashion_mnist_test", images=ImageArray(te["images"], image_size),
                     labels=torch.as_tensor(te["labels"].astype(np.int64)),
                     classnames=meta["phrases"], templates=meta["zeroshot_templates"]),
        RetrievalTask(name="emoji_heldout",
                      images=ImageArray(load_arrays("emoji.npz")["images"][idx], image_size),
                      captions=[caps[i] for i in idx]),
    ]


def evaluate(model, tokenizer: Callable[[Sequence[str]], torch.Tensor], tasks: Sequence, *,
             batch_size: int = 256, device: str | torch.device = "cpu") -> list[dict]:
    """Run evaluation tasks on a model with open_clip's interface.

    Args:
        model: module with ``encode_image(images (N, 3, H, W)) -> (N, d)`` and
            ``encode_text(tokens (N, L)) -> (N, d)``; features are normalised here. It is put in
            eval mode for the duration and its training flag restored afterwards.
        tokenizer: callable mapping captions to LongTensor (N, L).
        tasks: objects with ``run(model, tokenizer, batch_size=..., device=...) -> list[dict]``,
            e.g. [`ZeroShotTask`][amortize.eval.zeroshot.ZeroShotTask],
            [`RetrievalTask`][amortize.eval.retrieval.RetrievalTask] or [`default_tasks`][amortize.eval.default_tasks].
        batch_size: images or texts per forward pass.
        device: where the model runs.

    Returns:
        Rows ``{"task": str, "metric": str, "value": float}``, e.g. ``top1`` or ``image_to_text_R@5``.
    """
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    rows: list[dict] = []
    try:
        with torch.no_grad():
            for task in tasks:
                rows.extend(task.run(model, tokenizer, batch_size=batch_size, device=device))
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return rows


__all__ = [
    "RetrievalTask",
    "ZeroShotTask",
    "default_tasks",
    "evaluate",
    "format_jsonl",
    "format_markdown",
]
