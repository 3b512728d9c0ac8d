"""Zero-shot classification: class names x prompt templates -> a linear head on image features."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from string import Formatter
from typing import Optional

import torch
import torch.nn.functional as F

from amortize.eval.features import encode_images, encode_texts


def build_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence[str], *,
                     batch_size: int = 256, device: str | torch.device = "cpu") -> torch.Tensor:
    """Zero-shot weights: for each class, the normalised mean of its normalised prompt embeddings.

    Args:
        classnames: C names (inserted into each template with ``str.format`` or at ``{c}``).
        templates: T prompt templates containing ``{}`` or ``{c}``.

    Returns:
        float32 (d, C), unit columns.
    """
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    prompts = [fill_template(t, c) for c in classnames for t in templates]
    emb = encode_texts(model, tokenizer, prompts, batch_size=batch_size, device=device)
    emb = emb.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1).T.contiguous()


def fill_template(template: str, classname: str) -> str:
    """Insert a class name into a template using ``{}`` (open_clip style) or ``{c}`` (clip_benchmark)."""
    if "{c}" in template:
        return template.replace("{c}", classname)
    return template.format(classname)


def template_problem(template: str) -> Optional[str]:
    """What keeps ``template`` from taking one class name (None: nothing).

    A template holds ``{c}`` (replaced as it is) or ``str.format`` fields that all take the one
    class name: ``{}`` (once) or ``{0}`` (any number of times); a literal brace is ``{{`` or ``}}``.

    >>> template_problem("a photo of a {}.") is None
    True
    >>> template_problem("{} and {}")
    "has 2 '{}' fields but there is one class name; use '{0}' to repeat it"
    """
    if "{c}" in template:
        return None
    try:
        fields = [f for _, f, _, _ in Formatter().parse(template) if f is not None]
    except ValueError as e:
        return f"is not a format string ({e}); write a literal brace as '{{{{' or '}}}}'"
    if not fields:
        return "has no '{}' where the class name goes"
    other = next((f for f in fields if f not in ("", "0")), None)
    if other is not None:
        return f"names the field {{{other}}}; the class name goes at '{{}}' (or '{{c}}')"
    if fields.count("") > 1:
        return f"has {fields.count('')} '{{}}' fields but there is one class name; use '{{0}}' to repeat it"
    try:
        template.format("class name")
    except (IndexError, KeyError, ValueError, AttributeError, TypeError) as e:
        return f"cannot take a class name ({type(e).__name__}: {e})"
    return None


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fraction of samples whose label is among the k highest logits.

    Args:
        logits: (N, C).
        labels: (N,) int.
        ks: values of k; those larger than C are skipped.

    Returns:
        ``{"top1": ..., "top5": ...}``.
    """
    out = {}
    order = logits.argsort(dim=1, descending=True)
    for k in ks:
        if k <= logits.shape[1]:
            hit = (order[:, :k] == labels[:, None]).any(dim=1)
            out[f"top{k}"] = hit.float().mean().item()
    return out


def mean_per_class_recall(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Mean over classes present in ``labels`` of the fraction of that class predicted correctly.

    Args:
        preds: (N,) predicted class.
        labels: (N,) true class.
        num_classes: C.
    """
    correct = torch.zeros(num_classes).index_add_(0, labels, (preds == labels).float())
    count = torch.bincount(labels, minlength=num_classes).float()
    present = count > 0
    return (correct[present] / count[present]).mean().item()


@dataclass
class ZeroShotTask:
    """A zero-shot classification task.

    Attributes:
        name: task name used in the report rows.
        images: Tensor (N, 3, H, W), an [`ImageArray`][amortize.data.transforms.ImageArray] or an
            iterable of float batches.
        labels: LongTensor (N,).
        classnames: C class names.
        templates: prompt templates with ``{}``.
    """

    name: str
    images: object
    labels: torch.Tensor
    classnames: Sequence[str]
    templates: Sequence[str]
    ks: Sequence[int] = field(default=(1, 5))

    def logits(self, model, tokenizer: Callable, *, batch_size: int = 256,
               device: str | torch.device = "cpu") -> torch.Tensor:
        """Cosine similarities (N, C) between images and the class embeddings."""
        head = build_classifier(model, tokenizer, self.classnames, self.templates,
                                batch_size=batch_size, device=device)
        return encode_images(model, self.images, batch_size=batch_size, device=device) @ head

    def run(self, model, tokenizer: Callable, *, batch_size: int = 256,
            device: str | torch.device = "cpu") -> list[dict]:
        """Rows ``{"task", "metric", "value"}`` for top-k accuracy and mean per-class recall."""
        logits = self.logits(model, tokenizer, batch_size=batch_size, device=device)
        labels = torch.as_tensor(self.labels).long()
        if logits.shape[0] != labels.shape[0]:
            raise ValueError(f"task {self.name}: {logits.shape[0]} images but {labels.shape[0]} labels")
        metrics = topk_accuracy(logits, labels, self.ks)
        metrics["mean_per_class_recall"] = mean_per_class_recall(
            logits.argmax(dim=1), labels, len(self.classnames))
        return [{"task": self.name, "metric": m, "value": v} for m, v in metrics.items()]
