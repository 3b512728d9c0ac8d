"""A margin ranking objective: every negative must score `margin` below the positive, both ways.

For a global batch of N pairs with scores S_ij = s <x_i, y_j> (s the inverse temperature),

    L = 1/N sum_i sum_{j != i} [margin - S_ii + S_ij]_+     (image i ranks its caption first)
      + 1/N sum_j sum_{i != j} [margin - S_jj + S_ij]_+     (caption j ranks its image first)

the "sum of hinges" ranking loss of visual-semantic embeddings (Kiros et al. 2014). Each side is a
sum over anchors of terms that involve the anchor, its positive and ONE other item, so a process
can compute the share of its own anchors if it sees every other item: the layout's column blocks
(texts) for the image side, and the same layout applied to the image features for the text side.
Under the exact layouts (gather, ring) the mean over processes of this share is the loss above and
the gradients reach every process through the layout's collectives.
"""

from __future__ import annotations

import torch
from torch import Tensor

from amortize.comm import Block
from amortize.objectives import Objective, register_objective

SIDES = ("both", "image", "text")


def hinge_share(anchors: Tensor, positive: Tensor, blocks: list[Block], scale: Tensor, margin: float,
                negative_weight: float) -> Tensor:
    """Sum over these anchors of the hinges against every item of ``blocks`` but their positive.

    Args:
        anchors: (R, d) this process's anchors (image rows, or text columns for the text side).
        positive: (R,) each anchor's positive score ``s <x_i, y_i>``.
        blocks: the other modality's items, as a layout hands them out.
        scale: 0-d inverse temperature.
        margin: the margin, in score units.
        negative_weight: weight of each negative (1 except in the ``local`` layout).

    Returns:
        0-d sum (not yet divided by R).
    """
    total = anchors.new_zeros(())
    for blk in blocks:
        scores = scale * anchors @ blk.features.T                                      # (R, M)
        hinge = torch.relu(margin - positive[:, None] + scores)
        hinge = hinge.masked_fill(blk.positive_mask(anchors.shape[0]), 0.0)           # not the positives
        total = total + negative_weight * hinge.sum()
    return total


class MarginRanking(Objective):
    """Sum-of-hinges ranking loss over all negatives (see the module docstring).

    Terms: ``image`` (image-to-text ranking) and ``text`` (text-to-image), each this process's share.

    Args:
        margin: required gap between the positive's score and each negative's, in score units
            (the scores are ``s`` times cosine similarities, so the gap in cosine is ``margin / s``
            and the learnt temperature trades it against the violations). Must be > 0.
        sides: which rankings to train: ``both``, ``image`` or ``text``.
    """

    name = "margin_ranking"
    uses_bias = False          # a logit bias cancels in S_ij - S_ii

    def __init__(self, margin: float = 1.0, sides: str = "both"):
        super().__init__()
        if not margin > 0:
            raise ValueError(f"margin must be > 0, got {margin}")
        if sides not in SIDES:
            raise ValueError(f"unknown sides {sides!r}; valid: {', '.join(SIDES)}")
        self.margin = float(margin)
        self.sides = sides

    def terms(self, pairs, part, log_norm_x=None, log_norm_y=None) -> dict[str, Tensor]:
        """``image`` and/or ``text`` hinge sums of this process's anchors, divided by its rows."""
        positive = pairs.scale * (pairs.x * pairs.y).sum(dim=-1)                     # (R,)
        out = {}
        if self.sides in ("both", "image"):
            # images of this process against all texts: the layout's column blocks
            out["image"] = hinge_share(pairs.x, positive, pairs.blocks, pairs.scale, self.margin,
                                       pairs.negative_weight) / pairs.rows
        if self.sides in ("both", "text"):
            # texts of this process against all images: the same layout, applied to the images
            image_blocks = pairs.layout.columns(pairs.x)
            out["text"] = hinge_share(pairs.y, positive, image_blocks, pairs.scale, self.margin,
                                      pairs.negative_weight) / pairs.rows
        return out


register_objective("margin_ranking", MarginRanking)
