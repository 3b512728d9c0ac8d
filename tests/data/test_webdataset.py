import pytest
import torch

from amortize.data.tokenizer import Tokenizer
from amortize.data.webdataset import (
    SkipCounter,
    TooManySkippedError,
    expand_shards,
    make_pipeline,
    open_clip_transform,
    read_tar_samples,
    shard_offsets,
)

from tests.data.wds_fixtures import write_shard


@pytest.fixture()
def shards(tmp_path):
    for s in range(4):
        write_shard(tmp_path / f"{s:05d}.tar", s * 10, 10, bad={3: "image", 5: "caption", 7: "noimage"} if s == 1 else None,
                    stats=s != 2)
    raw = (tmp_path / "00003.tar").read_bytes()
    (tmp_path / "00003.tar").write_bytes(raw[: len(raw) // 2])  # truncated
    return tmp_path


def _pipeline(shards, counter, **kw):
    return make_pipeline(str(shards / "{00000..00004}.tar"), transform=open_clip_transform(16, True),
                         tokenizer=Tokenizer(16), batch_size=4, counter=counter, **kw)


def test_offsets_from_stats_and_scan(shards):
    urls = expand_shards(str(shards / "{00000..00002}.tar"))
    assert list(shard_offsets(urls).values()) == [0, 10, 20]  # shard 2 counted by scanning


def test_pipeline_skips_and_counts_bad_input(shards):
    counter = SkipCounter(max_skip_fraction=0.5, min_seen=5)
    loader = torch.utils.data.DataLoader(_pipeline(shards, counter, drop_last=False), batch_size=None, num_workers=2)
    idx = []
    for b in loader:
        assert b["image"].shape[1:] == (3, 16, 16) and b["text"].shape[1:] == (16,)
        idx += b["index"].tolist()
    s = counter.skipped
    assert s["missing_shard"] == 1 and s["corrupt_shard"] == 1
    assert s["undecodable_image"] == 1 and s["empty_caption"] == 1 and s["missing_field"] == 1
    assert counter.kept == len(idx)  # counts from both workers reach the main process
    assert len(set(idx)) == len(idx)
    assert set(range(0, 10)) <= set(idx) and set(range(20, 30)) <= set(idx)
    assert not {13, 15, 17} & set(idx)  # the bad samples of shard 1 keep their ordinals
    assert all(30 <= i < 40 for i in idx if i >= 30)
    assert "undecodable_image=1" in counter.summary()


def test_too_many_skips_raise(shards):
    counter = SkipCounter(max_skip_fraction=0.01, min_seen=5)
    with pytest.raises(TooManySkippedError, match="skipped|shards unreadable"):
        for _ in _pipeline(shards, counter, shuffle_buffer=0):
            pass


def test_resampled_epoch_length(shards):
    p = _pipeline(shards, SkipCounter(max_skip_fraction=0.9), resampled=True, epoch_batches=7)
    batches = list(p)
    assert len(batches) == 7 and all(b["image"].shape[0] == 4 for b in batches)


def test_reader_on_missing_file(tmp_path):
    c = SkipCounter()
    assert list(read_tar_samples(str(tmp_path / "nope.tar"), c)) == []
    assert c.skipped["missing_shard"] == 1
    with pytest.raises(ValueError, match="max_skip_fraction"):
        SkipCounter(max_skip_fraction=2)
