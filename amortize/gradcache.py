"""Gradient-cached microbatching: the exact gradient of a whole contrastive batch in a microbatch's memory.

A contrastive loss couples every pair of the batch, so splitting the batch into microbatches and
accumulating gradients (what ``--accum-freq``-less trainers do) changes the objective: each sample
would contrast only against its own microbatch. The gradient cache (Gao et al., 2021) keeps the
whole batch's loss and splits only the encoders' work, in two passes:

1. **Encode without a graph.** Every microbatch goes through the encoder under ``torch.no_grad``;
   the random state (CPU and, when CUDA is initialised, every CUDA device) is recorded before each
   microbatch. The outputs are concatenated and made leaf tensors that require gradients.
2. **Loss once.** The caller computes the loss on those leaves, exactly as on the whole batch (all
   negatives; an estimator's targets and state update happen once; distributed layouts and
   chunked kernels are unchanged) and backpropagates it: this fills the leaves' ``.grad``, the
   gradient of the loss with respect to the features.
3. **Re-encode with a graph.** Each microbatch is encoded again with its recorded random state
   restored (so dropout and drop-path draw the same masks) and ``torch.autograd.backward`` sends
   the cached feature gradients into the encoder's parameters; the graph of one microbatch is
   freed before the next is built.

The encoder's gradients equal the whole batch's up to float rounding (the features of a row do not
depend on which rows share its microbatch, unless a layer normalises over the batch: BatchNorm is
refused by :func:`check_microbatchable`). Peak memory is that of the encoders on one microbatch
plus the loss on the whole batch's features; the price is a second forward pass of the encoders.

Outputs of the encoder are either *per-sample* (at least one dimension, the first indexing the
microbatch's rows: features) or *shared* (0-d: the logit scale and bias, which do not depend on the
inputs). Shared outputs are taken from the first microbatch, and their cached gradient goes back
through the graph of the last microbatch only, so parameters behind them are counted once and, under
``DistributedDataParallel``, the last (synchronised) backward reaches every parameter.

>>> import torch
>>> enc = torch.nn.Linear(3, 2)
>>> batch = torch.randn(5, 3)
>>> loss_of = lambda z: z.pow(2).sum()
>>> loss = gradient_cached_backward(lambda b: (enc(b),), batch, 2, lambda z: loss_of(z))
>>> g = enc.weight.grad.clone(); enc.zero_grad(); loss_of(enc(batch)).backward()
>>> torch.allclose(g, enc.weight.grad)
True

This module never imports Composer; :mod:`amortize.train` drives it from Composer's events.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
from torch import Tensor, nn

from amortize.options import AT_LEAST_ONE

__all__ = [
    "RandomState",
    "CachedEncoding",
    "GradientCachePasses",
    "microbatch_sizes",
    "split_batch",
    "check_microbatchable",
    "encode_without_graph",
    "backward_through_encoder",
    "gradient_cached_backward",
]

Encode = Callable[[Any], Sequence[Optional[Tensor]]]


def _sizes(n: int, microbatch_size: int) -> list[int]:
    full, rest = divmod(n, microbatch_size)
    return [microbatch_size] * full + ([rest] if rest else [])


def microbatch_sizes(n: int, microbatch_size: int) -> list[int]:
    """Sizes of the microbatches of a batch of ``n`` rows: full ones, then the remainder.

    >>> microbatch_sizes(10, 4)
    [4, 4, 2]

    Raises:
        ValueError: if ``n < 1``, or ``microbatch_size < 1`` (an :class:`~amortize.options.RecipeError`
            naming ``microbatch_size``, :data:`~amortize.options.AT_LEAST_ONE`).
    """
    if n < 1:
        raise ValueError(f"the batch must have at least one row, got {n}")
    AT_LEAST_ONE.check(microbatch_size, "microbatch_size")
    return _sizes(n, microbatch_size)


def _rows(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        sizes = {int(v.shape[0]) for v in batch.values() if isinstance(v, Tensor)}
    elif isinstance(batch, (tuple, list)):
        sizes = {int(v.shape[0]) for v in batch if isinstance(v, Tensor)}
    else:
        raise TypeError(f"a batch must be a tensor, a dict, a tuple or a list of tensors, got {type(batch).__name__}")
    if len(sizes) != 1:
        raise ValueError(f"the tensors of a batch must share their first dimension, got sizes {sorted(sizes)}")
    return sizes.pop()


def _split(batch: Any, sizes: Sequence[int]) -> list[Any]:
    out, start = [], 0
    for size in sizes:
        sl = slice(start, start + size)
        if isinstance(batch, Tensor):
            out.append(batch[sl])
        elif isinstance(batch, dict):
            out.append({k: v[sl] if isinstance(v, Tensor) else v for k, v in batch.items()})
        else:
            out.append(type(batch)(v[sl] if isinstance(v, Tensor) else v for v in batch))
        start += size
    return out


def split_batch(batch: Any, microbatch_size: int) -> list[Any]:
    """Split a batch along its first dimension into microbatches of ``microbatch_size`` rows (the last may be smaller).

    Args:
        batch: a tensor, or a dict / tuple / list whose tensors share their first dimension (other
            values are passed to every microbatch unchanged).
        microbatch_size: rows per microbatch (checked: :func:`microbatch_sizes`).

    Returns:
        The microbatches, of the batch's type, as views of its tensors.
    """
    return _split(batch, microbatch_sizes(_rows(batch), microbatch_size))


@dataclass
class RandomState:
    """The state of the default random generators: the CPU one and, if CUDA is initialised, each device's.

    Attributes:
        cpu: the CPU generator's state.
        cuda: one state per CUDA device, or None when CUDA was not initialised.
    """

    cpu: Tensor
    cuda: Optional[list[Tensor]] = None

    @classmethod
    def capture(cls) -> "RandomState":
        """The current state (CUDA devices are included only when CUDA is already initialised)."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        """Make the generators continue from this state."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


@dataclass
class CachedEncoding:
    """The result of the first pass (:func:`encode_without_graph`).

    Attributes:
        microbatches: the microbatches, in order.
        sizes: their numbers of rows.
        outputs: the encoder's outputs for the whole batch: per-sample outputs concatenated over the
            microbatches, shared (0-d) outputs from the first one; floating-point ones are leaf tensors
            with ``requires_grad=True`` (None outputs stay None). Compute the loss on these.
        states: the random state recorded before each microbatch.
    """

    microbatches: list[Any]
    sizes: list[int]
    outputs: tuple[Optional[Tensor], ...]
    states: list[RandomState]

    def feature_grads(self) -> tuple[Optional[Tensor], ...]:
        """The gradients the loss's backward left on :attr:`outputs` (None where it left none)."""
        return tuple(None if o is None else o.grad for o in self.outputs)


def check_microbatchable(module: nn.Module) -> None:
    """Refuse encoders whose output for a row depends on the other rows of its batch.

    Raises:
        ValueError: for a BatchNorm layer in training mode (it normalises with the statistics of
            the microbatch, and the two passes would update its running statistics twice).
    """
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    for name, m in module.named_modules():
        if isinstance(m, norms) and m.training:
            raise ValueError(
                f"gradient-cached microbatching cannot be exact with BatchNorm in training mode ({name or 'the module'} "
                f"is a {type(m).__name__}): it normalises each microbatch with that microbatch's statistics. "
                "Use a model without BatchNorm (the ViT towers) or leave device_train_microbatch_size unset."
            )


def _as_tuple(outs: Any) -> tuple[Optional[Tensor], ...]:
    if isinstance(outs, Tensor) or outs is None:
        return (outs,)
    return tuple(outs)


def _is_shared(t: Tensor) -> bool:
    return t.dim() == 0


def encode_without_graph(encode: Encode, microbatches: Sequence[Any]) -> CachedEncoding:
    """Pass 1: encode every microbatch under ``torch.no_grad``, recording the random state before each.

    Args:
        encode: microbatch -> tuple of tensors (per-sample outputs of shape (n, ...), shared 0-d
            outputs, or None), e.g. ``lambda b: model(b["image"], b["text"])``.
        microbatches: the microbatches (see :func:`split_batch`).

    Returns:
        A :class:`CachedEncoding` whose ``outputs`` are leaves requiring gradients.

    Raises:
        ValueError: if a per-sample output does not have one row per sample, or the microbatches
            disagree on the number or kind of outputs.
    """
    if not microbatches:
        raise ValueError("no microbatches to encode")
    states, per_mb, sizes = [], [], []
    for mb in microbatches:
        states.append(RandomState.capture())
        with torch.no_grad():
            outs = _as_tuple(encode(mb))
        n = _rows(mb)
        for i, o in enumerate(outs):
            if o is not None and not _is_shared(o) and int(o.shape[0]) != n:
                raise ValueError(f"output {i} of the encoder has {int(o.shape[0])} rows for a microbatch of {n}; "
                                 "per-sample outputs must have one row per sample, shared outputs must be 0-d")
        if per_mb and len(outs) != len(per_mb[0]):
            raise ValueError(f"the encoder returned {len(outs)} outputs for one microbatch and {len(per_mb[0])} for another")
        per_mb.append(outs)
        sizes.append(n)
    outputs = []
    for i, first in enumerate(per_mb[0]):
        if first is None:
            if any(o[i] is not None for o in per_mb):
                raise ValueError(f"output {i} of the encoder is None for some microbatches only")
            outputs.append(None)
            continue
        whole = first if _is_shared(first) else torch.cat([o[i] for o in per_mb])
        whole = whole.detach()
        if whole.is_floating_point() or whole.is_complex():
            whole.requires_grad_(True)
        outputs.append(whole)
    return CachedEncoding(list(microbatches), sizes, tuple(outputs), states)


def backward_through_encoder(
    encode: Encode,
    cache: CachedEncoding,
    grads: Optional[Sequence[Optional[Tensor]]] = None,
    no_sync: Optional[Callable[[], ContextManager]] = None,
) -> None:
    """Pass 2: re-encode each microbatch with a graph, replaying its random state, and backpropagate the cached gradients.

    Gradients accumulate into the parameters' ``.grad`` as one backward over the whole batch would
    leave them. The random state after the call is the one before it.

    Args:
        encode: the same function as in :func:`encode_without_graph`.
        cache: the first pass's result.
        grads: the gradients of the loss with respect to ``cache.outputs`` (default: their ``.grad``,
            left by the loss's backward).
        no_sync: a context manager factory entered around every microbatch but the last (for
            ``DistributedDataParallel``: ``ddp_model.no_sync``, so that only the last backward
            all-reduces); None for none.
    """
    grads = tuple(grads) if grads is not None else cache.feature_grads()
    if len(grads) != len(cache.outputs):
        raise ValueError(f"got {len(grads)} gradients for {len(cache.outputs)} outputs")
    after = RandomState.capture()
    last = len(cache.microbatches) - 1
    try:
        start = 0
        for k, (mb, n, state) in enumerate(zip(cache.microbatches, cache.sizes, cache.states)):
            ctx = no_sync() if (no_sync is not None and k < last) else contextlib.nullcontext()
            with ctx:
                state.restore()
                outs = _as_tuple(encode(mb))
                tensors, grad_tensors = [], []
                for o, g, whole in zip(outs, grads, cache.outputs):
                    if o is None or g is None or not o.requires_grad:
                        continue
                    if whole is not None and _is_shared(whole):
                        if k != last:  # shared outputs: their gradient goes back once, with the last microbatch
                            continue
                        tensors.append(o)
                        grad_tensors.append(g.to(o.dtype))
                    else:
                        tensors.append(o)
                        grad_tensors.append(g[start:start + n].to(o.dtype))
                if tensors:
                    torch.autograd.backward(tensors, grad_tensors)
            start += n
    finally:
        after.restore()


class GradientCachePasses:
    """The two passes around a loss that is computed and backpropagated elsewhere.

    For a training step that calls the encoder, the loss and its backward itself (Composer's: the
    model's ``forward``, its ``loss``, the trainer's backward; see
    :class:`~amortize.train.model.ContrastiveComposerModel`)::

        outputs = passes.encode(encode, batch)  # pass 1: leaves
        loss_fn(*outputs).backward()            # the loss of the whole batch, once
        passes.backward()                       # pass 2: the cached gradients into the encoder

    In training it is the one holder of the rows per microbatch (a recipe's, given by
    :func:`amortize.train.gradcache.build_gradient_cache`).

    Args:
        microbatch_size: rows per microbatch, at least 1 (need not divide the batch). Checked here,
            once: a recipe's ``device_train_microbatch_size`` is checked by this constructor alone,
            and the batches it splits are not checked again.

    Attributes:
        microbatch_size: as the argument.

    Raises:
        RecipeError: ``microbatch_size: must be >= 1, got 0`` (a :class:`ValueError`).
    """

    def __init__(self, microbatch_size: int):
        AT_LEAST_ONE.check(microbatch_size, "microbatch_size")
        self.microbatch_size = microbatch_size
        self._pending: Optional[tuple[Encode, CachedEncoding]] = None

    def encode(self, encode: Encode, batch: Any) -> tuple[Optional[Tensor], ...]:
        """Pass 1 (:func:`encode_without_graph`) of a batch of more than ``microbatch_size`` rows,
        kept for :meth:`backward`; a batch of one microbatch is encoded at once, with its graph.

        Returns:
            The outputs of the whole batch (see :class:`CachedEncoding`).

        Raises:
            RuntimeError: if the previous split batch's second pass never ran.
        """
        rows = _rows(batch)
        if rows <= self.microbatch_size:
            return _as_tuple(encode(batch))
        if self._pending is not None:
            raise RuntimeError(
                "the gradient cache's second pass did not run after the previous batch's backward: call "
                "backward() after the loss's backward (a ContrastiveComposerModel's backward_cached(); Composer: "
                "add the GradientCache algorithm)"
            )
        cache = encode_without_graph(encode, _split(batch, _sizes(rows, self.microbatch_size)))
        self._pending = (encode, cache)
        return cache.outputs

    def backward(self) -> bool:
        """Pass 2 (:func:`backward_through_encoder`) of the latest batch :meth:`encode` split, after
        the loss's backward: the gradients the loss left on its outputs go into the encoder.

        Returns:
            True if a second pass ran, False if no split batch was waiting for one.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return False
        backward_through_encoder(*pending)
        return True


def gradient_cached_backward(
    encode: Encode,
    batch: Any,
    microbatch_size: int,
    loss_fn: Callable[..., Any],
    no_sync: Optional[Callable[[], ContextManager]] = None,
) -> Any:
    """One exact gradient-cached backward: both passes and the loss in between.

    Args:
        encode: microbatch -> tuple of outputs (see :func:`encode_without_graph`).
        batch: the whole (per-process) batch; split with :func:`split_batch`.
        microbatch_size: rows per microbatch (need not divide the batch).
        loss_fn: called once as ``loss_fn(*outputs)`` on the whole batch's outputs (leaves, see
            :class:`CachedEncoding`); returns a 0-d loss tensor or a dict with a ``"loss"`` entry
            (e.g. a :class:`~amortize.losses.ContrastiveLoss` wrapped in a lambda).
        no_sync: passed to :func:`backward_through_encoder` (``ddp_model.no_sync`` under DDP).

    Returns:
        What ``loss_fn`` returned (its loss already backpropagated into the encoder's ``.grad``).
    """
    cache = encode_without_graph(encode, split_batch(batch, microbatch_size))
    result = loss_fn(*cache.outputs)
    loss = result["loss"] if isinstance(result, dict) else result
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError("loss_fn must return a 0-d loss tensor or a dict whose 'loss' entry is one")
    loss.backward()
    backward_through_encoder(encode, cache, no_sync=no_sync)
    return result
