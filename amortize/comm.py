"""Collectives and process layouts: how the columns of the global batch reach each process.

A layout (``ContrastiveLoss(layout="gather" | "ring" | "local")``) knows no loss: it yields the
column blocks a process scores its rows against, with their offsets, the weight of local negatives
that the ``local`` layout needs, the global combination of partition sums, and what an estimator
reads (:meth:`Layout.all_rows`, :meth:`Layout.all_columns`).

Every layout is built with its :class:`Topology`: the world size, this process's rank, the
process group and an :class:`Exchanger` that runs the collectives. The default topology
(``Topology()``, what ``layout="gather"`` builds) is lazy: it reads the world size and the rank from
its group (the default one) each time a layout asks, through :class:`TorchDistributed`, so a loss
built before the process group exists (Composer's trainer initialises it after the recipe's loss is
built) spans the group once it does, and is one process while there is none. An explicit
``Topology(world_size=W, rank=r)`` is fixed; ``Topology(1, 0)`` (:data:`ONE_PROCESS`) is this
process's batch alone whatever ``torch.distributed`` says: ``Gather(ONE_PROCESS)`` is the
one-process layout of the functional face. :class:`InProcessWorld` runs ``W`` ranks as threads of
one process with an exchanger of its own, so a layout is testable without process groups.

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

import threading
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, TypeVar, Union

import torch
import torch.distributed as dist
from torch import Tensor

from amortize.registry import Registry

__all__ = [
    "Exchanger",
    "TorchDistributed",
    "Topology",
    "ONE_PROCESS",
    "DEFAULT_TOPOLOGY",
    "InProcessWorld",
    "world_size",
    "rank",
    "all_gather_with_grad",
    "all_gather_no_grad",
    "ring_blocks",
    "local_negative_weight",
    "Block",
    "Layout",
    "Gather",
    "Ring",
    "Local",
    "LAYOUTS",
    "build_layout",
]

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# topology: who the processes are and how they talk


class Exchanger:
    """The collectives a :class:`Topology` runs, without gradients (an interface).

    The gradients of :func:`all_gather_with_grad` and :func:`ring_blocks` are written once on top
    of these three operations, so an exchanger only moves tensors. Every process calls the same
    operations in the same order, as with ``torch.distributed``.
    """

    def world_size(self) -> int:
        """The number of processes this exchanger spans."""
        raise NotImplementedError

    def rank(self) -> int:
        """This process's rank among them."""
        raise NotImplementedError

    def all_gather(self, t: Tensor) -> list[Tensor]:
        """Every process's ``t`` (the same shape everywhere), in rank order: ``W`` new tensors."""
        raise NotImplementedError

    def all_reduce(self, t: Tensor) -> Tensor:
        """The sum over processes of ``t``, identical on every process (a new tensor; ``t`` is kept)."""
        raise NotImplementedError

    def exchange(self, t: Tensor, to: int, frm: int) -> Tensor:
        """Send ``t`` to rank ``to`` and return what rank ``frm`` sends this process (the same shape)."""
        raise NotImplementedError


class TorchDistributed(Exchanger):
    """The collectives of ``torch.distributed`` over ``group`` (None: the default group).

    The world size and rank are read from the group at every call: 1 and 0 while
    ``torch.distributed`` is not initialised. Ring exchanges are point-to-point (``isend`` and
    ``irecv`` in one batch), addressed by the group's ranks.
    """

    def __init__(self, group: Any = None):
        self.group = group

    def _running(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def world_size(self) -> int:
        """``dist.get_world_size(group)``, or 1 when ``torch.distributed`` is not initialised."""
        return dist.get_world_size(self.group) if self._running() else 1

    def rank(self) -> int:
        """``dist.get_rank(group)``, or 0 when ``torch.distributed`` is not initialised."""
        return dist.get_rank(self.group) if self._running() else 0

    def all_gather(self, t: Tensor) -> list[Tensor]:
        """``dist.all_gather`` of ``t`` over the group."""
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size())]
        dist.all_gather(parts, t, group=self.group)
        return parts

    def all_reduce(self, t: Tensor) -> Tensor:
        """``dist.all_reduce`` (sum) of a copy of ``t`` over the group (gloo has no reduce-scatter)."""
        t = t.contiguous().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def exchange(self, t: Tensor, to: int, frm: int) -> Tensor:
        """One ``isend`` to ``to`` and one ``irecv`` from ``frm`` (group ranks), waited for."""
        out = torch.empty_like(t)
        if self.group is not None:  # point-to-point ops address global ranks
            to, frm = dist.get_global_rank(self.group, to), dist.get_global_rank(self.group, frm)
        ops = [dist.P2POp(dist.isend, t.contiguous(), to, self.group), dist.P2POp(dist.irecv, out, frm, self.group)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        return out


def _whole(name: str, value: Any, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value >= hi):
        span = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
        raise ValueError(f"topology {name} must be a whole number {span}, got {value!r}")
    return value


class Topology:
    """The processes a layout spans: world size, this process's rank, process group, exchanger.

    Args:
        world_size: the number of processes, fixed; None (with ``rank`` None): read from the
            exchanger each time it is asked (lazy).
        rank: this process's rank, fixed (given with ``world_size``); None: read from the exchanger.
        group: the ``torch.distributed`` process group of the default exchanger (None: the
            default group).
        exchanger: the :class:`Exchanger` that runs the collectives (None:
            :class:`TorchDistributed` over ``group``; give one or the other, not both).

    The lazy default is what a loss built before the trainer initialises ``torch.distributed``
    needs: ``Topology()`` is one process until the group exists and the group's size afterwards.
    A fixed topology is checked against its exchanger before every collective (a mismatch is an
    error naming both, not a hang); ``Topology(1, 0)`` runs no collective at all.

    Raises:
        ValueError: for only one of ``world_size`` and ``rank``, a rank outside ``[0, world_size)``,
            or both ``group`` and ``exchanger``.
    """

    __slots__ = ("_world_size", "_rank", "group", "exchanger")

    def __init__(self, world_size: Optional[int] = None, rank: Optional[int] = None, *, group: Any = None,
                 exchanger: Optional[Exchanger] = None):
        if (world_size is None) != (rank is None):
            raise ValueError("give a topology both world_size and rank, or neither (both read from its group)")
        if world_size is not None:
            _whole("world_size", world_size, 1)
            _whole("rank", rank, 0, world_size)
        if group is not None and exchanger is not None:
            raise ValueError("a topology takes a process group (for the torch.distributed exchanger) or an "
                             "exchanger, not both")
        self._world_size, self._rank = world_size, rank
        self.group = group
        self.exchanger: Exchanger = TorchDistributed(group) if exchanger is None else exchanger

    @property
    def world_size(self) -> int:
        """The number of processes: the fixed one, or the exchanger's now."""
        return self.exchanger.world_size() if self._world_size is None else self._world_size

    @property
    def rank(self) -> int:
        """This process's rank: the fixed one, or the exchanger's now."""
        return self.exchanger.rank() if self._rank is None else self._rank

    @property
    def lazy(self) -> bool:
        """Whether the world size and rank are read from the exchanger at each use."""
        return self._world_size is None

    def exchanger_for_collective(self) -> Exchanger:
        """The exchanger, once a fixed topology has been checked against it (called before each collective).

        Raises:
            ValueError: when the exchanger is not the rank of the world size this topology fixes.
        """
        if self._world_size is not None:
            w, r = self.exchanger.world_size(), self.exchanger.rank()
            if (w, r) != (self._world_size, self._rank):
                raise ValueError(f"the topology is rank {self._rank} of {self._world_size} but its exchanger "
                                 f"({type(self.exchanger).__name__}) is rank {r} of {w}")
        return self.exchanger

    def __repr__(self) -> str:
        size = "lazy" if self.lazy else f"world_size={self._world_size}, rank={self._rank}"
        return f"Topology({size}, exchanger={type(self.exchanger).__name__})"


ONE_PROCESS = Topology(1, 0)
"""This process's batch alone, whatever ``torch.distributed`` says (``Gather(ONE_PROCESS)``: the functional face)."""

DEFAULT_TOPOLOGY = Topology()
"""The default group, read lazily: what a layout built without a topology spans (``Topology()``)."""


def world_size() -> int:
    """Number of processes in the default group (1 when torch.distributed is not initialised).

    What :data:`DEFAULT_TOPOLOGY` reads now; layouts and the estimators they feed read their
    :class:`Topology` instead.
    """
    return DEFAULT_TOPOLOGY.world_size


def rank() -> int:
    """This process's rank in the default group (0 when torch.distributed is not initialised)."""
    return DEFAULT_TOPOLOGY.rank


# --------------------------------------------------------------------------------------------
# collectives, with their gradients, over a topology


class _AllGatherCat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, ex: Exchanger, r: int) -> Tensor:
        ctx.ex, ctx.rows, ctx.rank = ex, t.shape[0], r
        return torch.cat(ex.all_gather(t), dim=0)

    @staticmethod
    def backward(ctx, g: Tensor):
        g = ctx.ex.all_reduce(g)
        return g[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None, None


def all_gather_with_grad(t: Tensor, topology: Optional[Topology] = None) -> Tensor:
    """Concatenate ``t`` from all processes in rank order; the backward SUMS the gradients.

    The gradient a process receives for its own slice is the sum over processes of the gradient
    each computed for that slice (as ``torch.distributed.nn.functional.all_gather``), done with one
    all-reduce so that it works on gloo.

    Args:
        t: (B, ...) local tensor, the same shape on every process.
        topology: the processes (None: the default group, lazily).

    Returns:
        (W * B, ...) gathered tensor.
    """
    topo = DEFAULT_TOPOLOGY if topology is None else topology
    if topo.world_size == 1:
        return t
    return _AllGatherCat.apply(t, topo.exchanger_for_collective(), topo.rank)


@torch.no_grad()
def all_gather_no_grad(t: Tensor, topology: Optional[Topology] = None) -> Tensor:
    """Concatenate a detached ``t`` (B, ...) from all processes in rank order: (W * B, ...)."""
    topo = DEFAULT_TOPOLOGY if topology is None else topology
    if topo.world_size == 1:
        return t.detach()
    return torch.cat(topo.exchanger_for_collective().all_gather(t.detach()), dim=0)


class _NeighbourExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, ex: Exchanger, to: int, frm: int) -> Tensor:
        ctx.ex, ctx.to, ctx.frm = ex, to, frm
        return ex.exchange(t, to, frm)

    @staticmethod
    def backward(ctx, g: Tensor):
        return ctx.ex.exchange(g.contiguous(), ctx.frm, ctx.to), None, None, None


def ring_blocks(t: Tensor, topology: Optional[Topology] = None) -> list[tuple[int, Tensor]]:
    """Pass ``t`` around the ring: block k comes from rank ``(rank - k) mod W``, with gradient.

    Each step sends the last block to rank + 1 and receives from rank - 1; the backward sends each
    block's gradient back the way it came, so the owner receives the sum over processes.

    Args:
        t: (B, ...) local tensor.
        topology: the processes (None: the default group, lazily).

    Returns:
        ``[(owner, block), ...]`` for k = 0 .. W - 1; block 0 is ``t`` itself.
    """
    topo = DEFAULT_TOPOLOGY if topology is None else topology
    W, r = topo.world_size, topo.rank
    out = [(r, t)]
    if W == 1:
        return out
    ex = topo.exchanger_for_collective()
    cur = t
    for k in range(1, W):
        cur = _NeighbourExchange.apply(cur, ex, (r + 1) % W, (r - 1) % W)
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
# W ranks in one process (tests)


class _Member(Exchanger):
    """Rank ``r`` of an :class:`InProcessWorld`."""

    def __init__(self, world: "InProcessWorld", r: int):
        self._world, self._r = world, r

    def world_size(self) -> int:
        return self._world.world_size

    def rank(self) -> int:
        return self._r

    def all_gather(self, t: Tensor) -> list[Tensor]:
        return [p.clone() for _, p in self._world._meet(self._r, None, t)]

    def all_reduce(self, t: Tensor) -> Tensor:
        parts = self._world._meet(self._r, None, t)
        total = parts[0][1].clone()
        for _, p in parts[1:]:  # rank order on every rank: identical sums
            total += p
        return total

    def exchange(self, t: Tensor, to: int, frm: int) -> Tensor:
        dest, got = self._world._meet(self._r, to, t)[frm]
        if dest != self._r:
            raise RuntimeError(f"rank {self._r} receives from rank {frm}, which sent to rank {dest}")
        return got.clone()


class InProcessWorld:
    """``W`` ranks as threads of one process, with an exchanger that meets them at a barrier.

    For tests: :meth:`run` calls ``fn(topology)`` on ``W`` threads, rank ``r`` getting
    ``Topology(W, r, exchanger=...)``; a layout built with that topology runs its collectives
    (forward and backward) between the threads, so per-rank losses and gradients of several
    processes come out of one process. Each collective copies what it hands over, as a real one
    does.

    >>> world = InProcessWorld(2)
    >>> world.run(lambda topo: all_gather_no_grad(torch.tensor([topo.rank]), topo).tolist())
    [[0, 1], [0, 1]]

    Args:
        world_size: ``W`` (>= 1).
        timeout: seconds a rank waits for the others at a collective before the run fails.
    """

    def __init__(self, world_size: int, timeout: float = 60.0):
        self.world_size = _whole("world_size", world_size, 1)
        self._timeout = timeout
        self._barrier = threading.Barrier(world_size, timeout=timeout)
        self._slots: list = [None] * world_size

    def topology(self, rank: int) -> Topology:
        """The fixed topology of rank ``rank``, with this world's exchanger."""
        return Topology(self.world_size, rank, exchanger=_Member(self, rank))

    def _meet(self, r: int, to: Optional[int], t: Tensor) -> list[tuple[Optional[int], Tensor]]:
        self._slots[r] = (to, t.detach().clone())
        self._barrier.wait()
        got = list(self._slots)
        self._barrier.wait()  # every rank has read before the next collective writes
        return got

    def run(self, fn: Callable[[Topology], T]) -> list[T]:
        """``[fn(topology of rank 0), ..., fn(topology of rank W - 1)]``, the ranks run concurrently.

        Raises:
            Exception: the first exception a rank raised (the others are released from their
                collectives rather than left waiting).
        """
        W = self.world_size
        self._barrier = threading.Barrier(W, timeout=self._timeout)
        results: list = [None] * W
        errors: list = [None] * W

        def one(r: int) -> None:
            try:
                results[r] = fn(self.topology(r))
            except BaseException as e:  # noqa: BLE001 - handed to the caller below
                errors[r] = e
                self._barrier.abort()

        threads = [threading.Thread(target=one, args=(r,), name=f"rank{r}") for r in range(W)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        first = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
        first = first or [e for e in errors if e is not None]
        if first:
            raise first[0]
        return results


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

    Args:
        topology: the processes it spans (None: ``Topology()``, the default group, read lazily).

    Class attributes:
        name: the registered name.
        exact: whether every process sees all ``N`` global columns (``gather``, ``ring``).
        guarantee: what the loss of a sum of pair terms is under this layout: ``exact`` (equal to
            the single-process loss on the global batch) or ``unbiased`` (its expectation is, for
            fixed normalisers). An objective states which it needs (``Objective.needs``); a new
            layout declares this and touches no objective.
    """

    name: ClassVar[str] = "layout"
    exact: ClassVar[bool] = True
    guarantee: ClassVar[str] = "exact"

    def __init__(self, topology: Optional[Topology] = None):
        if topology is not None and not isinstance(topology, Topology):
            raise TypeError(f"a layout's topology must be an amortize.comm.Topology, got {type(topology).__name__}")
        self.topology = DEFAULT_TOPOLOGY if topology is None else topology

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.topology!r})"

    def world(self) -> int:
        """The number of processes the layout spans (its topology's, now)."""
        return self.topology.world_size

    def columns(self, y: Tensor) -> list[Block]:
        """The column blocks for local columns ``y`` (B, d), with gradient.

        Any per-pair local tensor can be laid out so: an objective whose text side needs every
        image passes the image features (see the custom-components tutorial).
        """
        return [Block(slice(0, y.shape[0]), y, 0)]

    def num_rows(self, batch: int) -> int:
        """How many rows the estimator sees (every process's in exact layouts), for ``batch`` local pairs."""
        return batch * self.world() if self.exact else batch

    def num_columns(self, batch: int) -> int:
        """How many columns the blocks hold in all: as many as the estimator's rows (their positives)."""
        return self.num_rows(batch)

    def row_offset(self, batch: int) -> int:
        """Where this process's rows sit among the rows its estimator sees."""
        return self.topology.rank * batch if self.exact and self.world() > 1 else 0

    def negative_weight(self, batch: int) -> float:
        """Weight of each negative in partition sums (1 except in the ``local`` layout)."""
        return 1.0

    def local_rows(self) -> bool:
        """Whether the estimator sees this process's rows alone while other processes hold others.

        An estimator that keeps its state identical on every process then synchronises it itself
        (not exact, more than one process).
        """
        return not self.exact and self.world() > 1

    def all_rows(self, t: Tensor) -> Tensor:
        """The rows of every process, detached: (W * B, ...) in exact layouts, ``t`` otherwise."""
        return all_gather_no_grad(t, self.topology) if self.exact and self.world() > 1 else t.detach()

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
        rows_all = all_gather_no_grad(row_lse, self.topology)
        cols_all = torch.logsumexp(all_gather_no_grad(col_partial[None], self.topology), dim=0)
        return rows_all, cols_all


class Gather(Layout):
    """``gather``: all-gather the text features with gradient; one (B, N) block (exact).

    On a topology of one process (:data:`ONE_PROCESS`) it is the one-process layout: one block of
    the local columns, no collective.
    """

    name: ClassVar[str] = "gather"
    exact: ClassVar[bool] = True

    def columns(self, y: Tensor) -> list[Block]:
        """One block of all ``N`` columns; local row 0's positive at ``rank * B``."""
        B, W = y.shape[0], self.world()
        if W == 1:
            return [Block(slice(0, B), y, 0)]
        return [Block(slice(0, W * B), all_gather_with_grad(y, self.topology), self.topology.rank * B)]

    def all_columns(self, blocks: list[Block], y: Tensor) -> Tensor:
        """The one block already holds all ``N`` columns in order: detached, no second exchange."""
        return blocks[0].features.detach()


class Ring(Layout):
    """``ring``: the text features travel around the ring in ``W - 1`` exchanges (exact)."""

    name: ClassVar[str] = "ring"
    exact: ClassVar[bool] = True

    def columns(self, y: Tensor) -> list[Block]:
        """``W`` blocks of ``B`` columns, the own block (positives on its diagonal) first."""
        B = y.shape[0]
        if self.world() == 1:
            return [Block(slice(0, B), y, 0)]
        r = self.topology.rank
        return [Block(slice(o * B, (o + 1) * B), blk, 0 if o == r else B)
                for o, blk in ring_blocks(y, self.topology)]


class Local(Layout):
    """``local``: negatives are the local batch, weighted by ``k = (N - 1) / (B - 1)`` (unbiased)."""

    name: ClassVar[str] = "local"
    exact: ClassVar[bool] = False
    guarantee: ClassVar[str] = "unbiased"

    def negative_weight(self, batch: int) -> float:
        """:func:`local_negative_weight` of this process count."""
        return local_negative_weight(batch, self.world())


LAYOUTS: Registry[Layout] = Registry("layout")
"""Process layouts by name: ``gather``, ``ring``, ``local`` (each built with a :class:`Topology`)."""
for _cls in (Gather, Ring, Local):
    LAYOUTS.register(_cls.name, _cls)


def build_layout(spec: Union[str, Layout], topology: Optional[Topology] = None) -> Layout:
    """A layout from its registered name (built with ``topology``; None: the lazy default) or itself."""
    if isinstance(spec, Layout):
        if topology is not None:
            raise ValueError("a layout object brings its own topology; pass a layout name with a topology")
        return spec
    return LAYOUTS.build(spec, topology)
