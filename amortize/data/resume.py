"""The order of an epoch as a function, and the few integers a resumed run needs.

Both kinds of training data order an epoch by a pure function of ``(seed, epoch, global position)``:

* the shipped (map-style) data by the permutation of ``torch.utils.data.DistributedSampler``
  (``randperm`` seeded with ``seed + epoch``; the order every earlier release trained on), global
  position ``p`` on process ``p % W``;
* webdataset shards by :func:`stream_positions`: the shards in a seeded order, read as one stream,
  and the stream shuffled inside windows of :func:`shuffle_window` samples.

A global batch ``j`` is the positions ``[j B, (j + 1) B)`` whatever the number of processes ``W``,
each process taking its slice (:func:`rank_slice`), so the state of a run's data is the epoch and
the next global batch: :class:`EpochPosition`. :class:`EpochLoader` (a ``DataLoader``) keeps it up to
date as batches are handed out, and the datasets expose it through Composer's dataset protocol
(``state_dict(num_samples, from_beginning)`` / ``load_state_dict(state)``), so a mid-epoch resume
neither re-reads nor spins; with the same global batch it resumes on any ``W`` that divides it.

Nothing here imports Composer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

STATE_VERSION = 1
"""Version of the dict :meth:`EpochPosition.state_dict` writes."""
MIN_BATCH = 2
"""The smallest batch a process trains on: a contrastive batch needs at least one negative."""


def _rng(*words: int) -> np.random.Generator:
    """A numpy generator seeded by a tuple of integers (negative ones folded into range)."""
    return np.random.default_rng([int(w) % (1 << 63) for w in words])


def shard_order(seed: int, epoch: int, num_shards: int) -> np.ndarray:
    """The order in which the shards are streamed in ``epoch``: a seeded permutation of ``range(num_shards)``."""
    return _rng(seed, epoch, 0).permutation(num_shards)


def shuffle_window(shuffle_buffer: int) -> int:
    """Stream samples shuffled together for a pipeline with ``shuffle_buffer`` (0: no shuffling).

    A window of ``3 * shuffle_buffer`` moves a sample by ``shuffle_buffer`` positions on average
    (``E|U - V| = size / 3`` for two uniform positions), as much as the sample buffer of the
    webdataset pipeline it replaces did (measured in ``tests/data/test_epoch_order.py``).
    """
    return 3 * int(shuffle_buffer) if shuffle_buffer else 1


def window_permutation(seed: int, epoch: int, window: int, size: int) -> np.ndarray:
    """The permutation of the ``size`` stream samples of window ``window`` in ``epoch``."""
    if size <= 1:
        return np.zeros(size, dtype=np.int64)
    return _rng(seed, epoch, 1, window).permutation(size)


def stream_positions(positions: np.ndarray, *, seed: int, epoch: int, window: int, stream_len: int) -> np.ndarray:
    """Stream positions of the global ``positions`` of an epoch (the inverse is never needed).

    The stream (the shards concatenated in :func:`shard_order`) is cut in windows of ``window``
    samples (the last may be shorter) and each window is permuted by :func:`window_permutation`.

    >>> sorted(stream_positions(np.arange(10), seed=0, epoch=0, window=4, stream_len=10).tolist())
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    """
    positions = np.asarray(positions, dtype=np.int64)
    out = np.empty_like(positions)
    wins = positions // window
    for w in np.unique(wins):
        base = int(w) * window
        perm = window_permutation(seed, epoch, int(w), min(window, stream_len - base))
        sel = wins == w
        out[sel] = base + perm[positions[sel] - base]
    return out


def global_positions(stream: np.ndarray, *, seed: int, epoch: int, window: int, stream_len: int) -> np.ndarray:
    """The inverse of :func:`stream_positions`: the global positions of the ``stream`` positions.

    >>> p = np.arange(10); q = stream_positions(p, seed=3, epoch=1, window=4, stream_len=10)
    >>> global_positions(q, seed=3, epoch=1, window=4, stream_len=10).tolist() == p.tolist()
    True
    """
    stream = np.asarray(stream, dtype=np.int64)
    out = np.empty_like(stream)
    wins = stream // window
    for w in np.unique(wins):
        base = int(w) * window
        inverse = np.argsort(window_permutation(seed, epoch, int(w), min(window, stream_len - base)))
        sel = wins == w
        out[sel] = base + inverse[stream[sel] - base]
    return out


def epoch_batches(epoch_samples: int, batch_size: int, world_size: int = 1, drop_last: bool = True) -> int:
    """Global batches of an epoch of ``epoch_samples`` positions (see :func:`batch_bounds`).

    >>> epoch_batches(48, 12), epoch_batches(50, 12), epoch_batches(49, 12, drop_last=False), epoch_batches(50, 12, drop_last=False)
    (4, 4, 4, 5)
    """
    full, rest = divmod(int(epoch_samples), int(batch_size))
    if drop_last or not rest:
        return full
    return full + 1 if rest // int(world_size) >= MIN_BATCH or not full else full


def batch_bounds(j: int, epoch_samples: int, batch_size: int, world_size: int = 1,
                 drop_last: bool = True) -> tuple[int, int]:
    """Global positions ``[start, end)`` of global batch ``j``.

    Full batches are ``[j B, (j + 1) B)``. Without ``drop_last`` the remainder is a batch of its
    own when every process gets at least :data:`MIN_BATCH` of it, and else joins the last full
    batch (a batch without a negative cannot train).

    >>> batch_bounds(3, 49, 12, drop_last=False)  # 1 left over: it joins batch 3
    (36, 49)
    """
    n = epoch_batches(epoch_samples, batch_size, world_size, drop_last)
    if not 0 <= j < n:
        raise IndexError(f"batch {j} of an epoch of {n}")
    start = j * int(batch_size)
    end = min(start + int(batch_size), int(epoch_samples)) if j < n - 1 or drop_last else int(epoch_samples)
    return start, end


def rank_slice(start: int, end: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous part ``[s, e)`` of the global positions ``[start, end)`` that process ``rank`` trains on."""
    n = end - start
    return start + n * rank // world_size, start + n * (rank + 1) // world_size


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of a sample's random augmentation in an epoch: the same on any process, worker or resume."""
    return int(_rng(seed, epoch, 2, index).integers(1 << 62))


def process_rank() -> int:
    """This process's global rank (the launcher's ``RANK``; 0 alone)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class EpochPosition:
    """Where a run's data stands: the epoch and the next global batch, and a resume to apply.

    Args:
        batch_size: the GLOBAL batch (a resume must keep it: the positions of a batch depend on it).
        world_size: processes (recorded, so a resume on another number can say so).
        seed: the run's seed (recorded).
        num_batches: global batches of an epoch.
    """

    def __init__(self, batch_size: int, world_size: int, seed: int, num_batches: int):
        self.batch_size, self.world_size, self.seed = int(batch_size), int(world_size), int(seed)
        self.num_batches = int(num_batches)
        self.epoch, self.batch, self.started = 0, 0, False
        self.resume: Optional[tuple[int, int]] = None
        self.legacy_resume = False  # loaded a checkpoint without data state: Composer spins, as before

    def begin(self) -> tuple[int, int]:
        """Start iterating an epoch: ``(epoch, first batch)`` (a loaded resume, else the next epoch from 0)."""
        if self.resume is not None:
            self.epoch, self.batch = self.resume
            self.resume = None
        else:
            self.epoch, self.batch = (self.epoch + 1 if self.started else self.epoch), 0
        self.started = True
        return self.epoch, self.batch

    def state_dict(self, num_samples: int = 0, from_beginning: bool = True) -> dict[str, int]:
        """The few integers that say where the data stands (Composer's dataset protocol).

        The position is counted in batches handed out, which a skipped sample does not shift.
        ``num_samples`` (Composer's samples of the epoch so far, all processes) tells an epoch's end
        that Composer has not yet rolled over (a batch checkpoint at the last batch: the position
        stays in the epoch, and resumed, the epoch ends at once) from one it has (0: the next epoch).
        """
        epoch, batch = (self.resume if self.resume is not None else (self.epoch, self.batch))
        if self.resume is None and self.started and batch >= self.num_batches and not num_samples:
            epoch, batch = epoch + 1, 0  # Composer has started the next epoch
        return {"version": STATE_VERSION, "epoch": int(epoch), "batch": int(batch), "batch_size": self.batch_size,
                "world_size": self.world_size, "seed": self.seed, "num_samples": int(num_samples)}

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        """Resume at the state :meth:`state_dict` wrote; None (a checkpoint from before 0.x) keeps Composer's spin.

        Raises:
            RecipeError: under ``data.batch_size`` when the checkpoint's global batch differs (the
                positions of its batches would not be this run's).
        """
        from amortize.options import RecipeError

        if state is None:
            self.legacy_resume = True
            return
        if int(state.get("version", 0)) != STATE_VERSION:
            raise RecipeError(f"the checkpoint's data state has version {state.get('version')}, this release reads "
                              f"{STATE_VERSION}", key="data")
        if int(state["batch_size"]) != self.batch_size:
            raise RecipeError(f"the checkpoint was written with data.batch_size={state['batch_size']} (the global "
                              f"batch); set data.batch_size={state['batch_size']} to resume it (the per-process batch "
                              "follows the number of processes)", key="data.batch_size")
        self.resume = (int(state["epoch"]), int(state["batch"]))
        self.legacy_resume = False


class EpochLoader(DataLoader):
    """A ``DataLoader`` that tells its data the epoch and first batch, and counts the batches handed out.

    The dataset (an iterable one, or the sampler of a map-style one) is told the epoch and the
    first global batch before each pass (:meth:`EpochPosition.begin`); a batch dict's ``"batch"``
    entry (the global batch index, set by the shard pipeline) is removed and recorded, so the
    position is right even after a batch was dropped.
    """

    def __init__(self, dataset: Any, *, position: EpochPosition, **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.position = position

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        pos = self.position
        epoch, start = pos.begin()
        if isinstance(self.sampler, EpochSampler):
            self.sampler.start = start * pos.batch_size
        else:
            self.dataset.set_position(epoch, start)
        # the DataLoader's iterator is made here, as a plain DataLoader makes it (it draws its workers'
        # base seed from torch's generator): the shipped data's runs keep every number they had
        return self._counted(super().__iter__())

    def _counted(self, batches: Iterator[Any]) -> Iterator[Any]:
        """The batches, each global batch index recorded (and taken out of the batch) as it is handed out."""
        pos = self.position
        for batch in batches:
            j = batch.pop("batch", None) if isinstance(batch, dict) else None
            pos.batch = int(j) + 1 if j is not None else pos.batch + 1
            yield batch


class EpochSampler(DistributedSampler):
    """``DistributedSampler``'s order (so Composer sets its epoch), able to start at a global position.

    ``start`` (set by :class:`EpochLoader`) is a global position: process ``r`` of ``W`` then takes
    the positions ``start + r, start + r + W, ...`` of the same padded or truncated permutation, so
    a run resumed on another number of processes trains every remaining position once.
    """

    start = 0

    def global_order(self, world_size: Optional[int] = None) -> list[int]:
        """The epoch's global order as ``DistributedSampler`` builds it for ``world_size`` processes."""
        w = self.num_replicas if world_size is None else int(world_size)
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        total = -(-(n - w) // w) * w if self.drop_last and n % w else -(-n // w) * w
        if total <= n:
            return order[:total]
        pad = total - n  # padded by repeating the order, as DistributedSampler does
        return order + (order * -(-pad // n))[:pad]

    def __iter__(self) -> Iterator[int]:
        if not self.start:
            return super().__iter__()  # exactly the order every earlier release trained on
        return iter(self.global_order()[self.start + self.rank::self.num_replicas])


class ResumableDataset(Dataset):
    """A map-style dataset with Composer's dataset protocol; items and attributes are the wrapped one's."""

    def __init__(self, dataset: Dataset, position: EpochPosition):
        self.dataset, self.position = dataset, position

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i]

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "position"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def state_dict(self, num_samples: int = 0, from_beginning: bool = True) -> dict[str, int]:
        """See :meth:`EpochPosition.state_dict`."""
        return self.position.state_dict(num_samples, from_beginning)

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        """See :meth:`EpochPosition.load_state_dict`."""
        self.position.load_state_dict(state)
