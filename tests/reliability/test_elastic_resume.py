"""Elastic resume through the CLI (issue 29): a run on shards checkpointed mid-epoch on W processes and
resumed with ``autoresume=true`` on W' (1 -> 2 under ``composer -n 2``, and 2 -> 1), the global batch
kept, trains every sample of the interrupted epoch exactly once.

Slow (two gloo processes and their DataLoader workers on the CPU); the default suite's
representative of elastic resume is ``tests/data/test_epoch_order.py::test_elastic_resume_trains_every_remaining_sample_once``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data.wds_fixtures import write_shard
from tests.reliability.common import DEFAULT_RECIPE, ROOT

COMPOSER = Path(sys.executable).with_name("composer")
SHARDS, PER_SHARD, BATCH = 3, 16, 12  # 48 samples, 4 global batches an epoch
TIMEOUT = 300

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow,
              pytest.mark.skipif(not COMPOSER.exists(), reason="the composer launcher is not installed")]

# every process appends its batch's dataset indices to $AMORTIZE_INDEX_LOG.<rank>
LOGGING = """
import os
from amortize.train.model import ContrastiveComposerModel
_real_loss = ContrastiveComposerModel.loss
def _logged_loss(self, outputs, batch, *a, **k):
    with open(os.environ["AMORTIZE_INDEX_LOG"] + "." + os.environ.get("RANK", "0"), "a") as f:
        f.write(" ".join(str(i) for i in batch["index"].tolist()) + "\\n")
    return _real_loss(self, outputs, batch, *a, **k)
ContrastiveComposerModel.loss = _logged_loss
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(shards: str, folder: Path, log: Path, world: int, steps: int) -> None:
    site = folder.parent / f"site-{folder.name}"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(LOGGING)  # imported by every process the launcher starts
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "PYTHONHASHSEED": "0",
           "AMORTIZE_INDEX_LOG": str(log), "MASTER_ADDR": "127.0.0.1"}
    args = ["train", str(DEFAULT_RECIPE), "model.name=tiny", "device=cpu", "precision=fp32", "data.name=webdataset",
            f"data.shards={shards}", f"data.batch_size={BATCH}", "data.num_workers=1", "data.shuffle_buffer=8",
            "loss.estimator=moving_average", f"max_duration={steps}ba", "save_interval=1ba", "seed=3",
            f"save_folder={folder}", "autoresume=true", "eval.tasks=none", "scheduler.t_warmup=1ba",
            "log_to_console=false", "progress_bar=false"]
    launcher = ([str(COMPOSER), "-n", str(world), "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                 "-m", "amortize.cli"] if world > 1 else [sys.executable, "-m", "amortize.cli"])
    proc = subprocess.run(launcher + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


def _indices(log: Path) -> list[int]:
    out: list[int] = []
    for f in sorted(log.parent.glob(log.name + ".*")):
        out += [int(i) for line in f.read_text().splitlines() for i in line.split()]
    return out


@pytest.mark.parametrize("before,after", [(1, 2), (2, 1)])
def test_elastic_resume_through_the_cli_trains_the_interrupted_epoch_once(before, after, tmp_path):
    for s in range(SHARDS):
        write_shard(tmp_path / f"{s:05d}.tar", s * PER_SHARD, PER_SHARD)
    shards = str(tmp_path / f"{{00000..{SHARDS - 1:05d}}}.tar")
    folder = tmp_path / "run"
    _train(shards, folder, tmp_path / "first", before, steps=1)  # stops (and saves) after batch 1 of 4
    _train(shards, folder, tmp_path / "second", after, steps=SHARDS * PER_SHARD // BATCH)  # the epoch's end
    first, second = _indices(tmp_path / "first"), _indices(tmp_path / "second")
    assert len(first) == BATCH and len(second) == 3 * BATCH
    assert sorted(first + second) == list(range(SHARDS * PER_SHARD))  # every sample of the epoch, once
