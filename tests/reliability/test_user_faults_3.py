"""Issue 30, the last items: a full disk during a save (the real write path, not a mocked
``torch.save``), and data that is not trained (``data.num_samples`` below the shards' samples, a
truncated shard) said in one line. Numbers in the test names are the issue's items.

Every test goes through the command line (``amortize.cli.main``) on the tiny model and small files.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("open_clip")

from amortize.checkpoints import is_complete
from amortize.cli import main
from tests.data.wds_fixtures import write_shard
from tests.integration.helpers import RECIPES


def _synthetic(folder, *extra: str) -> list[str]:
    """``amortize train`` arguments of a tiny CPU run on synthetic data into ``folder``; ``extra`` wins."""
    given = {e.split("=", 1)[0] for e in extra}
    base = ["model.name=tiny", "precision=fp32", "device=cpu", "data.num_workers=0", f"save_folder={folder}",
            "log_to_console=false", "progress_bar=false", "eval.tasks=none", "data.name=synthetic",
            "data.batch_size=8", "data.num_samples=16", "max_duration=2ba", "scheduler.t_warmup=1ba"]
    return [str(RECIPES / "default.yaml"), *[o for o in base if o.split("=", 1)[0] not in given], *extra]


def _one_line_train_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("amortize train: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------ 10: a full disk during a save


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE as Linux applies it")
def test_10_a_write_the_kernel_refuses_mid_checkpoint_is_one_line_and_latest_stays_whole(tmp_path, capsys):
    """The kernel refuses the write inside ``torch.save``'s zip writer (``RLIMIT_FSIZE``: EFBIG, as a full
    disk gives ENOSPC): the writer raises ``OSError``, then its ``__exit__`` a ``RuntimeError: ... unexpected
    pos ...`` that names no write (the 95-128 line traceback of the issue)."""
    assert main(["train", *_synthetic(tmp_path, "save_interval=1ba")]) == 0
    capsys.readouterr()
    size = os.path.getsize(tmp_path / os.readlink(tmp_path / "latest-rank0.pt"))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, hard))  # Python ignores SIGXFSZ: writes fail with EFBIG
    try:
        code = main(["train", *_synthetic(tmp_path, "save_interval=1ba", "max_duration=4ba", "autoresume=true")])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 2
    err = _one_line_train_error(capsys)
    assert f"could not write {tmp_path / 'ep1-ba3-rank0.pt'}: [Errno 27] File too large" in err, err
    assert "no ep1-ba3-rank0.pt was written" in err and "unexpected pos" not in err
    assert os.readlink(tmp_path / "latest-rank0.pt") == "ep0-ba2-rank0.pt" and is_complete(tmp_path / "latest-rank0.pt")
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or p.name == ".amortize-lock"]


def _mount_tmpfs(folder: Path, size: int) -> bool:
    folder.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None,
                    reason="mounting a small tmpfs needs root")
def test_10_a_real_full_disk_during_a_save_is_one_line_and_latest_stays_whole(tmp_path, capsys):
    """A tmpfs that holds one checkpoint and a half: the second save fills it (ENOSPC)."""
    probe = tmp_path / "probe"
    assert main(["train", *_synthetic(probe, "max_duration=1ba", "save_interval=1ba")]) == 0
    capsys.readouterr()
    size = os.path.getsize(probe / os.readlink(probe / "latest-rank0.pt"))
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, size * 3 // 2):
        pytest.skip("could not mount a tmpfs")
    try:
        run = disk / "run"
        assert main(["train", *_synthetic(run, "save_interval=1ba", "max_duration=4ba")]) == 2
        err = _one_line_train_error(capsys)
        assert f"could not write {run / 'ep0-ba2-rank0.pt'}: [Errno 28] No space left on device" in err, err
        assert os.readlink(run / "latest-rank0.pt") == "ep0-ba1-rank0.pt" and is_complete(run / "latest-rank0.pt")
        assert not [p for p in run.iterdir() if ".tmp-" in p.name or p.name == ".amortize-lock"]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=30)


# ------------------------------------------------------------------ 4: data that is not trained, said


def _on_shards(folder, shards: str, *extra: str) -> list[str]:
    """``amortize train`` arguments of a tiny CPU CLIP run on ``shards`` into ``folder``; ``extra`` wins."""
    given = {e.split("=", 1)[0] for e in extra}
    base = ["model.name=tiny", "precision=fp32", "device=cpu", "data.num_workers=0", f"save_folder={folder}",
            "log_to_console=false", "progress_bar=false", "eval.tasks=none", f"data.shards={shards}",
            "data.batch_size=4", "data.num_samples=null", "scheduler.t_warmup=1ba", "max_duration=1ep"]
    return [str(RECIPES / "clip-medium.yaml"), *[o for o in base if o.split("=", 1)[0] not in given], *extra]


def _shards(folder: Path, n: int = 3, per: int = 12) -> str:
    folder.mkdir()
    for s in range(n):
        write_shard(folder / f"{s:05d}.tar", s * per, per)
    return str(folder / f"{{00000..{n - 1:05d}}}.tar")


def test_4_num_samples_below_the_shards_is_said_by_dry_run_and_at_start(tmp_path, capsys):
    """``data.num_samples=12`` on 36 samples: an epoch trains 12, the other 24 never (no shuffling)."""
    shards = _shards(tmp_path / "shards")
    args = _on_shards(tmp_path / "run", shards, "data.num_samples=12", "data.shuffle_buffer=0")
    said = ("data.num_samples=12 trains 12 of the 36 samples of the shards an epoch (3 batches of 4); the other 24 "
            "are never trained (data.shuffle_buffer=0 reads the shards in the same order every epoch)")
    assert main(["train", *args, "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert f"# warning: {said}" in err, err
    assert main(["train", *args]) == 0
    out = capsys.readouterr().out
    assert f"amortize train: warning: {said}" in out, out
    shuffled = _on_shards(tmp_path / "run2", shards, "data.num_samples=30")
    assert main(["train", *shuffled, "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "data.num_samples=30 trains 28 of the 36 samples of the shards an epoch (7 batches of 4); the other 8 are " \
           "not trained in that epoch (each epoch reads the shards in another order" in err, err
    for whole in ("data.num_samples=null", "data.num_samples=36", "data.num_samples=40"):
        assert main(["train", *_on_shards(tmp_path / "run3", shards, whole), "--dry-run"]) == 0
        assert "trains" not in capsys.readouterr().err


@pytest.mark.parametrize("extra", [(), ("data.num_samples=30", "data.shuffle_buffer=0")],
                         ids=["whole-epochs", "one-pass"])
def test_4_a_truncated_shard_says_at_each_epoch_end_how_many_samples_were_not_trained(extra, tmp_path, caplog):
    """The middle shard of three (12 samples each) is cut in half: its samples after the cut are never read;
    each epoch ends with a line counting them (the run goes on: data.max_skip_fraction=1)."""
    shards = _shards(tmp_path / "shards")
    whole = (tmp_path / "shards" / "00001.tar").read_bytes()
    (tmp_path / "shards" / "00001.tar").write_bytes(whole[: len(whole) // 2])
    args = _on_shards(tmp_path / "run", shards, "data.max_skip_fraction=1", "max_duration=2ep", *extra)
    with caplog.at_level(logging.WARNING, logger="amortize.train.callbacks"):
        assert main(["train", *args]) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: epoch ")]
    assert len(lines) == 2, caplog.text
    for epoch, line in enumerate(lines):
        lost = int(line.split("(1 corrupt shard: ")[1].split()[0]) if "corrupt shard" in line else \
            int(line.split("shards: ")[1].split()[0])
        assert 4 <= lost <= 8, line  # 12 samples, half the bytes: about 6 never read
        assert line.startswith(f"data: epoch {epoch}: {lost} of ") and "samples not trained" in line, line
        assert f"{lost} samples lost, never read" in line, line
    assert "1 corrupt shard" in lines[0]
    total = int(lines[0].split(" of ")[1].split()[0])
    assert total == (36 if not extra else 28 + lost), lines  # whole epochs: trained + lost = the shards' 36
