"""(4) Data: corrupt and truncated shards, a missing shard, undecodable images, empty captions and
missing fields are skipped, counted and reported during a real run; the run stops only past the
recipe's ``data.max_skip_fraction``."""

from __future__ import annotations

import logging

import pytest

from amortize.data.webdataset import TooManySkippedError
from amortize.train.builders import build_trainer
from amortize.train.callbacks import DataSkipReport
from tests.data.wds_fixtures import write_shard
from tests.reliability.common import tiny_recipe


@pytest.fixture()
def bad_shards(tmp_path):
    """Shards 0-3 of 10 samples; shard 1 holds a non-JPEG, a blank caption and a sample without
    image; shard 3 is cut in half; shard 4 exists when the run is built (a shard named in
    data.shards that does not exist is refused before the run) and vanishes before it starts."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for s in range(5):
        write_shard(folder / f"{s:05d}.tar", s * 10, 10, bad={3: "image", 5: "caption", 7: "noimage"} if s == 1 else None)
    raw = (folder / "00003.tar").read_bytes()
    (folder / "00003.tar").write_bytes(raw[: len(raw) // 2])
    return folder


def _recipe(tmp_path, shards, fraction):
    return tiny_recipe(tmp_path / "run", [
        "data.name=webdataset", f"data.shards={shards}/{{00000..00004}}.tar", "data.batch_size=4",
        "data.num_samples=16", "data.shuffle_buffer=8", f"data.max_skip_fraction={fraction}",
        "data.skip_min_seen=5", "loss.estimator={name: moving_average, num_samples: 50}",
    ], duration="4ba")


def test_bad_data_is_skipped_counted_and_reported(tmp_path, bad_shards, caplog):
    trainer = build_trainer(_recipe(tmp_path, bad_shards, 0.5))
    (bad_shards / "00004.tar").unlink()  # gone during the run: skipped and counted
    report = next(c for c in trainer.state.callbacks if isinstance(c, DataSkipReport))
    with caplog.at_level(logging.WARNING, logger="amortize.train.callbacks"):
        trainer.fit()
    trainer.close()
    assert int(trainer.state.timestamp.batch) == 4  # the run went on
    s = report.counter.skipped
    assert s["undecodable_image"] == 1 and s["empty_caption"] == 1 and s["missing_field"] == 1
    assert s["missing_shard"] == 1 and s["corrupt_shard"] == 1
    assert any("undecodable_image=1" in r.getMessage() and "limit 50.00%" in r.getMessage() for r in caplog.records)


def test_too_many_skips_stop_the_run_with_the_counts(tmp_path, bad_shards):
    trainer = build_trainer(_recipe(tmp_path, bad_shards, 0.01))
    (bad_shards / "00004.tar").unlink()
    with pytest.raises(TooManySkippedError, match=r"(skipped \d+ of \d+ samples|shards unreadable).*> 1\.0%"):
        trainer.fit()
    trainer.close()
