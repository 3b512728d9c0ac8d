"""The Composer model: a two-tower model joined with a :class:`~amortize.losses.ContrastiveLoss`.

All training state that is not the encoders' (moving-average tables, amortizer networks, their
EMA and previous-epoch copies, the amortizer's Adam, epoch counters) lives in ``loss_fn``'s
buffers, submodules and extra state, so Composer checkpoints it as part of the model's
``state_dict``. The resolved recipe is stored in this model's extra state, which makes every
checkpoint self-describing (``amortize eval CHECKPOINT`` rebuilds the model from it).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from composer.models import ComposerModel
from torch import Tensor, nn

from amortize.gradcache import GradientCachePasses
from amortize.losses import ContrastiveLoss
from amortize.models import TwoTowerModel
from amortize.train.compat import ddp_ignore, loss_state_to_ignore

__all__ = ["ContrastiveComposerModel", "unwrap"]


def unwrap(model: nn.Module) -> "ContrastiveComposerModel":
    """The :class:`ContrastiveComposerModel` inside a DDP (``.module``) wrapper, or the model itself.

    Raises:
        TypeError: if no :class:`ContrastiveComposerModel` is found.
    """
    seen = model
    while not isinstance(seen, ContrastiveComposerModel) and hasattr(seen, "module"):
        seen = seen.module
    if not isinstance(seen, ContrastiveComposerModel):
        raise TypeError(f"expected a ContrastiveComposerModel (possibly DDP-wrapped), got {type(model).__name__}")
    return seen


class ContrastiveComposerModel(ComposerModel):
    """A two-tower contrastive model for Composer's ``Trainer``.

    Batches are dicts ``{"image": (B, 3, H, W), "text": (B, L) int64, "index": (B,) int64}``
    (``index`` only needed by per-sample estimators).

    Args:
        model: the towers and logit parameters.
        loss_fn: the objective and its estimator.
        recipe: the resolved recipe as plain Python (saved in checkpoints), or None.
        gradient_cache: the gradient cache's two passes (:class:`~amortize.gradcache.GradientCachePasses`,
            which holds their size), or None to encode every batch at once; the builder gives one
            where the recipe asks for it (:func:`~amortize.train.gradcache.build_gradient_cache`).

    Attributes:
        last_terms: the detached named loss terms of the latest training batch (logged by
            :class:`~amortize.train.callbacks.LogLossTerms`).
        gradient_cache: as the argument (:class:`~amortize.train.gradcache.GradientCache` runs
            its second pass through :meth:`backward_cached`).
    """

    def __init__(self, model: TwoTowerModel, loss_fn: ContrastiveLoss, recipe: Optional[dict] = None,
                 gradient_cache: Optional[GradientCachePasses] = None):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.recipe = recipe
        self.last_terms: dict[str, Tensor] = {}
        self.gradient_cache = gradient_cache
        # Every process applies identical global updates to the estimator's state (exact
        # layouts), so DDP must not broadcast these (possibly dataset-sized) buffers from rank 0
        # at every step (see amortize.train.compat).
        ddp_ignore(self, loss_state_to_ignore(loss_fn))

    # ------------------------------------------------------------------ open_clip-style interface

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        """(N, 3, H, W) images -> (N, d) features (see :meth:`TwoTowerModel.encode_image`)."""
        return self.model.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        """(N, L) token ids -> (N, d) features (see :meth:`TwoTowerModel.encode_text`)."""
        return self.model.encode_text(tokens, normalize=normalize)

    # ------------------------------------------------------------------ Composer interface

    def _encode(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        return self.model(batch["image"], batch["text"])

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        """Encode a batch.

        With a :attr:`gradient_cache`, in training mode with gradients enabled, this is its first
        pass (:meth:`~amortize.gradcache.GradientCachePasses.encode`: a batch it splits is encoded
        without a graph and the outputs are leaves requiring gradients); after the loss's backward,
        :meth:`backward_cached` must run the second pass (Composer: the
        :class:`~amortize.train.gradcache.GradientCache` algorithm does).

        Args:
            batch: ``{"image": (B, 3, H, W), "text": (B, L), "index": (B,)}``.

        Returns:
            ``{"image_features": (B, d), "text_features": (B, d), "scale": 0-d s (not log s),
            "bias": 0-d b or None}`` with L2-normalised features.

        Raises:
            RuntimeError: if the previous split batch's second pass never ran.
        """
        cache = self.gradient_cache
        if cache is not None and self.training and torch.is_grad_enabled():
            x, y, scale, bias = cache.encode(self._encode, batch)
        else:
            x, y, scale, bias = self._encode(batch)
        return {"image_features": x, "text_features": y, "scale": scale, "bias": bias}

    def backward_cached(self) -> bool:
        """The gradient cache's second pass for the latest :meth:`forward` (after the loss's backward).

        Re-encodes each part of the split batch with its random state replayed and backpropagates
        the gradients the loss left on the cached features into the towers
        (:meth:`~amortize.gradcache.GradientCachePasses.backward`).

        Returns:
            True if a second pass ran, False if the latest batch was encoded at once.
        """
        return self.gradient_cache is not None and self.gradient_cache.backward()

    def loss(self, outputs: dict[str, Any], batch: dict[str, Tensor], *args: Any, **kwargs: Any) -> Tensor:
        """The contrastive loss of a batch (updates the estimator's state in training mode).

        Returns:
            0-d loss; the named terms are kept in :attr:`last_terms`.
        """
        index = batch.get("index") if self.loss_fn.needs_index else None
        terms = self.loss_fn(
            outputs["image_features"], outputs["text_features"], outputs["scale"], outputs["bias"], index=index,
        )
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return terms["loss"]

    def get_metrics(self, is_train: bool = False) -> dict:
        """No torchmetrics: per-term values are logged by :class:`~amortize.train.callbacks.LogLossTerms`."""
        return {}

    def eval_forward(self, batch: dict[str, Tensor], outputs: Optional[Any] = None) -> Any:
        """Features of a batch (no loss, no state update)."""
        return outputs if outputs is not None else self.forward(batch)

    def update_metric(self, batch: Any, outputs: Any, metric: Any) -> None:
        """Unused (no metrics)."""

    # ------------------------------------------------------------------ checkpoint metadata

    def get_extra_state(self) -> dict:
        """``{"recipe": dict or None}``: plain Python, so checkpoints stay ``weights_only``-loadable."""
        return {"recipe": self.recipe}

    def set_extra_state(self, state: dict) -> None:
        """Adopt the stored recipe, unless this model was built from one (a resumed run keeps its own)."""
        if self.recipe is None and isinstance(state, dict) and state.get("recipe") is not None:
            self.recipe = state["recipe"]
