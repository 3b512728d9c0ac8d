"""The order of an epoch as a function of (seed, epoch, position) and elastic resume (issue 29).

Fast, in one process: the ranks of a multi-process run are built with their rank (the shipped
data's sampler) or ``RANK`` (the shard pipeline), and iterated one after the other.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler

from amortize.data.resume import (
    EpochLoader,
    EpochPosition,
    EpochSampler,
    ResumableDataset,
    batch_bounds,
    epoch_batches,
    stream_positions,
)
from amortize.data.tokenizer import Tokenizer
from amortize.data.webdataset import webdataset_train
from amortize.options import RecipeError
from tests.data.wds_fixtures import write_shard


class Indices(Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"index": torch.tensor(i)}


@pytest.mark.parametrize("n,world,drop_last", [(101, 1, True), (101, 2, True), (101, 3, False), (9421, 2, True)])
def test_shipped_order_is_distributed_samplers(n, world, drop_last):
    """The default recipe trains bit-identically: the sampler's order is DistributedSampler's, unchanged."""
    for epoch in (0, 3):
        for rank in range(world):
            ours = EpochSampler(Indices(n), num_replicas=world, rank=rank, seed=7, drop_last=drop_last)
            ref = DistributedSampler(Indices(n), num_replicas=world, rank=rank, seed=7, drop_last=drop_last)
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert list(ours) == list(ref)
            assert ours.global_order()[rank::world] == list(ref)


def _map_loader(n: int, batch: int, world: int, rank: int) -> EpochLoader:
    sampler = EpochSampler(Indices(n), num_replicas=world, rank=rank, seed=5, drop_last=True)
    pos = EpochPosition(batch, world, 5, len(sampler) // (batch // world))
    return EpochLoader(ResumableDataset(Indices(n), pos), position=pos, batch_size=batch // world, sampler=sampler,
                       drop_last=True)


def _shard_loader(pattern: str, batch: int, world: int) -> EpochLoader:
    data = webdataset_train(Tokenizer(8), 8, batch_size=batch, world_size=world, seed=5, shards=pattern,
                            shuffle_buffer=6)
    return EpochLoader(data, position=data.position, batch_size=None)


def _run(loaders, monkeypatch, stop: int | None = None) -> list[int]:
    """Global batches of one epoch from per-rank loaders (rank r = loaders[r]); stop after ``stop`` of them."""
    its = []
    for r, loader in enumerate(loaders):
        monkeypatch.setenv("RANK", str(r))
        it = iter(loader)
        first = next(it, None)  # each rank's pass starts (and reads RANK) here
        its.append(itertools.chain([first] if first is not None else [], it))
    seen: list[int] = []
    for _ in itertools.count() if stop is None else range(stop):
        parts = [next(it, None) for it in its]
        if any(p is None for p in parts):
            assert all(p is None for p in parts), "the processes' loaders differ in length"
            break
        for p in parts:
            seen += p["index"].tolist()
    return seen


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("order")
    for s in range(5):
        write_shard(folder / f"{s:05d}.tar", s * 10, 10 + s % 2 * 3, stats=True)  # uneven shards: 56 samples
    return str(folder / "{00000..00004}.tar")


@pytest.mark.parametrize("kind", ["shipped", "shards"])
@pytest.mark.parametrize("before,after", [(1, 2), (2, 1), (2, 2)])
def test_elastic_resume_trains_every_remaining_sample_once(kind, before, after, shards, monkeypatch):
    batch, stop = 8, 3

    def loaders(world):
        return [_map_loader(61, batch, world, r) for r in range(world)] if kind == "shipped" else \
            [_shard_loader(shards, batch, world) for _ in range(world)]

    straight = _run(loaders(before), monkeypatch)
    first = loaders(before)
    part = _run(first, monkeypatch, stop=stop)
    states = [ld.dataset.state_dict(stop * batch) for ld in first]  # rank 0's is the checkpoint's
    assert states[0]["batch"] == stop and states[0]["epoch"] == 0
    resumed = loaders(after)
    for ld in resumed:
        ld.dataset.load_state_dict(states[0])
    rest = _run(resumed, monkeypatch)
    assert len(part) == stop * batch and len(part + rest) == len(set(part + rest))  # nothing twice
    assert sorted(part + rest) == sorted(straight)  # nothing lost: the epoch's samples, each once
    if before == after:
        assert part + rest == straight  # same processes: the same sequence


def test_resume_keeps_the_global_batch(shards):
    data = webdataset_train(Tokenizer(8), 8, batch_size=8, seed=5, shards=shards)
    state = data.state_dict(0)
    other = webdataset_train(Tokenizer(8), 8, batch_size=12, seed=5, shards=shards)
    with pytest.raises(RecipeError, match=r"data\.batch_size: .*set data\.batch_size=8"):
        other.load_state_dict(state)


def test_every_sample_once_with_more_workers_than_shards(shards):
    data = webdataset_train(Tokenizer(8), 8, batch_size=8, seed=5, shards=shards, num_workers=4, drop_last=False)
    loader = EpochLoader(data, position=data.position, batch_size=None, num_workers=4)
    batches = [b["index"].tolist() for b in loader]
    assert len(batches) == len(loader) == 7  # 56 samples
    assert sorted(i for b in batches for i in b) == list(range(56))


def test_batch_bounds_without_drop_last():
    assert epoch_batches(49, 12, drop_last=False) == 4 and batch_bounds(3, 49, 12, drop_last=False) == (36, 49)
    assert epoch_batches(50, 12, drop_last=False) == 5 and batch_bounds(4, 50, 12, drop_last=False) == (48, 50)
    assert epoch_batches(53, 12, world_size=2, drop_last=False) == 5  # 5 left: 2 and 3 a process
    assert epoch_batches(53, 12, world_size=4, drop_last=False) == 4  # 5 left over 4 processes: joined


def test_shuffle_quality_matches_the_buffer_it_replaces():
    """A window of 3 x shuffle_buffer moves samples as far as webdataset's buffer of shuffle_buffer did.

    Measured on a stream of 50,000 positions (old: ``webdataset.shuffle(1000, initial=100)``, the
    pipeline's stage before this change; mean |displacement| 720, mean spread (std) of the stream
    positions in a batch of 256: 960): new, window 3000: 983 and 905.
    """
    n, p = 50_000, np.arange(50_000)
    q = stream_positions(p, seed=0, epoch=0, window=3000, stream_len=n)
    assert sorted(q.tolist()) == p.tolist()
    assert np.abs(q - p).mean() > 700
    assert q[: n // 256 * 256].reshape(-1, 256).std(1).mean() > 850
    assert not np.array_equal(q, stream_positions(p, seed=0, epoch=1, window=3000, stream_len=n))


def test_a_checkpoint_at_an_epochs_last_batch_resumes_into_the_next_epoch(shards, monkeypatch):
    """A batch checkpoint at the last batch (Composer not yet in the next epoch) and an epoch checkpoint."""
    straight = _shard_loader(shards, 8, 1)
    epochs = [[b["index"].tolist() for b in straight] for _ in range(2)]
    first = _shard_loader(shards, 8, 1)
    assert [b["index"].tolist() for b in first] == epochs[0]
    at_batch, at_epoch = first.dataset.state_dict(56), first.dataset.state_dict(0)
    assert (at_batch["epoch"], at_batch["batch"], at_epoch["epoch"], at_epoch["batch"]) == (0, 7, 1, 0)
    for state, passes in ((at_batch, [[], epochs[1]]), (at_epoch, [epochs[1]])):
        resumed = _shard_loader(shards, 8, 1)
        resumed.dataset.load_state_dict(state)
        assert [[b["index"].tolist() for b in resumed] for _ in passes] == passes


def test_bad_samples_and_shards_are_skipped_and_counted(tmp_path):
    """The exact pipeline skips and counts what the one-pass pipeline did (tests/data/test_webdataset.py)."""
    for s in range(4):
        write_shard(tmp_path / f"{s:05d}.tar", s * 10, 10, bad={3: "image", 5: "caption", 7: "noimage"} if s == 1 else None)
    raw = (tmp_path / "00003.tar").read_bytes()
    (tmp_path / "00003.tar").write_bytes(raw[: len(raw) // 2])  # truncated (its stats still say 10)
    data = webdataset_train(Tokenizer(8), 8, batch_size=4, seed=1, shards=str(tmp_path / "{00000..00003}.tar"),
                            num_workers=2, drop_last=False, max_skip_fraction=0.5, skip_min_seen=5)
    loader = EpochLoader(data, position=data.position, batch_size=None, num_workers=2)
    idx = [i for b in loader for i in b["index"].tolist()]
    s = data.counter.skipped
    # each shard counted once, though both workers read every shard here
    assert s["corrupt_shard"] == 1 and data.counter.as_dict()["shards"] == 3
    assert s["undecodable_image"] == 1 and s["empty_caption"] == 1
    assert s["missing_field"] == 1 and data.counter.kept == len(idx) == len(set(idx))
    assert set(range(0, 10)) | set(range(20, 30)) <= set(idx) and not {13, 15, 17} & set(idx)
    assert {i for i in idx if i >= 30} < set(range(30, 40))  # what the truncated shard still held
