"""How negatives travel between processes."""

from __future__ import annotations

import torch.distributed as dist

__all__ = ["world_size", "rank", "distributed_loss"]


def world_size() -> int:
    """Number of processes in the default group (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 when torch.distributed is not initialised)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def distributed_loss(loss_module, image_features, text_features, logit_scale, logit_bias=None, index=None):
    """Multi-process forward of :class:`amortize.losses.ContrastiveLoss` (not implemented yet)."""
    raise NotImplementedError("multi-process losses are not implemented yet")
