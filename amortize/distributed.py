"""How negatives travel between processes: ``ContrastiveLoss(distributed="gather" | "ring" | "local")``.

Every process holds ``B`` local pairs (rows ``x`` images, ``y`` texts); the global batch has
``N = W * B`` pairs (``W`` processes, equal ``B`` on every process). The loss each process
returns is the loss of its LOCAL ROWS against the columns it uses, normalised so that the mean
over processes equals the single-process loss on the global batch; DDP averages gradients over
processes, and every collective that carries features with gradient sums the column gradients of
all processes in its backward, so the averaged gradient equals the gradient of the single-process
loss on the global batch (exact modes) or an unbiased estimate of it (local mode, for fixed
normalisers).

Modes, and what one process sends per step (``d`` the embedding width, floats of the feature dtype):

``gather`` (exact)
    All-gather the text features WITH gradient (``(W - 1) * B * d`` received); one
    ``(B, N)`` score matrix (local images against all texts) gives both objective sides (the text
    side of a column is split over processes by rows, and the column normalisers are global).
    Backward: one all-reduce of the ``(N, d)`` column gradient, of which each process keeps its
    slice (gloo has no reduce-scatter). Estimators that read features (all but in-batch) also get
    the image features all-gathered without gradient (``(W - 1) * B * d``).
``ring`` (exact)
    The text features travel around the ring in ``W - 1`` neighbour exchanges of ``B * d`` (each
    process talks only to rank +/- 1); the score blocks are ``(B, B)`` and the gradients of each
    block travel back along the ring in the backward pass (``W - 1`` exchanges of ``B * d``).
    Same totals as ``gather``, no all-to-all traffic, never an ``(N, d)`` tensor with gradient.
``local`` (amortized and sigmoid only; no communication at all)
    Negatives are the local batch. The partition sums the normalisers estimate are sums over the
    GLOBAL batch, so the ``B - 1`` local negatives are weighted by ``k = (N - 1) / (B - 1)``
    (about ``W``) and the positive keeps its own weight: the local sum is then an unbiased
    estimate of the global one, and for fixed normalisers the expected loss and gradient equal the
    global ones. The authors' code multiplies the local negatives by ``1 / W`` instead (spec
    section 6): a bug we do not copy. Estimator state is NOT synchronised in this mode: each
    process updates its estimator from its own rows (amortizer networks and moving averages drift
    apart across processes; a checkpoint holds rank 0's).

Exact modes also compute the in-batch partition targets of ALL ``N`` global rows and columns with
no gradient: each process computes the row logsumexps of its rows and the partial column
logsumexps over its rows (``N`` floats), all-gathers both (``N + W * N`` floats) and combines them
with logsumexp in the same order on every process. The estimator then sees the global rows (detached
gathered features, targets and ``index``), so every process applies identical state updates, and
each process slices its own rows' normalisers for the loss.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from amortize import chunked as C
from amortize import functional as F

__all__ = [
    "world_size",
    "rank",
    "all_gather_with_grad",
    "all_gather_no_grad",
    "ring_blocks",
    "local_negative_weight",
    "distributed_loss",
    "amortized_forward",
]


def world_size() -> int:
    """Number of processes in the default group (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 when torch.distributed is not initialised)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# --------------------------------------------------------------------------------------------
# collectives


class _AllGatherCat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        W, r = world_size(), rank()
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(W)]
        dist.all_gather(parts, t)
        ctx.rows, ctx.rank = t.shape[0], r
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        g = g.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` from all processes in rank order; the backward SUMS the gradients.

    The gradient a process receives for its own slice is the sum over processes of the gradient
    each computed for that slice (as ``torch.distributed.nn.functional.all_gather``), done with one
    all-reduce so that it works on gloo.

    Args:
        t: (B, ...) local tensor, the same shape on every process.

    Returns:
        (W * B, ...) gathered tensor.
    """
    if world_size() == 1:
        return t
    return _AllGatherCat.apply(t)


@torch.no_grad()
def all_gather_no_grad(t: Tensor) -> Tensor:
    """Concatenate a detached ``t`` (B, ...) from all processes in rank order: (W * B, ...)."""
    if world_size() == 1:
        return t.detach()
    t = t.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts, dim=0)


def _exchange(t: Tensor, to: int, frm: int) -> Tensor:
    out = torch.empty_like(t)
    ops = [dist.P2POp(dist.isend, t.contiguous(), to), dist.P2POp(dist.irecv, out, frm)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


class _NeighbourExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, to: int, frm: int) -> Tensor:
        ctx.to, ctx.frm = to, frm
        return _exchange(t, to, frm)

    @staticmethod
    def backward(ctx, g: Tensor):
        return _exchange(g.contiguous(), ctx.frm, ctx.to), None, None


def ring_blocks(t: Tensor) -> list[tuple[int, Tensor]]:
    """Pass ``t`` around the ring: block k comes from rank ``(rank - k) mod W``, with gradient.

    Each step sends the last block to rank + 1 and receives from rank - 1; the backward sends each
    block's gradient back the way it came, so the owner receives the sum over processes.

    Args:
        t: (B, ...) local tensor.

    Returns:
        ``[(owner, block), ...]`` for k = 0 .. W - 1; block 0 is ``t`` itself.
    """
    W, r = world_size(), rank()
    out = [(r, t)]
    cur = t
    for k in range(1, W):
        cur = _NeighbourExchange.apply(cur, (r + 1) % W, (r - 1) % W)
        out.append(((r - k) % W, cur))
    return out


def local_negative_weight(local_batch: int, world: int) -> float:
    """Weight ``k = (W * B - 1) / (B - 1)`` of each local negative in the ``local`` mode.

    With it the local partition sum ``c exp(S_ii) + k * sum_{j != i local} exp(S_ij)`` is an
    unbiased estimate of the global sum over the ``W * B - 1`` negatives of the global batch
    (a random split of the batch over processes), and about ``W`` times the local negative sum.
    """
    if world == 1:
        return 1.0
    if local_batch < 2:
        raise ValueError("the local distributed mode needs at least 2 pairs per process")
    return (world * local_batch - 1) / (local_batch - 1)


# --------------------------------------------------------------------------------------------
# the loss


def _log(v: float) -> float:
    return math.log(v) if v > 0 else -math.inf


def _columns(y: Tensor, mode: str) -> list[tuple[slice, Tensor, int]]:
    """Column blocks ``[(slot, features, offset)]`` with gradient.

    ``slot`` is where the block's columns sit in the (N,) vector of column normalisers, and
    ``offset`` the column of local row 0's positive inside the block (out of range: none).
    """
    W, r, B = world_size(), rank(), y.shape[0]
    if W == 1 or mode == "local":
        return [(slice(0, B), y, 0)]
    if mode == "gather":
        return [(slice(0, W * B), all_gather_with_grad(y), r * B)]
    return [(slice(o * B, (o + 1) * B), blk, 0 if o == r else B) for o, blk in ring_blocks(y)]


def _stats(x, blocks, scale, bias, log_c, log_neg, chunk_size, N):
    """Per-block score stats, this process's row logsumexps and its (N,) partial column ones."""
    stats, row_parts = [], []
    col_partial = torch.full((N,), -math.inf, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                             device=x.device)
    for slot, blk, offset in blocks:
        st = C.score_stats(x, blk, scale, bias, log_c, log_neg, offset, chunk_size, keep_scores=chunk_size is None)
        stats.append(st)
        row_parts.append(st[0])
        col_partial[slot] = st[1]
    row_lse = row_parts[0] if len(row_parts) == 1 else torch.logsumexp(torch.stack(row_parts), dim=0)
    return stats, row_lse, col_partial


def _global_targets(row_lse: Tensor, col_partial: Tensor) -> tuple[Tensor, Tensor]:
    """All rows' logsumexps and all columns' full logsumexps, identical on every process."""
    if world_size() == 1:
        return row_lse, col_partial
    rows_all = all_gather_no_grad(row_lse)
    cols_all = torch.logsumexp(all_gather_no_grad(col_partial[None]), dim=0)
    return rows_all, cols_all


def _check(x: Tensor, y: Tensor, scale: Tensor, bias) -> None:
    F._check_features(x, y, ("image_features", "text_features"))
    F._check_scalar("logit_scale", scale, positive=True)
    F._check_scalar("logit_bias", bias)


def amortized_forward(loss_module, x: Tensor, y: Tensor, logit_scale: Tensor, bias, index: Optional[Tensor]):
    """The amortized objective of :class:`~amortize.losses.ContrastiveLoss` on one or several processes.

    One implementation serves the single-process case (``W = 1``: the score statistics computed
    for the partition targets are reused by the objective, so a dense step costs three (B, B, d)
    matmuls) and the three distributed modes.

    Args:
        loss_module: the :class:`~amortize.losses.ContrastiveLoss` (its ``estimator``,
            ``pos_weight``, ``chunk_size`` and ``distributed`` are read).
        x: (B, d) local image features.
        y: (B, d) local text features.
        logit_scale: 0-d inverse temperature.
        bias: logit bias (float or 0-d tensor).
        index: (B,) dataset indices or None.

    Returns:
        ``(loss, terms)``: the 0-d loss of this process's rows and a dict of detached terms.
    """
    _check(x, y, logit_scale, bias)
    W, r, B = world_size(), rank(), x.shape[0]
    mode = loss_module.distributed if W > 1 else "gather"
    chunk = loss_module.chunk_size
    log_c = _log(loss_module.pos_weight)
    F._check_pos_weight(loss_module.pos_weight, B if mode == "local" else W * B)
    log_neg = 0.0
    if mode == "local":
        k = local_negative_weight(B, W)
        log_neg = math.log(k)
    blocks = _columns(y, mode)
    N = B if mode == "local" else W * B
    with torch.no_grad():
        stats, row_lse, col_partial = _stats(x, blocks, logit_scale, bias, log_c, log_neg, chunk, N)
        if mode == "local":
            lzx, lzy = row_lse, col_partial
            xs, ys, idx = x.detach(), y.detach(), index
        else:
            lzx, lzy = _global_targets(row_lse, col_partial)
            if loss_module.estimator.reads_features:
                xs = all_gather_no_grad(x)
                ys = blocks[0][1].detach() if mode == "gather" else all_gather_no_grad(y)
            else:
                xs, ys = _placeholder(x, N), _placeholder(y, N)
            idx = None if index is None else all_gather_no_grad(index)
    est = loss_module.estimator(xs, ys, lzx, lzy, idx)
    lo = 0 if mode == "local" else r * B
    lnx = est.log_norm_x[lo : lo + B]
    lny = est.log_norm_y
    image = text = None
    for (slot, blk, offset), st in zip(blocks, stats):
        rows, cols = C.exp_sums(x, blk, logit_scale, bias, lnx, lny[slot], log_c, log_neg, offset, chunk, st)
        image = rows.sum() if image is None else image + rows.sum()
        text = cols.sum() if text is None else text + cols.sum()
    parts = {"positive": C._positive(x, y, logit_scale), "image": image / B, "text": text / B}
    loss = parts["positive"] + parts["image"] + parts["text"]
    terms = {k: v.detach() for k, v in parts.items()}
    terms.update(est.terms)
    return loss, terms


def _placeholder(t: Tensor, n: int) -> Tensor:
    """A zero-stride (n, d) stand-in for features an estimator does not read (no communication)."""
    return t.detach()[:1].expand(n, t.shape[1])


def _infonce_forward(loss_module, x, y, logit_scale):
    _check(x, y, logit_scale, 0.0)
    W, r, B = world_size(), rank(), x.shape[0]
    N, chunk = W * B, loss_module.chunk_size
    blocks = _columns(y, loss_module.distributed)
    with torch.no_grad():
        stats, row_lse, col_partial = _stats(x, blocks, logit_scale, 0.0, 0.0, 0.0, chunk, N)
        _, col_lse = _global_targets(row_lse, col_partial)
    surrogate = None
    for (slot, blk, offset), st in zip(blocks, stats):
        rows, cols = C.exp_sums(x, blk, logit_scale, 0.0, row_lse, col_lse[slot], 0.0, 0.0, offset, chunk, st)
        part = rows.sum() + cols.sum()
        surrogate = part if surrogate is None else surrogate + part
    surrogate = 0.5 * surrogate / B
    value = 0.5 * (row_lse.sum() + col_lse[r * B : (r + 1) * B].sum()) / B
    return value + (surrogate - surrogate.detach()) + 0.5 * C._positive(x, y, logit_scale)


def _sigmoid_forward(loss_module, x, y, logit_scale, logit_bias):
    if logit_bias is None:
        raise ValueError("the sigmoid objective needs logit_bias")
    _check(x, y, logit_scale, logit_bias)
    W, B = world_size(), x.shape[0]
    mode = loss_module.distributed
    k = local_negative_weight(B, W) if mode == "local" else 1.0
    total = None
    for _, blk, offset in _columns(y, mode):
        part = C.sigmoid_pair_sum(x, blk, logit_scale, logit_bias, offset, loss_module.chunk_size, neg_weight=k)
        total = part if total is None else total + part
    return total / B


def distributed_loss(
    loss_module,
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Optional[Tensor] = None,
    index: Optional[Tensor] = None,
) -> dict[str, Tensor]:
    """Multi-process forward of :class:`amortize.losses.ContrastiveLoss` (see the module docstring).

    Args:
        loss_module: the :class:`~amortize.losses.ContrastiveLoss`.
        image_features: (B, d) this process's image features.
        text_features: (B, d) this process's text features.
        logit_scale: 0-d inverse temperature (identical on every process).
        logit_bias: 0-d logit bias or None.
        index: (B,) dataset indices of this process's pairs, or None.

    Returns:
        The same dict as the single-process forward; ``loss`` is this process's share (the mean
        over processes equals the global single-process loss), the estimator diagnostics are
        global.
    """
    obj = loss_module.objective
    mode = loss_module.distributed
    if obj == "infonce":
        if mode == "local":
            raise ValueError("the infonce objective has no local mode; use 'gather' or 'ring'")
        loss, terms = _infonce_forward(loss_module, image_features, text_features, logit_scale), {}
    elif obj == "sigmoid":
        loss = _sigmoid_forward(loss_module, image_features, text_features, logit_scale, logit_bias)
        terms = {"logit_bias": logit_bias.detach()}
    else:
        bias = 0.0 if logit_bias is None else logit_bias
        loss, terms = amortized_forward(loss_module, image_features, text_features, logit_scale, bias, index)
    return loss_module._finish(loss, logit_scale, terms)
