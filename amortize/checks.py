"""Input validation and dtype helpers shared by the kernels, objectives and estimators.

Every check takes the validation level explicitly:

* ``"full"`` checks shapes, dtypes, finiteness and ranges (the finiteness checks read tensor values
  and so synchronise a GPU);
* ``"shapes"`` skips the checks that read tensor values;
* ``"off"`` skips all checks.

A loss module carries its own level (``ContrastiveLoss(checks=...)``); the functional face reads
the process default of :func:`amortize.functional.set_checks`, kept here as :data:`DEFAULT`.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

import torch
from torch import Tensor

__all__ = [
    "Checks",
    "LEVELS",
    "DEFAULT",
    "resolve",
    "features",
    "scalar",
    "vector",
    "pos_weight",
    "chunk_size",
    "finite",
    "as_float32",
    "scalar_tensor",
    "log_weight",
    "non_finite_tensors",
    "warn_once",
    "feature_dim",
    "unique_index",
    "epoch_counts",
    "unneeded_bias",
    "normalised",
]

Scalar = Union[float, Tensor]
Checks = Literal["full", "shapes", "off"]
"""Validation levels."""

LEVELS = ("full", "shapes", "off")
"""The valid validation levels."""

DEFAULT: list[str] = ["full"]
"""The process-wide default level (a one-element list, set by :func:`amortize.functional.set_checks`)."""


def resolve(level: Optional[str]) -> str:
    """``level``, or the process default when None; an unknown level is an error naming the valid ones."""
    if level is None:
        return DEFAULT[0]
    if level not in LEVELS:
        raise ValueError(f"unknown checks level {level!r}; valid levels: {', '.join(LEVELS)}")
    return level


def finite(name: str, t: Tensor, level: str) -> None:
    """Raise if ``t`` holds NaN or Inf (level ``full`` only)."""
    if level == "full" and not bool(torch.isfinite(t).all()):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise ValueError(f"{name} contains {bad} values")


def features(x: Tensor, y: Tensor, level: str, names: tuple[str, str] = ("x", "y")) -> None:
    """Check a pair of (B, d) feature batches: tensors, floating, same shape, dtype and device, finite."""
    if level == "off":
        return
    for name, t in zip(names, (x, y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape (B, d), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.shape[0] < 1:
            raise ValueError(f"{name} is an empty batch (shape {tuple(t.shape)})")
    if x.shape != y.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape (B, d), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.dtype != y.dtype:
        raise TypeError(f"{names[0]} and {names[1]} must have the same dtype, got {x.dtype} and {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"{names[0]} and {names[1]} are on different devices: {x.device} and {y.device}")
    finite(names[0], x, level)
    finite(names[1], y, level)


def scalar(name: str, v: Scalar, level: str, positive: bool = False) -> None:
    """Check a float or one-element floating tensor; finite and, with ``positive``, > 0 (level ``full``)."""
    if level == "off":
        return
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a scalar (one element), got shape {tuple(v.shape)}")
        if not v.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {v.dtype}")
        if level != "full":
            return
        value = float(v.detach())
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        value = float(v)
    else:
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(v).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def vector(name: str, v: Tensor, batch: int, level: str) -> None:
    """Check a (batch,) floating, finite tensor."""
    if level == "off":
        return
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if v.shape != (batch,):
        raise ValueError(f"{name} must have shape (B,) = ({batch},), got {tuple(v.shape)}")
    if not v.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {v.dtype}")
    finite(name, v, level)


def pos_weight(value: float, batch: int, level: str = "full") -> None:
    """Check ``c``: a finite float >= 0, and > 0 when the batch has a single pair."""
    if level == "off":
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"pos_weight must be a finite float >= 0, got {value!r}")
    if value == 0 and batch < 2:
        raise ValueError("pos_weight=0 leaves an empty partition sum for a batch of 1; use B >= 2")


def chunk_size(value: Optional[int]) -> None:
    """Check a chunk size: None (one chunk) or a positive integer."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {value!r}")


def as_float32(t: Tensor) -> Tensor:
    """``t`` in float32, unless it is already float32 or float64 (the objectives' dtype policy)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def scalar_tensor(v: Scalar, like: Tensor) -> Tensor:
    """A 0-d tensor of ``v`` with the dtype and device of ``like`` (gradients flow through a tensor ``v``)."""
    if isinstance(v, Tensor):
        return v.reshape(()).to(dtype=like.dtype, device=like.device)
    return torch.tensor(float(v), dtype=like.dtype, device=like.device)


def log_weight(w: float) -> float:
    """``log w``, with ``-inf`` for ``w = 0``."""
    return math.log(w) if w > 0 else -math.inf


def non_finite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors of a ``state_dict`` that hold a NaN or an infinity.

    One device-to-host copy for the whole dict (one flag per tensor, stacked).

    >>> non_finite_tensors({"w": torch.tensor([1.0, float("nan")]), "n": torch.tensor(3)})
    ['w']
    """
    names = [k for k, v in state.items() if isinstance(v, Tensor) and v.is_floating_point() and v.numel()]
    if not names:
        return []
    flags = torch.stack([~torch.isfinite(state[k].detach()).all().to("cpu", non_blocking=False) for k in names])
    return [k for k, bad in zip(names, flags.tolist()) if bad]


_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """``warnings.warn(message)`` the first time ``key`` is seen in this process (a ``UserWarning``)."""
    import warnings

    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


def feature_dim(names: tuple[str, str], tensors: tuple[Tensor, Tensor], dim: int, owner: str) -> None:
    """Refuse features whose last dimension is not the ``dim`` a module was built with.

    Raises:
        ValueError: ``AmortizedEstimator was built with dim=32 but x has 16 features (shape (8, 16))``.
    """
    for name, t in zip(names, tensors):
        if t.ndim != 2 or t.shape[1] != dim:
            raise ValueError(f"{owner} was built with dim={dim} but {name} has shape {tuple(t.shape)}; "
                             f"expected (B, {dim})")


def unique_index(index: Tensor, owner: str) -> None:
    """Warn once when a batch's dataset indices repeat (reads values: one synchronisation).

    A per-sample table updated with repeated indices keeps one of the updates of each repeated
    sample (which one is unspecified), so the repetition is reported rather than silent;
    resampled shards can legitimately draw a sample twice in one batch.
    """
    flat = index.reshape(-1)
    uniq = torch.unique(flat)
    if uniq.numel() != flat.numel():
        counts = torch.bincount(torch.searchsorted(uniq, flat), minlength=uniq.numel())
        twice = uniq[counts > 1][:5].tolist()
        warn_once(f"{owner}:duplicates", f"{owner}: the batch's index holds repeated samples (first: {twice}); "
                  "each repeated sample's moving average keeps one of its updates")


def epoch_counts(epoch: int, max_epochs: int) -> None:
    """Refuse ``start_epoch(epoch, max_epochs)`` outside ``0 <= epoch`` and ``max_epochs >= 1``.

    Raises:
        ValueError: ``start_epoch: epoch must be >= 0, got -3``.
    """
    if int(epoch) != epoch or epoch < 0:
        raise ValueError(f"start_epoch: epoch must be a whole number >= 0 (0-based), got {epoch!r}")
    if int(max_epochs) != max_epochs or max_epochs < 1:
        raise ValueError(f"start_epoch: max_epochs must be a whole number >= 1, got {max_epochs!r}")


def unneeded_bias(objective: str, needs_bias: bool) -> None:
    """Warn once that a logit bias passed to an objective that does not use one has no effect.

    A constant added to every score cancels in normalised scores (InfoNCE's softmax, the
    linearized objective's normalised sums); only the sigmoid (SigLIP) objective uses it.
    """
    if not needs_bias:
        warn_once(f"bias:{objective}", f"the {objective} objective does not use a logit bias (a constant added to "
                  "every score cancels in its normalised scores; only the sigmoid objective uses one); the bias "
                  "passed has no effect: pass bias=None")


NORM_TOLERANCE = 1e-2
"""How far from 1 a feature row's L2 norm may be before :func:`normalised` warns."""


def normalised(x: Tensor, y: Tensor, level: str, names: tuple[str, str] = ("x", "y")) -> None:
    """Warn once when features are not L2-normalised (level ``full`` only: it reads values).

    The objectives take cosine similarities times the scale; rows of another norm still give a
    loss, but not the documented one. The features are used as given (not normalised here).
    """
    if level != "full" or x.numel() == 0:
        return
    with torch.no_grad():
        dev = torch.stack([(t.detach().float().norm(dim=-1) - 1).abs().max() for t in (x, y)]).tolist()
    for name, d in zip(names, dev):
        if d > NORM_TOLERANCE:
            warn_once(f"norm:{name}", f"{name} is not L2-normalised (a row's norm is off 1 by {d:.3g}); the "
                      "objectives expect unit rows (torch.nn.functional.normalize(x, dim=-1)); the features are "
                      "used as given")
