"""Score-block kernels with custom backwards: the math every objective is made of.

A kernel works on a *rectangular* problem, rows ``x`` (R, d) against columns ``y`` (M, d), where
the positive of row ``i`` is column ``i + offset`` (out of range: no positive in this block). It
streams over row chunks, holding at most a ``(chunk_size, M)`` block of scores, and its backward
recomputes each chunk; with ``chunk_size=None`` it runs on one chunk and keeps the score matrix
between forward and backward, which makes dense the same code with one chunk.

* :func:`score_stats`: row and column logsumexps of the weighted scores (no gradient); they are
  the in-batch log partition sums, and InfoNCE's normalisers.
* :func:`exp_sums`: row and column sums of ``w_ij exp(S_ij - a_i)`` and ``w_ij exp(S_ij - b_j)`` for
  constant ``a``, ``b``, with exact gradients. Given normalisers the linearised objective is such
  a sum (spec section 2), and InfoNCE's gradient is one with ``a`` its own logsumexp.
* :func:`sigmoid_pair_sum`: SigLIP's pairwise sum.
* :func:`positive_term`: ``-2 s mean_i <x_i, y_i>``.
* :func:`positive_scores`: the positives' scores ``S_ii = s <x_i, y_i> + b`` (no gradient).

Kernels know no objective and no process: :mod:`amortize.comm` hands them column blocks and
:mod:`amortize.objectives` combines them. Computation is float32 (float64 inputs stay float64).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from amortize.checks import as_float32 as _f32
from amortize.checks import scalar_tensor as _as_tensor

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "bounds",
    "score_stats",
    "exp_sums",
    "sigmoid_pair_sum",
    "positive_term",
    "positive_scores",
]

Scalar = Union[float, Tensor]

DEFAULT_CHUNK_SIZE = 256
"""Rows per chunk that recipes use when they turn chunking on (see ``docs/benchmarks.md``).

Measured on the CPU benchmark (linearized objective, B = 16384, d = 512, fp32): chunks of 256 /
1024 / 4096 rows took 7.1 / 8.6 / 8.2 s against 8.7 s dense, with peak memory 234 / 463 / 1435 MiB
against 4202 MiB dense; 256 is the fastest and the only one under 0.1x of dense memory."""


# --------------------------------------------------------------------------------------------
# helpers


def bounds(rows: int, chunk_size: Optional[int]) -> list[tuple[int, int]]:
    """Row ranges ``[(i0, i1), ...]`` of the chunks (one range for ``chunk_size=None``)."""
    step = rows if chunk_size is None else max(1, min(int(chunk_size), rows))
    return [(i, min(i + step, rows)) for i in range(0, rows, step)]


def _add_on_positives(block: Tensor, i0: int, offset: int, value: float) -> None:
    """Add ``value`` in place at the positives of a row block: (i, i0 + i + offset)."""
    if value == 0.0:
        return
    rows = torch.arange(block.shape[0], device=block.device)
    cols = rows + (i0 + offset)
    valid = (cols >= 0) & (cols < block.shape[1])
    if bool(valid.all()):
        block[rows, cols] += value
    else:
        block[rows[valid], cols[valid]] += value


def _block_scores(x: Tensor, y: Tensor, s: Tensor, b: Optional[Tensor]) -> Tensor:
    out = x @ y.T
    out.mul_(s)
    if b is not None:
        out.add_(b)
    return out


# --------------------------------------------------------------------------------------------
# streaming statistics


@torch.no_grad()
def score_stats(
    x: Tensor,
    y: Tensor,
    scale: Scalar,
    bias: Scalar = 0.0,
    log_pos_weight: float = 0.0,
    log_neg_weight: float = 0.0,
    offset: int = 0,
    chunk_size: Optional[int] = None,
    keep_scores: bool = False,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Row and column logsumexps of the weighted scores, streamed over row chunks, without gradient.

    With weighted scores ``S'_ij = S_ij + log w_ij`` (``log w = log_pos_weight`` at the positives
    ``(i, i + offset)`` and ``log_neg_weight`` elsewhere), returns ``logsumexp_j S'_ij`` for every
    row and ``logsumexp_i S'_ij`` for every column (over the rows given: a partial sum when ``x``
    holds only some of the rows).

    Args:
        x: (R, d) row features.
        y: (M, d) column features.
        scale: inverse temperature ``s``.
        bias: logit bias ``b``.
        log_pos_weight: log of the positive's weight (``log c``; ``-inf`` drops it).
        log_neg_weight: log of the weight of every negative.
        offset: column of row 0's positive.
        chunk_size: rows per chunk, or None for one chunk.
        keep_scores: with a single chunk, also return the (R, M) weighted scores (for reuse by a
            backward pass); ignored (None returned) when several chunks are used.

    Returns:
        ``(row_lse (R,), col_lse (M,), scores or None)``.
    """
    xf, yf = _f32(x.detach()), _f32(y.detach())
    s = _as_tensor(scale.detach() if isinstance(scale, Tensor) else scale, xf)
    b = None
    if isinstance(bias, Tensor) or bias != 0.0 or log_neg_weight != 0.0:
        b = _as_tensor(bias.detach() if isinstance(bias, Tensor) else bias, xf) + log_neg_weight
    pos_shift = log_pos_weight - log_neg_weight
    ranges = bounds(xf.shape[0], chunk_size)
    row_lse = torch.empty(xf.shape[0], dtype=xf.dtype, device=xf.device)
    col_lse: Optional[Tensor] = None
    kept = None
    for i0, i1 in ranges:
        Sc = _block_scores(xf[i0:i1], yf, s, b)
        _add_on_positives(Sc, i0, offset, pos_shift)
        row_lse[i0:i1] = torch.logsumexp(Sc, dim=1)
        c = torch.logsumexp(Sc, dim=0)
        col_lse = c if col_lse is None else torch.logaddexp(col_lse, c)
        if keep_scores and len(ranges) == 1:
            kept = Sc
    assert col_lse is not None
    return row_lse, col_lse, kept


# --------------------------------------------------------------------------------------------
# exp-sum kernel (linearized objective and InfoNCE)


def _backprop_score_block(
    G: Tensor, xf: Tensor, yf: Tensor, i0: int, i1: int, s: Tensor,
    gx: Optional[Tensor], gy: Optional[Tensor], need_s: bool, need_b: bool,
) -> tuple[Union[Tensor, float], Union[Tensor, float]]:
    """Backpropagate ``dL/dS = G`` of the score block ``S = s * x[i0:i1] @ y.T + b``.

    Writes ``gx[i0:i1]`` (rows of this block) and adds into ``gy`` (all columns) in place.

    Returns:
        This block's contributions to ``dL/ds`` and ``dL/db`` (0.0 when not needed).
    """
    d_s: Union[Tensor, float] = 0.0
    d_b: Union[Tensor, float] = 0.0
    if gx is not None:
        gxy = G @ yf
        if need_s:
            d_s = (xf[i0:i1] * gxy).sum()
        gx[i0:i1] = gxy.mul_(s)
    if gy is not None:
        gy.addmm_(G.T, xf[i0:i1], alpha=float(s))
    if need_b:
        d_b = G.sum()
    return d_s, d_b


def _input_grads(ctx, x, y, scale, bias, gx, gy, gs, gb) -> tuple:
    """The gradients of a score kernel's ``(x, y, scale, bias)``, in their dtypes, None where not needed."""
    need_x, need_y, need_s, need_b = ctx.needs_input_grad[:4]
    return (
        gx.to(x.dtype) if need_x and gx is not None else None,
        gy.to(y.dtype) if need_y else None,
        gs.to(scale.dtype) if need_s else None,
        gb.to(bias.dtype) if need_b else None,
    )


class _ExpSums(torch.autograd.Function):
    """``row[i] = sum_j w_ij exp(S_ij - a_i)``, ``col[j] = sum_i w_ij exp(S_ij - b_j)``."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, a, b, row_lse, col_lse, scores, log_pos, log_neg, offset, chunk_size):
        ctx.save_for_backward(x, y, scale, bias, a, b, scores)
        ctx.log_pos, ctx.log_neg, ctx.offset, ctx.chunk_size = log_pos, log_neg, offset, chunk_size
        return torch.exp(row_lse - a), torch.exp(col_lse - b)

    @staticmethod
    def backward(ctx, g_row, g_col):
        x, y, scale, bias, a, b, scores = ctx.saved_tensors
        need_x, need_y, need_s, need_b = ctx.needs_input_grad[:4]
        xf, yf = _f32(x), _f32(y)
        s = scale.to(xf.dtype)
        shift = bias.to(xf.dtype) + ctx.log_neg
        pos_shift = ctx.log_pos - ctx.log_neg
        g_row = g_row.to(xf.dtype) if g_row is not None else None
        g_col = g_col.to(xf.dtype) if g_col is not None else None
        gx = torch.empty_like(xf) if (need_x or need_s) else None
        gy = torch.zeros_like(yf) if need_y else None
        gs = torch.zeros((), dtype=xf.dtype, device=xf.device)
        gb = torch.zeros((), dtype=xf.dtype, device=xf.device)
        for i0, i1 in bounds(xf.shape[0], ctx.chunk_size):
            if scores is not None:
                Sc = scores[i0:i1]
            else:
                Sc = _block_scores(xf[i0:i1], yf, s, shift)
                _add_on_positives(Sc, i0, ctx.offset, pos_shift)
            G = None
            if g_row is not None:
                G = torch.exp(Sc - a[i0:i1, None])
                G.mul_(g_row[i0:i1, None])
            if g_col is not None:
                E = torch.exp(Sc - b[None, :])
                E.mul_(g_col[None, :])
                G = E if G is None else G.add_(E)
            if G is None:
                continue
            d_s, d_b = _backprop_score_block(G, xf, yf, i0, i1, s, gx, gy, need_s, need_b)
            gs += d_s
            gb += d_b
        return _input_grads(ctx, x, y, scale, bias, gx, gy, gs, gb) + (None,) * 9


def exp_sums(
    x: Tensor,
    y: Tensor,
    scale: Scalar,
    bias: Scalar,
    a: Tensor,
    b: Tensor,
    log_pos_weight: float = 0.0,
    log_neg_weight: float = 0.0,
    offset: int = 0,
    chunk_size: Optional[int] = None,
    stats: Optional[tuple[Tensor, Tensor, Optional[Tensor]]] = None,
) -> tuple[Tensor, Tensor]:
    """Row and column sums of ``w_ij exp(S_ij - a_i)`` and ``w_ij exp(S_ij - b_j)``, with gradients.

    ``S_ij = scale * <x_i, y_j> + bias``; ``log w_ij`` is ``log_pos_weight`` at ``(i, i + offset)``
    and ``log_neg_weight`` elsewhere. ``a`` and ``b`` are constants (no gradient). Gradients flow
    to ``x``, ``y``, ``scale`` and ``bias`` through a backward that recomputes the scores chunk by
    chunk (or reuses the kept dense scores of ``stats``).

    Args:
        x: (R, d) row features.
        y: (M, d) column features.
        scale: inverse temperature (float or 0-d tensor).
        bias: logit bias (float or 0-d tensor).
        a: (R,) row log normalisers.
        b: (M,) column log normalisers.
        log_pos_weight: ``log c``.
        log_neg_weight: log weight of the negatives (0 except in the local distributed mode).
        offset: column of row 0's positive.
        chunk_size: rows per chunk, or None (one chunk, scores kept between forward and backward).
        stats: the output of :func:`score_stats` for the same arguments, if already computed.

    Returns:
        ``(row_sums (R,), col_sums (M,))`` in float32 (float64 for float64 inputs).
    """
    xf = _f32(x)
    if stats is None:
        stats = score_stats(
            x, y, scale, bias, log_pos_weight, log_neg_weight, offset, chunk_size, keep_scores=chunk_size is None
        )
    row_lse, col_lse, kept = stats
    if chunk_size is not None:
        kept = None
    s_t = scale if isinstance(scale, Tensor) else _as_tensor(scale, xf)
    b_t = bias if isinstance(bias, Tensor) else _as_tensor(bias, xf)
    return _ExpSums.apply(
        x,
        y,
        s_t.reshape(()),
        b_t.reshape(()),
        a.detach().to(xf.dtype),
        b.detach().to(xf.dtype),
        row_lse,
        col_lse,
        kept,
        float(log_pos_weight),
        float(log_neg_weight),
        int(offset),
        chunk_size,
    )


# --------------------------------------------------------------------------------------------
# sigmoid kernel


class _SigmoidPairSum(torch.autograd.Function):
    """``sum_ij u_ij * -log sigmoid(z_ij S_ij)`` (z = +1 at positives, u = 1 there, neg_weight elsewhere)."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, neg_weight, offset, chunk_size):
        xf, yf = _f32(x), _f32(y)
        s, b = scale.to(xf.dtype), bias.to(xf.dtype)
        total = torch.zeros((), dtype=xf.dtype, device=xf.device)
        for i0, i1 in bounds(xf.shape[0], chunk_size):
            Sc = _block_scores(xf[i0:i1], yf, s, b)
            rows = torch.arange(i1 - i0, device=xf.device)
            cols = rows + (i0 + offset)
            valid = (cols >= 0) & (cols < yf.shape[0])
            r, c = rows[valid], cols[valid]
            pos = Sc[r, c].clone()
            # -log sigmoid(-S) = softplus(S) on negatives, -log sigmoid(S) = softplus(-S) on positives:
            # mask the positives out (softplus(-inf) = 0) rather than subtract them, which cancels
            Sc[r, c] = -math.inf
            neg = torch.nn.functional.softplus(Sc).sum()
            total += (neg if neg_weight == 1.0 else neg_weight * neg) + torch.nn.functional.softplus(-pos).sum()
        ctx.save_for_backward(x, y, scale, bias)
        ctx.neg_weight, ctx.offset, ctx.chunk_size = neg_weight, offset, chunk_size
        return total

    @staticmethod
    def backward(ctx, g):
        x, y, scale, bias = ctx.saved_tensors
        need_x, need_y, need_s, need_b = ctx.needs_input_grad[:4]
        xf, yf = _f32(x), _f32(y)
        s, b = scale.to(xf.dtype), bias.to(xf.dtype)
        g = g.to(xf.dtype)
        gx = torch.empty_like(xf) if (need_x or need_s) else None
        gy = torch.zeros_like(yf) if need_y else None
        gs = torch.zeros((), dtype=xf.dtype, device=xf.device)
        gb = torch.zeros((), dtype=xf.dtype, device=xf.device)
        for i0, i1 in bounds(xf.shape[0], ctx.chunk_size):
            G = _block_scores(xf[i0:i1], yf, s, b)
            rows = torch.arange(i1 - i0, device=xf.device)
            cols = rows + (i0 + ctx.offset)
            valid = (cols >= 0) & (cols < yf.shape[0])
            rows, cols = rows[valid], cols[valid]
            pos = G[rows, cols].clone()
            # d/dS: neg_weight * sigmoid(S) on negatives, sigmoid(S) - 1 on positives
            G.sigmoid_()
            if ctx.neg_weight != 1.0:
                G.mul_(ctx.neg_weight)
            G[rows, cols] = torch.sigmoid(pos) - 1.0
            G.mul_(g)
            d_s, d_b = _backprop_score_block(G, xf, yf, i0, i1, s, gx, gy, need_s, need_b)
            gs += d_s
            gb += d_b
        return _input_grads(ctx, x, y, scale, bias, gx, gy, gs, gb) + (None,) * 3


def sigmoid_pair_sum(
    x: Tensor,
    y: Tensor,
    scale: Scalar,
    bias: Scalar,
    offset: int = 0,
    chunk_size: Optional[int] = None,
    neg_weight: float = 1.0,
) -> Tensor:
    """``sum_ij u_ij * -log sigmoid(z_ij * S_ij)`` over rows ``x`` and columns ``y``, with gradients.

    ``z_ij = 1`` and ``u_ij = 1`` at the positives ``(i, i + offset)``; ``z_ij = -1`` and
    ``u_ij = neg_weight`` elsewhere. The (R, M) matrix is never held: forward and backward stream
    over row chunks.

    Args:
        x: (R, d) row features.
        y: (M, d) column features.
        scale: inverse temperature.
        bias: logit bias.
        offset: column of row 0's positive.
        chunk_size: rows per chunk, or None for one chunk.
        neg_weight: weight of every negative pair.

    Returns:
        0-d sum (not divided by anything).
    """
    xf = _f32(x)
    s_t = scale if isinstance(scale, Tensor) else _as_tensor(scale, xf)
    b_t = bias if isinstance(bias, Tensor) else _as_tensor(bias, xf)
    return _SigmoidPairSum.apply(x, y, s_t.reshape(()), b_t.reshape(()), float(neg_weight), int(offset), chunk_size)


def positive_term(x: Tensor, y: Tensor, scale: Scalar) -> Tensor:
    """``-2 * scale * mean_i <x_i, y_i>`` with autograd (rows of ``x`` and ``y`` paired).

    Args:
        x: (R, d) rows.
        y: (R, d) their positives.
        scale: inverse temperature.

    Returns:
        0-d tensor.
    """
    xf, yf = _f32(x), _f32(y)
    s = scale if isinstance(scale, Tensor) else _as_tensor(scale, xf)
    return -2.0 * s.reshape(()).to(xf.dtype) * (xf * yf).sum(dim=1).mean()


@torch.no_grad()
def positive_scores(x: Tensor, y: Tensor, scale: Scalar, bias: Optional[Scalar] = None) -> Tensor:
    """The positives' scores ``S_ii = s <x_i, y_i> + b``, detached (rows of ``x`` and ``y`` paired).

    Args:
        x: (R, d) rows.
        y: (R, d) their positives.
        scale: inverse temperature ``s``.
        bias: logit bias ``b``, or None.

    Returns:
        (R,) float32 scores (float64 for float64 inputs).
    """
    xf, yf = _f32(x.detach()), _f32(y.detach())
    s = _as_tensor(scale.detach() if isinstance(scale, Tensor) else scale, xf).reshape(())
    out = s * (xf * yf).sum(dim=1)
    if bias is not None:
        out = out + _as_tensor(bias.detach() if isinstance(bias, Tensor) else bias, xf).reshape(())
    return out
