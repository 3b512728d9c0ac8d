"""Exact mid-epoch resume on webdataset shards (issue 29) and every sample once with workers (issue 30, item 1).

``amortize train`` on generated img2dataset-style shards with 2 DataLoader workers is SIGKILLed at a
random mid-epoch step and resumed with ``autoresume=true``: the sequence of dataset indices it
trains on equals an uninterrupted run's, its weights are bit-identical, and the checkpoint holds
the data's state (a few integers), so nothing is spun. A checkpoint without data state (written
before this change) resumes by spinning, as it did, and says so.

The killed run is a process of its own (killed with its DataLoader workers, as a preemption kills a
job); the uninterrupted run and the resumes call the CLI's ``main`` in the test's process, on one
thread as the killed run, where warm imports make them take seconds.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amortize.checkpoints import safe_load
from amortize.cli import main
from amortize.train.builders import build_trainer  # noqa: F401  (Composer imported at collection, not in a test)
from amortize.train.model import ContrastiveComposerModel
from tests.data.wds_fixtures import write_shard
from tests.reliability.common import DEFAULT_RECIPE, ROOT, assert_same, wait_for

SHARDS, PER_SHARD, BATCH = 3, 16, 12  # issue 30 item 1: 48 samples, 4 batches an epoch (3 before, on 2 workers)
STEPS = 8  # two epochs
PER_EPOCH = SHARDS * PER_SHARD // BATCH
TIMEOUT = 180

# every training step appends its batch's dataset indices (one line) to $AMORTIZE_INDEX_LOG; with
# $AMORTIZE_HANG_AT=n the n-th step hangs inside its loss (after writing HANGING) until it is killed
PRELUDE = """
import os, time
from amortize.train.model import ContrastiveComposerModel
_real_loss, _steps = ContrastiveComposerModel.loss, [0]
def _logged_loss(self, outputs, batch, *a, **k):
    _steps[0] += 1
    if _steps[0] == int(os.environ.get("AMORTIZE_HANG_AT", 0)):
        open(os.environ["AMORTIZE_INDEX_LOG"] + ".HANGING", "w").close()
        time.sleep(600)
    with open(os.environ["AMORTIZE_INDEX_LOG"], "a") as f:
        f.write(" ".join(str(i) for i in batch["index"].tolist()) + "\\n")
    return _real_loss(self, outputs, batch, *a, **k)
ContrastiveComposerModel.loss = _logged_loss
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("shards")
    for s in range(SHARDS):
        write_shard(folder / f"{s:05d}.tar", s * PER_SHARD, PER_SHARD)
    return str(folder / f"{{00000..{SHARDS - 1:05d}}}.tar")


def _cmd(shards: str, folder: Path, extra: list[str] = ()) -> list[str]:
    return ["train", str(DEFAULT_RECIPE), "model.name=tiny", "device=cpu", "precision=fp32", "data.name=webdataset",
            f"data.shards={shards}", f"data.batch_size={BATCH}", "data.num_workers=2", "data.shuffle_buffer=8",
            "loss.estimator=moving_average", f"max_duration={STEPS}ba", "save_interval=1ba", "seed=3",
            f"save_folder={folder}", "autoresume=true", "eval.tasks=none", "scheduler.t_warmup=2ba",
            "deterministic_mode=true", "log_to_console=false", "progress_bar=false", *extra]


def _start(shards: str, folder: Path, hang_at: int) -> subprocess.Popen:
    """The run to be killed, in its own process group (a preemption kills its DataLoader workers too)."""
    code = f"{PRELUDE}\nimport sys\nfrom amortize.cli import main\nsys.exit(main({_cmd(shards, folder)!r}))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "0",
           "AMORTIZE_INDEX_LOG": str(folder / "killed.txt"), "AMORTIZE_HANG_AT": str(hang_at)}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _batches(log: Path) -> list[list[int]]:
    return [[int(i) for i in line.split()] for line in log.read_text().splitlines()]


def _model(folder: Path) -> dict:
    st = safe_load(folder / "latest-rank0.pt")["state"]
    return {k: v for k, v in st["model"].items() if k != "_extra_state"}


def _train_here(shards: str, folder: Path, mp: pytest.MonkeyPatch) -> tuple[int, list[list[int]]]:
    """``amortize train`` in this process (imports are warm: seconds), on one thread as the killed run;
    the exit status and the dataset indices of every step."""
    steps: list[list[int]] = []
    real_loss = ContrastiveComposerModel.loss

    def logged_loss(self, outputs, batch, *a, **k):
        steps.append(batch["index"].tolist())
        return real_loss(self, outputs, batch, *a, **k)

    mp.setattr(ContrastiveComposerModel, "loss", logged_loss)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(_cmd(shards, folder))
    finally:
        torch.set_num_threads(threads)
        mp.setattr(ContrastiveComposerModel, "loss", real_loss)
    return rc, steps


@pytest.fixture(scope="module")
def killed(shards, tmp_path_factory):
    """A run started in the background that hangs in the middle of a random mid-epoch step (its checkpoints
    written up to the batch before). ``get()`` SIGKILLs it there, once, and returns the batch of its last
    checkpoint and two copies of its folder (one for each resume test)."""
    seed = int(os.environ.get("AMORTIZE_KILL_SEED", random.randrange(1 << 30)))
    hang_at = random.Random(seed).choice([b for b in range(2, STEPS - 1) if (b - 1) % PER_EPOCH])
    folder = tmp_path_factory.mktemp("killed")
    proc = _start(shards, folder, hang_at)
    cache: dict = {}

    def get() -> dict:
        if not cache:
            wait_for(folder, "killed.txt.HANGING", proc, timeout=120.0)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=TIMEOUT)
            assert proc.returncode == -signal.SIGKILL, f"seed {seed}: exit {proc.returncode}"
            killed_at = os.readlink(folder / "latest-rank0.pt")
            batch = int(killed_at.split("-ba")[1].split("-")[0])
            assert batch == hang_at - 1, f"seed {seed}: {killed_at}"
            print(f"seed {seed}: killed in step {hang_at}; resuming from {killed_at}")
            copy = tmp_path_factory.mktemp("killed-copy")
            shutil.copytree(folder, copy, symlinks=True, dirs_exist_ok=True)
            cache.update(batch=batch, folders=[folder, copy], trained=_batches(folder / "killed.txt")[:batch])
        return cache

    yield get
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def reference(shards, killed, tmp_path_factory):
    """An uninterrupted run, in this process while the killed run starts in the background."""
    folder = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        rc, steps = _train_here(shards, folder, mp)
    assert rc == 0
    return {"batches": steps, "model": _model(folder)}


def test_two_workers_train_every_sample_once_an_epoch(reference):
    batches = reference["batches"]
    assert len(batches) == STEPS and all(len(b) == BATCH for b in batches)
    for e in range(2):
        seen = sorted(i for b in batches[e * PER_EPOCH:(e + 1) * PER_EPOCH] for i in b)
        assert seen == list(range(SHARDS * PER_SHARD)), f"epoch {e}"
    assert batches[:PER_EPOCH] != batches[PER_EPOCH:]  # each epoch its own order


def test_dry_run_counts_the_batches_the_run_trains(shards, tmp_path, capsys):
    assert main([*_cmd(shards, tmp_path), "--dry-run"]) == 0
    out = "".join(capsys.readouterr())
    assert f"{PER_EPOCH} batches of {BATCH} per process" in out, out  # the run trains 4 (above)


def test_sigkill_mid_epoch_then_autoresume_trains_the_same_indices_and_weights(reference, killed, shards,
                                                                                monkeypatch, capsys):
    k = killed()
    folder = k["folders"][0]
    data = safe_load(next(folder.glob(f"ep*-ba{k['batch']}-rank0.pt")))["state"]["dataset_state"]["train"]
    assert (data["batch"], data["batch_size"]) == (k["batch"] % PER_EPOCH, BATCH)  # the data's state: integers
    rc, steps = _train_here(shards, folder, monkeypatch)
    out = "".join(capsys.readouterr())
    assert rc == 0 and "resuming from" in out and "spinning" not in out, out[-3000:]
    assert k["trained"] + steps == reference["batches"]  # the same indices in the same order
    assert_same(reference["model"], _model(folder), "model")  # towers, logit scale, per-sample tables


def test_checkpoint_without_data_state_resumes_by_spinning_and_says_so(reference, killed, shards, monkeypatch,
                                                                       capsys):
    k = killed()
    folder = k["folders"][1]
    path = next(folder.glob(f"ep*-ba{k['batch']}-rank0.pt"))
    ck = torch.load(path, weights_only=False)
    ck["state"]["dataset_state"] = {"train": None, "eval": {}}  # as a checkpoint written before this change
    torch.save(ck, path)
    rc, steps = _train_here(shards, folder, monkeypatch)
    out = "".join(capsys.readouterr())
    assert rc == 0 and "holds no data state" in out and "spinning" in out, out[-3000:]
    assert k["trained"] + steps == reference["batches"]  # spun, the loader replays its order of the epoch
    assert_same(reference["model"], _model(folder), "model")
