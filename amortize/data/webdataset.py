"""Webdataset pipeline for img2dataset-style shards (CC3M, CC12M): ``KEY.jpg`` + ``KEY.txt`` per sample.

Training reads whole epochs through [`ShardEpochs`][amortize.data.webdataset.ShardEpochs]: the
order of an epoch is a function of (seed, epoch, position) (:mod:`amortize.data.resume`), each
process and DataLoader worker builds its own batches of it, and the data's state is a few integers,
so a resume starts at its batch. ``sampling: resampled`` (and epochs cut short by ``num_samples``)
use the webdataset pipeline of :func:`make_pipeline`: shard list (shuffled, or resampled with
replacement for multi-node) -> split by node and worker -> tolerant tar reader -> sample shuffle
buffer -> decode + open_clip transform + tokenise. Both yield batches of
``{"image": (B, 3, S, S), "text": (B, L), "index": (B,)}``.

``index`` is a dense sample index in ``[0, N)``: the shard's offset (from img2dataset's
``*_stats.json``, a ``sizes.json``, or a scan of the tar) plus the sample's ordinal inside its
shard. It is the key of the per-sample moving averages of SogCLR/FastCLIP.

Bad input is skipped and counted in a [`SkipCounter`][amortize.data.webdataset.SkipCounter] that
lives in shared memory, so the trainer reads the totals of all DataLoader workers; once the skipped
fraction passes ``max_skip_fraction`` the pipeline raises
[`TooManySkippedError`][amortize.data.webdataset.TooManySkippedError].
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch

from amortize.options import NONNEGATIVE, UNIT, Range

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Sample keys read as the image of a webdataset sample, in order of preference."""
SKIP_REASONS = ("missing_shard", "corrupt_shard", "missing_field", "undecodable_image", "empty_caption")
"""Why a shard or sample can be skipped; the keys of :class:`SkipCounter`'s counts."""


class TooManySkippedError(RuntimeError):
    """Raised when the fraction of skipped samples or shards exceeds the configured maximum."""


class SkipCounter:
    """Process-shared counts of good and skipped samples and shards.

    Args:
        max_skip_fraction: largest tolerated fraction of skipped samples (and of bad shards).
        min_seen: no check before this many samples (or shards) were seen, so that one early bad
            sample does not abort a run.

    Counts live in a ``multiprocessing.Array``, so increments made in DataLoader workers are
    visible from the trainer's process. Sample reasons: ``missing_field``, ``undecodable_image``,
    ``empty_caption``; shard reasons: ``missing_shard``, ``corrupt_shard``. ``lost`` counts the
    samples a missing or corrupt shard should have held (its size from ``*_stats.json``,
    ``sizes.json`` or a scan) that were never read; it is reported, not held against the limit
    (the shard already is).
    """

    def __init__(self, max_skip_fraction: float = 0.05, min_seen: int = 100):
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        self.max_skip_fraction = float(max_skip_fraction)
        self.min_seen = int(min_seen)
        # layout: [kept_samples, opened_shards, *reasons, lost_samples]
        self._counts = mp.get_context("spawn").Array("q", 3 + len(SKIP_REASONS))

    def _add(self, slot: int, n: int = 1) -> None:
        with self._counts.get_lock():
            self._counts[slot] += n

    def record_sample(self) -> None:
        """Count one good sample and check the threshold."""
        self._add(0)
        self.check()

    def record_shard(self) -> None:
        """Count one shard opened successfully."""
        self._add(1)

    def record_skip(self, reason: str) -> None:
        """Count one skipped sample or shard (``reason`` in ``SKIP_REASONS``) and check the threshold."""
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        self._add(2 + SKIP_REASONS.index(reason))
        self.check()

    def record_lost(self, n: int) -> None:
        """Count ``n`` samples of a missing or corrupt shard that were never read."""
        if n > 0:
            self._add(2 + len(SKIP_REASONS), int(n))

    @property
    def lost(self) -> int:
        """Samples of missing or corrupt shards never read."""
        return int(self._counts[2 + len(SKIP_REASONS)])

    @property
    def kept(self) -> int:
        """Good samples yielded so far."""
        return int(self._counts[0])

    @property
    def skipped(self) -> dict[str, int]:
        """Skips by reason."""
        return {r: int(self._counts[2 + i]) for i, r in enumerate(SKIP_REASONS)}

    @property
    def skipped_samples(self) -> int:
        """Samples skipped (shard failures not included)."""
        s = self.skipped
        return s["missing_field"] + s["undecodable_image"] + s["empty_caption"]

    @property
    def bad_shards(self) -> int:
        """Shards that were missing or corrupt."""
        s = self.skipped
        return s["missing_shard"] + s["corrupt_shard"]

    def fractions(self) -> tuple[float, float]:
        """(skipped sample fraction, bad shard fraction), 0 when nothing was seen."""
        seen = self.kept + self.skipped_samples
        shards = int(self._counts[1]) + self.bad_shards
        return (self.skipped_samples / seen if seen else 0.0,
                self.bad_shards / shards if shards else 0.0)

    def check(self) -> None:
        """Raise [`TooManySkippedError`][amortize.data.webdataset.TooManySkippedError] past the threshold."""
        seen = self.kept + self.skipped_samples
        shards = int(self._counts[1]) + self.bad_shards
        f_samples, f_shards = self.fractions()
        if seen >= self.min_seen and f_samples > self.max_skip_fraction:
            raise TooManySkippedError(
                f"skipped {self.skipped_samples} of {seen} samples ({f_samples:.1%} > "
                f"{self.max_skip_fraction:.1%}): {self.summary()}")
        if shards >= min(self.min_seen, 10) and f_shards > self.max_skip_fraction:
            raise TooManySkippedError(
                f"{self.bad_shards} of {shards} shards unreadable ({f_shards:.1%} > "
                f"{self.max_skip_fraction:.1%}): {self.summary()}")

    def summary(self) -> str:
        """One line: kept count and skips by reason."""
        parts = [f"{r}={n}" for r, n in self.skipped.items() if n] + ([f"lost={self.lost}"] if self.lost else [])
        return f"kept={self.kept} " + (" ".join(parts) if parts else "no skips")

    def as_dict(self) -> dict[str, int]:
        """Counts as a flat dict (``kept``, ``shards``, one key per reason, ``lost``) for logging."""
        return {"kept": self.kept, "shards": int(self._counts[1]), **self.skipped, "lost": self.lost}


# ----------------------------------------------------------------------------- shard indexing


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Expand a brace pattern (``"cc3m/{00000..00331}.tar"``), a ``::``-separated list or a list.

    Returns:
        The shard paths, in order.
    """
    import braceexpand

    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for s in specs:
        for part in s.split("::"):
            out.extend(braceexpand.braceexpand(part))
    if not out:
        raise ValueError(f"no shards in {spec!r}")
    return out


def count_shard_samples(path: str) -> int:
    """Number of samples (distinct keys) in one shard.

    Uses img2dataset's ``<shard>_stats.json`` (``successes``) when present, else scans the tar.
    A missing or unreadable shard counts as 0.
    """
    stats = Path(path).with_name(Path(path).stem + "_stats.json")
    if stats.is_file():
        try:
            return int(json.loads(stats.read_text())["successes"])
        except (KeyError, ValueError):
            pass
    n, last = 0, None
    try:
        with tarfile.open(path, "r") as tar:
            for m in tar:
                key = split_key(m.name)[0]
                if m.isfile() and key is not None and key != last:
                    n, last = n + 1, key
    except (OSError, tarfile.TarError, EOFError):
        pass
    return n


def shard_offsets(shards: Sequence[str]) -> dict[str, int]:
    """Offset of each shard's first sample in the dense index.

    The counts come from [`shard_sizes`][amortize.data.webdataset.shard_sizes] (``sizes.json``,
    img2dataset's stats files, a cached count, or a scan).

    Returns:
        ``{shard_path: offset}``; offsets follow the order of ``shards``.
    """
    out, total = {}, 0
    for s, n in shard_sizes(shards).items():
        out[s] = total
        total += n
    return out


COUNT_CACHE = ".amortize-counts.json"
"""File written beside the shards by :func:`shard_sizes`: ``{basename: [bytes, mtime_ns, samples]}``."""


def shard_sizes(shards: Sequence[str], cache: bool = True) -> dict[str, int]:
    """Samples per shard, read from img2dataset's or open_clip's files or counted once and cached.

    Sources, in order: ``sizes.json`` beside the shards (``{basename: count}``), img2dataset's
    ``<shard>_stats.json`` (``successes``), the cache file :data:`COUNT_CACHE` (entries whose
    file size and modification time still match), and a scan of the tar. Scanned counts are
    written to the cache (when the folder is writable), so only the first run pays for them.
    A missing shard counts 0 and is never cached.

    Returns:
        ``{shard_path: samples}`` in the order of ``shards``.
    """
    folder = Path(shards[0]).parent
    sizes_file = folder / "sizes.json"
    sizes = json.loads(sizes_file.read_text()) if sizes_file.is_file() else {}
    cache_file = folder / COUNT_CACHE
    try:
        cached = json.loads(cache_file.read_text()) if cache and cache_file.is_file() else {}
    except ValueError:
        cached = {}
    out: dict[str, int] = {}
    changed = False
    for s in shards:
        name = os.path.basename(s)
        if name in sizes:
            out[s] = int(sizes[name])
            continue
        try:
            st = os.stat(s)
        except OSError:
            out[s] = 0  # missing: counted as skipped when read
            continue
        stamp = [st.st_size, st.st_mtime_ns]
        entry = cached.get(name) if Path(s).parent == folder else None
        if isinstance(entry, list) and entry[:2] == stamp:
            out[s] = int(entry[2])
            continue
        out[s] = count_shard_samples(s)
        if Path(s).parent == folder and not Path(s).with_name(Path(s).stem + "_stats.json").is_file():
            cached[name] = stamp + [out[s]]
            changed = True
    if cache and changed:
        try:
            tmp = cache_file.with_name(f"{COUNT_CACHE}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(cached, sort_keys=True))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only data folder: count again next time
    return out


def split_key(name: str) -> tuple[str | None, str]:
    """``"dir/000012.jpg"`` -> ``("dir/000012", "jpg")``; the extension is lower-cased."""
    base = os.path.basename(name)
    if "." not in base or base.startswith("."):
        return None, ""
    stem, ext = base.split(".", 1)
    return os.path.join(os.path.dirname(name), stem), ext.lower()


# ----------------------------------------------------------------------------- pipeline stages


def read_tar_samples(shard: str, counter: SkipCounter | None = None) -> Iterator[dict]:
    """Yield the raw samples of one shard, tolerating a missing file or a truncated/corrupt tar.

    Args:
        shard: path of a ``.tar`` file.
        counter: where ``missing_shard`` / ``corrupt_shard`` are recorded.

    Yields:
        ``{"__key__", "__url__", "__pos__" (ordinal in the shard), ext: bytes, ...}``.
    """
    for _, sample in read_wanted_samples(shard, lambda ordinal: True, counter):
        yield sample


def decode_sample(sample: dict, transform: Callable, tokenizer: Callable, offset: int,
                  counter: SkipCounter | None = None) -> dict | None:
    """Decode one raw sample, or return None (and count why) when it is unusable.

    Returns:
        ``{"image": transform(PIL image), "text": long (L,), "index": long ()}`` or None.
    """
    from PIL import Image

    img_ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if img_ext is None or "txt" not in sample:
        if counter is not None:
            counter.record_skip("missing_field")
        return None
    caption = sample["txt"].decode("utf-8", errors="replace").strip()
    if not caption:
        if counter is not None:
            counter.record_skip("empty_caption")
        return None
    try:
        with Image.open(io.BytesIO(sample[img_ext])) as im:
            image = im.convert("RGB")
    except Exception:  # PIL raises many types for bad bytes
        if counter is not None:
            counter.record_skip("undecodable_image")
        return None
    if counter is not None:
        counter.record_sample()
    return {"image": transform(image), "text": tokenizer([caption])[0].long(),
            "index": torch.tensor(offset + sample["__pos__"], dtype=torch.long)}


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack a list of decoded samples into a batch dict of tensors."""
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


class ShardSamples:
    """Pipeline stage: shard dicts ``{"url": path}`` -> decoded samples, using shared offsets/counter."""

    def __init__(self, offsets: dict[str, int], transform: Callable, tokenizer: Callable,
                 counter: SkipCounter, sizes: dict[str, int] | None = None):
        self.offsets, self.transform, self.tokenizer, self.counter = offsets, transform, tokenizer, counter
        self.sizes = sizes or {}  # samples per shard: a shard read whole that yields fewer lost the others

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for shard in src:
            url = shard["url"]
            read = 0
            for raw in read_tar_samples(url, self.counter):
                read += 1
                out = decode_sample(raw, self.transform, self.tokenizer, self.offsets.get(url, 0),
                                    self.counter)
                if out is not None:
                    yield out
            self.counter.record_lost(self.sizes.get(url, 0) - read)


MIN_BATCH = 2
"""The smallest batch the pipeline yields: a contrastive batch needs at least one negative."""


class Batches:
    """Pipeline stage: decoded samples -> batches of ``batch_size`` (see :func:`collate`).

    With ``drop_last`` the final incomplete batch is dropped. Without it, it is yielded when it
    holds at least :data:`MIN_BATCH` samples; a single final sample joins the batch before it
    (one batch of ``batch_size + 1``), since a one-sample batch has no negative (it is dropped
    only when it is the source's one sample).
    """

    def __init__(self, batch_size: int, drop_last: bool = True):
        if batch_size < MIN_BATCH:
            raise ValueError(f"batch_size must be >= {MIN_BATCH}, got {batch_size}")
        self.batch_size, self.drop_last = int(batch_size), bool(drop_last)

    def __call__(self, src: Iterator[dict]) -> Iterator[dict[str, torch.Tensor]]:
        held: list[dict] = []  # the last full batch, held back until the end is known
        batch: list[dict] = []
        for sample in src:
            batch.append(sample)
            if len(batch) == self.batch_size:
                if held:
                    yield collate(held)
                held, batch = batch, []
        if self.drop_last or len(batch) >= MIN_BATCH:
            if held:
                yield collate(held)
            if batch and not self.drop_last:
                yield collate(batch)
        elif held:
            yield collate(held + batch)


class FirstBatches:
    """Pipeline stage: at most ``n`` items of its source (one pass; nothing is repeated)."""

    def __init__(self, n: int):
        self.n = int(n)

    def __call__(self, src: Iterator[Any]) -> Iterator[Any]:
        for i, item in enumerate(src):
            if i >= self.n:
                return
            yield item


def epoch_batches(epoch_samples: int, batch_size: int, num_workers: int, num_shards: int, world_size: int = 1,
                  resampled: bool = False) -> tuple[int, int]:
    """Batches per DataLoader worker and per process in an epoch of ``epoch_samples`` samples.

    ``batch_size`` is the global batch. With split sampling a worker reads only its own shards,
    and a process's shards are shared by at most as many workers as it has shards: workers
    beyond that yield nothing, so each producing worker yields its share of the epoch (rounded
    up; the loader's length, which the trainer stops at, is the epoch's count).

    Returns:
        ``(per_worker, per_process)``: the cap of each worker's batches and the loader's length.

    >>> epoch_batches(100, 10, num_workers=4, num_shards=2)  # two workers have shards
    (5, 10)
    """
    total = max(1, int(epoch_samples) // int(batch_size))
    workers = max(1, int(num_workers))
    if not resampled:
        workers = max(1, min(workers, int(num_shards) // max(1, int(world_size))))
    return -(-total // workers), total


def make_pipeline(
    shards: str | Sequence[str],
    *,
    transform: Callable,
    tokenizer: Callable,
    batch_size: int,
    resampled: bool = False,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    counter: SkipCounter | None = None,
    offsets: dict[str, int] | None = None,
    epoch_batches: int | None = None,
    drop_last: bool = True,
    sizes: dict[str, int] | None = None,
):
    """Build the training pipeline as a ``webdataset.DataPipeline`` (an IterableDataset of batches).

    Args:
        shards: brace pattern or list of ``.tar`` paths (img2dataset output).
        transform: PIL image -> float (3, S, S), e.g. open_clip's ``image_transform(S, is_train=True)``.
        tokenizer: captions -> LongTensor (n, L).
        batch_size: B per worker batch.
        resampled: draw shards with replacement forever (multi-node training; set ``epoch_batches``).
        shuffle_buffer: sample shuffle buffer size (0 disables shuffling).
        seed: seed of shard and sample shuffling.
        counter: a [`SkipCounter`][amortize.data.webdataset.SkipCounter]; one is created if None
            and attached as ``pipeline.counter``.
        offsets: ``{shard: offset}`` for the dense index (computed with ``shard_offsets`` if None).
        epoch_batches: batches per epoch. ``resampled``: the epoch's length (shards are drawn
            until it is reached). Split sampling: at most this many batches of one pass over the
            shards; a pass that yields fewer (a truncated or unreadable shard) ends the epoch early
            and never reads a shard twice in an epoch.
        drop_last: drop a final incomplete batch (without it, a single final sample joins the
            batch before it: a contrastive batch needs a negative).
        sizes: ``{shard: samples}``; the samples a shard read to its end did not yield are counted
            as ``lost`` in ``counter`` (None: not counted).

    Returns:
        The pipeline; iterate it (or wrap it in ``DataLoader(pipeline, batch_size=None, num_workers=...)``)
        to get ``{"image": (B, 3, S, S), "text": (B, L), "index": (B,)}``.
    """
    import webdataset as wds

    urls = expand_shards(shards)
    counter = counter if counter is not None else SkipCounter()
    offsets = offsets if offsets is not None else shard_offsets(urls)
    if resampled:
        stages = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(urls), wds.detshuffle(bufsize=len(urls), seed=seed) if shuffle_buffer else None,
                  wds.split_by_node, wds.split_by_worker]
    stages = [s for s in stages if s is not None]
    stages.append(ShardSamples(offsets, transform, tokenizer, counter, sizes))
    if shuffle_buffer:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed))
    stages.append(Batches(batch_size, drop_last=drop_last))
    if epoch_batches is not None and not resampled:
        stages.append(FirstBatches(epoch_batches))  # one pass over the shards, never a second read
    pipeline = wds.DataPipeline(*stages)
    if epoch_batches is not None and resampled:
        pipeline = pipeline.with_epoch(epoch_batches)
    pipeline.counter = counter
    pipeline.offsets = offsets
    return pipeline


def read_wanted_samples(shard: str, wanted: Callable[[int], bool], counter: SkipCounter | None = None
                        ) -> Iterator[tuple[int, dict]]:
    """Yield ``(ordinal, raw sample)`` of the samples of one shard that ``wanted(ordinal)`` accepts.

    The tar is opened for random access (``r:*``: plain or compressed): the data of a sample that is
    not wanted is skipped, not read. A missing file or a truncated/corrupt tar is counted in ``counter`` as
    ``missing_shard`` / ``corrupt_shard`` and ends the shard (its last sample may be lost).
    """
    if not os.path.isfile(shard):
        if counter is not None:
            counter.record_skip("missing_shard")
        return
    sample: dict | None = None
    pos, last_key = -1, None
    try:
        with tarfile.open(shard, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                if key is None:
                    continue
                if key != last_key:
                    if sample is not None:
                        yield sample["__pos__"], sample
                    pos, last_key = pos + 1, key
                    sample = {"__key__": key, "__url__": shard, "__pos__": pos} if wanted(pos) else None
                if sample is not None:
                    data = tar.extractfile(member).read()
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"{shard}: {member.name} truncated")
                    sample[ext] = data
            # a complete archive ends with two zero blocks; tarfile stops silently without them
            if os.path.getsize(shard) < tar.offset + 2 * tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"{shard}: archive truncated after {tar.offset} bytes")
        if counter is not None:
            counter.record_shard()
    except (OSError, tarfile.TarError, EOFError):
        if counter is not None:
            counter.record_skip("corrupt_shard")
        sample = None  # the last sample may be truncated: drop it
    if sample is not None:
        yield sample["__pos__"], sample


class ShardEpochs(torch.utils.data.IterableDataset):
    """The shards' epochs as a function of (seed, epoch, position): per-process batches, resumable anywhere.

    The order of an epoch is :func:`amortize.data.resume.stream_positions` (the shards in a seeded
    order, the stream shuffled in windows); global batch ``j`` is the positions ``[j B, (j + 1) B)``,
    process ``r`` of ``W`` takes its contiguous slice of it, and DataLoader worker ``k`` of ``K``
    builds the batches ``start + k, start + k + K, ...`` (the loader hands them out round-robin, so
    in order). A worker opens only the shards holding its samples from the first batch on and
    decodes only its own samples; each sample's augmentation is seeded by (seed, epoch, index).
    Every batch carries its global index as ``"batch"`` (taken out by
    :class:`~amortize.data.resume.EpochLoader`).

    Args:
        urls: shard paths, in the order of the dense index.
        sizes: samples of each shard (the index's offsets follow).
        transform: the image transform, as :func:`decode_sample`.
        tokenizer: the caption tokenizer, as :func:`decode_sample`.
        batch_size: the GLOBAL batch.
        world_size: processes.
        epoch_samples: positions of an epoch (at most the shards' samples).
        seed: the order's seed.
        shuffle_buffer: 0 keeps the shards and samples in order; else see :func:`~amortize.data.resume.shuffle_window`.
        drop_last: see :func:`~amortize.data.resume.batch_bounds`.
        counter: where skips are counted.
    """

    def __init__(self, urls: Sequence[str], sizes: Sequence[int], *, transform: Callable, tokenizer: Callable,
                 batch_size: int, world_size: int, epoch_samples: int, seed: int, shuffle_buffer: int,
                 drop_last: bool, counter: SkipCounter):
        from amortize.data.resume import EpochPosition, epoch_batches, shuffle_window

        self.urls, self.sizes = list(urls), [int(n) for n in sizes]
        self.offsets = dict(zip(self.urls, np.cumsum([0] + self.sizes[:-1]).tolist()))
        self.transform, self.tokenizer, self.counter = transform, tokenizer, counter
        self.batch_size, self.world_size, self.seed = int(batch_size), int(world_size), int(seed)
        self.epoch_samples, self.drop_last, self.shuffle = int(epoch_samples), bool(drop_last), shuffle_buffer > 0
        self.window = shuffle_window(shuffle_buffer)
        self.num_batches = epoch_batches(self.epoch_samples, self.batch_size, self.world_size, self.drop_last)
        self.position = EpochPosition(self.batch_size, self.world_size, self.seed, self.num_batches)
        self.dataset_size = sum(self.sizes)
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        return self.num_batches

    def set_position(self, epoch: int, start_batch: int) -> None:
        """The epoch the next pass yields, from global batch ``start_batch`` (set by the loader)."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def state_dict(self, num_samples: int = 0, from_beginning: bool = True) -> dict[str, int]:
        """See :meth:`amortize.data.resume.EpochPosition.state_dict`."""
        return self.position.state_dict(num_samples, from_beginning)

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """See :meth:`amortize.data.resume.EpochPosition.load_state_dict`."""
        self.position.load_state_dict(state)

    def stream(self, epoch: int) -> tuple[list[int], np.ndarray]:
        """``(shard order, stream offset of each shard in that order)`` of ``epoch``."""
        from amortize.data.resume import shard_order

        order = shard_order(self.seed, epoch, len(self.urls)).tolist() if self.shuffle else list(range(len(self.urls)))
        return order, np.cumsum([0] + [self.sizes[s] for s in order])

    def worker_batches(self, epoch: int, start: int, worker: int, workers: int, rank: int
                       ) -> list[tuple[int, np.ndarray]]:
        """``[(global batch, stream positions of this process's samples)]`` that one worker builds."""
        from amortize.data.resume import batch_bounds, rank_slice, stream_positions

        out = []
        for j in range(start + worker, self.num_batches, workers):
            s, e = rank_slice(*batch_bounds(j, self.epoch_samples, self.batch_size, self.world_size, self.drop_last),
                              rank, self.world_size)
            p = np.arange(s, e)
            q = stream_positions(p, seed=self.seed, epoch=epoch, window=self.window,
                                 stream_len=self.dataset_size) if self.shuffle else p
            out.append((j, q))
        return out

    def shard_reader(self, base: int, n: int, epoch: int, start: int, workers: int) -> tuple[int, int] | None:
        """``(rank, worker)`` that reads the first sample of the shard at stream ``[base, base + n)`` that the
        epoch trains from batch ``start`` on (None: none): the one reader that counts the shard as opened,
        missing or corrupt, however many read it."""
        from amortize.data.resume import batch_bounds, global_positions, rank_slice

        q = np.arange(base, base + n)
        p = global_positions(q, seed=self.seed, epoch=epoch, window=self.window,
                             stream_len=self.dataset_size) if self.shuffle else q
        first = batch_bounds(start, self.epoch_samples, self.batch_size, self.world_size, self.drop_last)[0] \
            if start < self.num_batches else self.epoch_samples
        last = batch_bounds(self.num_batches - 1, self.epoch_samples, self.batch_size, self.world_size,
                            self.drop_last)[1]
        p = p[(p >= first) & (p < last)]
        if not len(p):
            return None
        p0 = int(p[0])
        j = min(p0 // self.batch_size, self.num_batches - 1)
        s, e = batch_bounds(j, self.epoch_samples, self.batch_size, self.world_size, self.drop_last)
        rank = next(r for r in range(self.world_size) if p0 < rank_slice(s, e, r, self.world_size)[1])
        return rank, (j - start) % workers

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        from amortize.data.resume import process_rank, sample_seed

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        rank = process_rank()
        batches = self.worker_batches(epoch, self.start_batch, worker, workers, rank)
        if not batches:
            return
        wanted = np.zeros(self.dataset_size, dtype=bool)
        for _, q in batches:
            wanted[q] = True
        order, bases = self.stream(epoch)
        raw = self._raw_samples(order, bases, wanted,
                                lambda base, n: self.shard_reader(base, n, epoch, self.start_batch, workers)
                                == (rank, worker))
        cache: dict[int, tuple[str, dict]] = {}
        done = -1  # the stream is read up to here
        for j, qs in batches:
            samples, lost = [], 0
            for q in qs.tolist():
                while q not in cache and done < q:
                    try:
                        got, url, sample = next(raw)
                    except StopIteration:
                        done = self.dataset_size
                        break
                    cache[got], done = (url, sample), got
                if q not in cache:
                    lost += 1  # in a shard that ended early (counted as corrupt or missing)
                    continue
                url, sample = cache.pop(q)
                index = self.offsets[url] + sample["__pos__"]
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(sample_seed(self.seed, epoch, index))
                    out = decode_sample(sample, self.transform, self.tokenizer, self.offsets[url], self.counter)
                if out is not None:
                    samples.append(out)
            self.counter.record_lost(lost)
            if len(samples) >= MIN_BATCH:
                yield {**collate(samples), "batch": torch.tensor(j)}

    def _raw_samples(self, order: list[int], bases: np.ndarray, wanted: np.ndarray,
                     counts: Callable[[int, int], bool]) -> Iterator[tuple[int, str, dict]]:
        """``(stream position, shard, raw sample)`` of the wanted stream positions, in stream order;
        a shard without a wanted sample is not opened; ``counts(base, n)``: this reader records the
        shard's events (opened, missing, corrupt)."""
        for s, base in zip(order, bases[:-1].tolist()):
            n = self.sizes[s]
            if not wanted[base:base + n].any():
                continue
            mask = wanted[base:base + n]
            counter = self.counter if counts(base, n) else None
            for pos, sample in read_wanted_samples(self.urls[s], lambda o: o < n and bool(mask[o]), counter):
                yield base + pos, self.urls[s], sample


def shards_from_folder(src: str | Path, dest: str | Path, samples_per_shard: int = 10000) -> str:
    """Write img2dataset-style shards from a folder of images with one caption file each.

    Every image ``NAME.jpg`` / ``.jpeg`` / ``.png`` / ``.webp`` under ``src`` (sorted, recursively)
    whose ``NAME.txt`` exists becomes one sample: ``dest/00000.tar`` holds ``000000000.jpg`` (the
    file's bytes, with its own extension) and ``000000000.txt``, and each shard gets an
    img2dataset ``00000_stats.json`` (``successes``), so its size is known without a scan.
    Images without a caption file are left out.

    Args:
        src: folder of images and captions.
        dest: output folder (created).
        samples_per_shard: samples per ``.tar``.

    Returns:
        The brace pattern of the written shards, for ``data.shards``.

    Raises:
        ValueError: if no image under ``src`` has a caption file.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    pairs = [(p, p.with_suffix(".txt")) for p in sorted(Path(src).rglob("*"))
             if p.suffix.lower().lstrip(".") in IMAGE_EXTS and p.with_suffix(".txt").is_file()]
    if not pairs:
        raise ValueError(f"no image with a caption file (NAME.jpg + NAME.txt) under {src}")
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = (len(pairs) + samples_per_shard - 1) // samples_per_shard
    for s in range(n_shards):
        chunk = pairs[s * samples_per_shard:(s + 1) * samples_per_shard]
        with tarfile.open(out / f"{s:05d}.tar", "w") as tar:
            for i, (image, caption) in enumerate(chunk):
                key = f"{s * samples_per_shard + i:09d}"
                for name, data in ((key + image.suffix.lower(), image.read_bytes()),
                                   (key + ".txt", caption.read_bytes())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (out / f"{s:05d}_stats.json").write_text(json.dumps({"successes": len(chunk)}))
    return str(out / (f"{{00000..{n_shards - 1:05d}}}.tar" if n_shards > 1 else "00000.tar"))


def open_clip_transform(image_size: int, is_train: bool = True):
    """open_clip's image transform (random resized crop when training, resize + centre crop otherwise)."""
    import open_clip

    return open_clip.image_transform(image_size, is_train=is_train)


def webdataset_train(
    tokenizer: Callable,
    image_size: int,
    *,
    batch_size: int,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = True,
    shards: str | None = None,
    num_samples: Annotated[int | None, Range(lo=1)] = None,
    shuffle_buffer: Annotated[int, NONNEGATIVE] = 1000,
    max_skip_fraction: Annotated[float, UNIT] = 0.05,
    skip_min_seen: Annotated[int, NONNEGATIVE] = 100,
    sampling: Literal["split", "resampled"] = "split",
):
    """The ``webdataset`` training data of a recipe: img2dataset shards as a pipeline of per-process batches.

    Args:
        tokenizer: captions -> LongTensor (n, L).
        image_size: side S of the images (open_clip's training transform).
        batch_size: the GLOBAL batch (each process yields ``batch_size / world_size`` rows).
        world_size: processes sharing the batch.
        seed: shard and sample shuffling seed.
        num_workers: DataLoader workers (the epoch's batches are split among them).
        drop_last: drop an incomplete final batch (without it, a lone final sample joins the one before).
        shards: brace pattern of ``.tar`` shards, e.g. ``/data/cc3m/{00000..00331}.tar``.
        num_samples: samples of an epoch (None: every sample of the shards once); the estimators
            are sized by the shards' count either way. With ``split``, a number below the shards'
            count keeps the one-pass pipeline cut at ``num_samples // batch_size`` batches, which
            has no data state (a resume spins the loader).
        shuffle_buffer: how far samples are shuffled (0: no shuffling). ``split``: the shards are
            read in a seeded order and the stream is shuffled in windows of ``3 * shuffle_buffer``
            samples (a sample moves ``shuffle_buffer`` places on average); ``resampled``: a sample buffer.
        max_skip_fraction: largest tolerated fraction of skipped samples, and of unreadable
            shards; past it the run stops with :class:`TooManySkippedError`.
        skip_min_seen: samples seen before the fraction is checked.
        sampling: ``split``: each epoch trains every sample once, in an order that is a function
            of (seed, epoch, position) (:mod:`amortize.data.resume`): exact and elastic mid-epoch
            resume, whatever ``num_workers`` is (``num_samples`` at least the shards' count);
            ``resampled``: every worker draws shards with replacement and an epoch is
            ``num_samples / batch_size`` batches (multi-node runs, uneven shard counts).

    Returns:
        ``split`` over whole epochs: a :class:`ShardEpochs`; else a webdataset pipeline. Iterate it in
        ``DataLoader(pipeline, batch_size=None, ...)`` (``split``: an
        :class:`~amortize.data.resume.EpochLoader`); ``len()`` is the batches of an epoch per process, ``.counter`` (its :class:`SkipCounter`) and
        ``.dataset_size`` (the samples of all shards, the indices' range).

    Raises:
        RecipeError: under ``shards`` (relative to the section) for a missing pattern, missing shards
            or no readable sample, under ``batch_size`` for a batch larger than an epoch.
    """
    from amortize.options import RecipeError

    if not shards:
        raise RecipeError("must name the .tar shards for data.name 'webdataset'", key="shards")
    try:
        urls = expand_shards(shards)
    except ValueError as e:
        raise RecipeError(str(e), key="shards") from None
    sizes = shard_sizes(urls)  # stats / sizes.json / a count cached beside the shards
    total = sum(sizes.values())
    missing = [u for u in urls if "://" not in u and not os.path.isfile(u)]
    if total == 0:
        what = (f"{len(missing)} of the {len(urls)} shards do not exist (first: {missing[0]})" if missing
                else f"none of the {len(urls)} shards holds a readable sample")
        raise RecipeError(f"no training data: {what}; check the pattern {shards!r}", key="shards")
    if missing:  # a shard that vanishes later is skipped and counted as missing_shard
        raise RecipeError(f"{len(missing)} of the {len(urls)} shards do not exist (first: {missing[0]}); "
                          f"fix the pattern {shards!r} or leave those shards out of it", key="shards")
    offsets, start = {}, 0
    for u, n in sizes.items():
        offsets[u], start = start, start + n
    epoch_samples = num_samples or total
    if epoch_samples < batch_size:
        raise RecipeError(f"{batch_size} exceeds the {epoch_samples} samples of an epoch (data.num_samples or the "
                          "shards' count)", key="batch_size")
    counter = SkipCounter(max_skip_fraction, min_seen=skip_min_seen)
    if sampling == "split" and epoch_samples >= total:
        # the epoch's order is a function of (seed, epoch, position): every sample trains once an epoch
        # whatever num_workers is, and a resume starts at its batch without reading what came before
        return ShardEpochs(urls, [sizes[u] for u in urls], transform=open_clip_transform(image_size, is_train=True),
                           tokenizer=tokenizer, batch_size=batch_size, world_size=world_size, epoch_samples=total,
                           seed=seed, shuffle_buffer=shuffle_buffer, drop_last=drop_last, counter=counter)
    # resampled, or split epochs shorter than the shards (one pass, cut at num_samples): batches per process and
    # epoch, split over its DataLoader workers (each counts its own); the loader's length lets Composer convert
    # epochs (max_duration, warmup, save_interval). No data state: a resume spins the loader.
    per_worker, epoch_len = epoch_batches(epoch_samples, batch_size, num_workers, len(urls), world_size,
                                          sampling == "resampled")
    pipeline = make_pipeline(
        urls, transform=open_clip_transform(image_size, is_train=True), tokenizer=tokenizer,
        batch_size=batch_size // world_size, resampled=sampling == "resampled", shuffle_buffer=shuffle_buffer,
        seed=seed, epoch_batches=per_worker, offsets=offsets, drop_last=drop_last, counter=counter, sizes=sizes,
    ).with_length(epoch_len, silent=True)
    pipeline.dataset_size = total
    return pipeline
