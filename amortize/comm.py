"""Collectives and process layouts: how the columns of the global batch reach each process.

A layout (``ContrastiveLoss(layout="gather" | "ring" | "local")``) knows no loss: it yields the
column blocks a process scores its rows against, with their offsets, the weight of local negatives
that the ``local`` layout needs, and the global combination of partition sums.

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
``local`` (objectives whose loss is a sum of pair terms: linearized, sigmoid; no communication)
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

from dataclasses import dataclass
from typing import Union

import torch
import torch.distributed as dist
from torch import Tensor

from amortize.registry import Registry

__all__ = [
    "world_size",
    "rank",
    "all_gather_with_grad",
    "all_gather_no_grad",
    "ring_blocks",
    "local_negative_weight",
    "Block",
    "Layout",
    "ThisProcess",
    "Gather",
    "Ring",
    "Local",
    "LAYOUTS",
    "build_layout",
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
# layouts


@dataclass(frozen=True)
class Block:
    """A block of columns a process scores its rows against.

    Attributes:
        slot: where the block's columns sit in the vector of all the layout's columns.
        features: (M, d) column features, with gradient.
        offset: the column (inside the block) of local row 0's positive; out of range: none here.
    """

    slot: slice
    features: Tensor
    offset: int

    def positive_mask(self, rows: int) -> Tensor:
        """(rows, M) bool: True at ``(i, i + offset)``, the positive of local row ``i`` if it is in this block.

        For objectives written in plain torch over the blocks: the positives to exclude from (or
        pick out of) a ``(rows, M)`` score matrix of the local rows against this block.
        """
        dev = self.features.device
        cols = torch.arange(self.features.shape[0], device=dev)
        return cols[None, :] == torch.arange(rows, device=dev)[:, None] + self.offset


class Layout:
    """How the columns of the global batch reach this process (subclasses: one per mode).

    Attributes:
        name: the registered name.
        exact: whether every process sees all ``N`` global columns (``gather``, ``ring``).
        guarantee: what the loss of a sum of pair terms is under this layout: ``exact`` (equal to
            the single-process loss on the global batch) or ``unbiased`` (its expectation is, for
            fixed normalisers). An objective states which it needs (``Objective.needs``); a new
            layout declares this and touches no objective.
    """

    name = "this_process"
    exact = True
    guarantee = "exact"

    def world(self) -> int:
        """The number of processes the layout spans."""
        return world_size()

    def columns(self, y: Tensor) -> list[Block]:
        """The column blocks for local columns ``y`` (B, d), with gradient.

        Any per-pair local tensor can be laid out so: an objective whose text side needs every
        image passes the image features (see the custom-components tutorial).
        """
        return [Block(slice(0, y.shape[0]), y, 0)]

    def num_columns(self, batch: int) -> int:
        """How many columns the blocks hold in all, for ``batch`` local pairs."""
        return batch * self.world() if self.exact else batch

    def row_offset(self, batch: int) -> int:
        """Where this process's rows sit among the rows its estimator sees."""
        return rank() * batch if self.exact and self.world() > 1 else 0

    def negative_weight(self, batch: int) -> float:
        """Weight of each negative in partition sums (1 except in the ``local`` layout)."""
        return 1.0

    def all_rows(self, t: Tensor) -> Tensor:
        """The rows of every process, detached: (W * B, ...) in exact layouts, ``t`` otherwise."""
        return all_gather_no_grad(t) if self.exact and self.world() > 1 else t.detach()

    def all_columns(self, blocks: list[Block], y: Tensor) -> Tensor:
        """Every column's features as an estimator reads them: detached, in the estimator's row order.

        Args:
            blocks: what :meth:`columns` returned for ``y``.
            y: (B, d) this process's column features.

        Returns:
            (W * B, d) in exact layouts, (B, d) otherwise. A layout whose blocks already hold every
            column in order returns them (no second exchange); the others gather ``y``.
        """
        return self.all_rows(y)

    def combine(self, row_lse: Tensor, col_partial: Tensor) -> tuple[Tensor, Tensor]:
        """All rows' logsumexps and all columns' full logsumexps, identical on every process.

        Args:
            row_lse: (B,) logsumexps of this process's rows over the columns it saw.
            col_partial: (N,) logsumexps of every column over this process's rows.
        """
        if not self.exact or self.world() == 1:
            return row_lse, col_partial
        rows_all = all_gather_no_grad(row_lse)
        cols_all = torch.logsumexp(all_gather_no_grad(col_partial[None]), dim=0)
        return rows_all, cols_all


class ThisProcess(Layout):
    """This process's batch alone, whatever ``torch.distributed`` says (the functional face)."""

    name = "this_process"
    exact = True

    def world(self) -> int:
        """Always 1."""
        return 1


class Gather(Layout):
    """``gather``: all-gather the text features with gradient; one (B, N) block (exact)."""

    name = "gather"
    exact = True

    def columns(self, y: Tensor) -> list[Block]:
        """One block of all ``N`` columns; local row 0's positive at ``rank * B``."""
        B = y.shape[0]
        if self.world() == 1:
            return [Block(slice(0, B), y, 0)]
        return [Block(slice(0, self.world() * B), all_gather_with_grad(y), rank() * B)]

    def all_columns(self, blocks: list[Block], y: Tensor) -> Tensor:
        """The one block already holds all ``N`` columns in order: detached, no second exchange."""
        return blocks[0].features.detach()


class Ring(Layout):
    """``ring``: the text features travel around the ring in ``W - 1`` exchanges (exact)."""

    name = "ring"
    exact = True

    def columns(self, y: Tensor) -> list[Block]:
        """``W`` blocks of ``B`` columns, the own block (positives on its diagonal) first."""
        B, r = y.shape[0], rank()
        if self.world() == 1:
            return [Block(slice(0, B), y, 0)]
        return [Block(slice(o * B, (o + 1) * B), blk, 0 if o == r else B) for o, blk in ring_blocks(y)]


class Local(Layout):
    """``local``: negatives are the local batch, weighted by ``k = (N - 1) / (B - 1)`` (unbiased)."""

    name = "local"
    exact = False
    guarantee = "unbiased"

    def negative_weight(self, batch: int) -> float:
        """:func:`local_negative_weight` of this process count."""
        return local_negative_weight(batch, self.world())


LAYOUTS: Registry[Layout] = Registry("layout")
"""Process layouts by name: ``gather``, ``ring``, ``local``."""
for _cls in (Gather, Ring, Local):
    LAYOUTS.register(_cls.name, _cls)


def build_layout(spec: Union[str, Layout, None]) -> Layout:
    """A layout from its name or itself; None is :class:`ThisProcess`."""
    if spec is None:
        return ThisProcess()
    if isinstance(spec, Layout):
        return spec
    return LAYOUTS.build(spec)
