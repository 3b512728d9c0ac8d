"""(2) Kill and resume: ``amortize train`` killed with SIGKILL at a random step, or in the middle of
writing a checkpoint, resumes with Composer's autoresume and ends bit-identical to a run that was
never interrupted (CPU, deterministic mode). Checkpoints are renamed into place, so ``latest``
never names a partial file."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amortize.checkpoints import is_complete, safe_load
from amortize.weights_export import load_weights_export
from tests.reliability.common import DEFAULT_RECIPE, ROOT, assert_same, wait_for

STEPS = 16  # 3 batches per epoch: the run crosses epoch starts (AmorLIP re-initialises there)
TIMEOUT = 120


def _cmd(folder: Path) -> list[str]:
    return [
        "train", str(DEFAULT_RECIPE), "model.name=tiny", "data.name=synthetic", "data.batch_size=8",
        "data.num_samples=24", "precision=fp32", "device=cpu", f"max_duration={STEPS}ba", "save_interval=2ba",
        f"save_folder={folder}", "autoresume=true", "deterministic_mode=true", "scheduler.t_warmup=2ba",
        "log_to_console=false", "loss.estimator.beta={name: beta_warmup, final: 0.8, warmup_epochs: 2}",
    ]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "0"}


def _start(folder: Path, prelude: str = "") -> subprocess.Popen:
    code = f"{prelude}\nimport sys\nfrom amortize.cli import main\nsys.exit(main({_cmd(folder)!r}))"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, out[-3000:]
    return out


def _final(folder: Path) -> dict:
    latest = folder / "latest-rank0.pt"
    assert latest.is_symlink() and is_complete(latest)
    ck = safe_load(latest)
    st = ck["state"]
    model = {k: v for k, v in st["model"].items() if k != "_extra_state"}
    return {"model": model, "optimizers": st["optimizers"], "export": load_weights_export(folder / "model.pt")}


def _compare(a: dict, b: dict) -> None:
    assert any(k.startswith("loss_fn.estimator.online") for k in a["model"])  # the amortizer is in there
    assert_same(a["model"], b["model"], "model")  # towers, amortizers, EMA/previous nets, inner Adam
    assert_same(a["optimizers"], b["optimizers"], "optimizers")
    ea, eb = a["export"], b["export"]
    assert_same(ea["model"], eb["model"], "export.model")
    assert_same(ea["loss_fn"], eb["loss_fn"], "export.loss_fn")
    assert ea["timestamp"] == eb["timestamp"] == {"epoch": ea["timestamp"]["epoch"], "batch": STEPS}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, started in the background; the tests collect it when they need it."""
    folder = tmp_path_factory.mktemp("reference")
    proc = _start(folder)
    cache: dict = {}

    def get() -> dict:
        if not cache:
            _finish(proc)
            cache.update(_final(folder))
        return cache

    yield get
    if proc.poll() is None:
        proc.kill()


# Every backward sleeps 20 ms in the killed run (sleeping changes no number), so that the run cannot
# reach its end within the kill's random delay on a fast CPU: the kill lands on the same steps
# whatever the machine's speed.
SLOW_STEPS = """
import time, torch
_real_backward = torch.Tensor.backward
def _slow_backward(self, *a, **k):
    time.sleep(0.02)
    return _real_backward(self, *a, **k)
torch.Tensor.backward = _slow_backward
"""


def test_sigkill_at_a_random_step_then_autoresume_is_exact(reference, tmp_path):
    seed = int(os.environ.get("AMORTIZE_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    after = rng.choice(range(2, STEPS - 5, 2))  # a checkpointed batch at least 6 steps before the end
    delay = rng.uniform(0.0, 0.1)  # under 6 steps of at least 20 ms each: the kill lands mid-run
    proc = _start(tmp_path, prelude=SLOW_STEPS)
    wait_for(tmp_path, f"ep*-ba{after}-rank0.pt", proc, timeout=90.0)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL, f"the run finished before the kill (seed {seed})"
    killed_at = os.readlink(tmp_path / "latest-rank0.pt")
    assert is_complete(tmp_path / "latest-rank0.pt"), killed_at
    out = _finish(_start(tmp_path))  # same command: autoresume picks up latest-rank0.pt
    print(f"seed {seed}: killed {delay:.2f} s after the checkpoint of batch {after}; resumed from {killed_at}")
    assert "checkpoints in" in out
    _compare(reference(), _final(tmp_path))


SLOW_SAVE = """
import os, time, torch
_real_save, _calls = torch.save, [0]
def _slow_save(obj, f, *a, **k):
    _calls[0] += 1
    if _calls[0] == 3:  # the third checkpoint: write half of it, then hang until killed
        import io
        buf = io.BytesIO(); _real_save(obj, buf, *a, **k)
        data = buf.getvalue(); f.write(data[: len(data) // 2]); f.flush()
        open(os.path.join(os.path.dirname(f.name), "WRITING"), "w").close()
        time.sleep(600)
    return _real_save(obj, f, *a, **k)
torch.save = _slow_save
"""


def test_sigkill_during_a_checkpoint_write_leaves_latest_whole(reference, tmp_path):
    proc = _start(tmp_path, prelude=SLOW_SAVE)
    wait_for(tmp_path, "WRITING", proc, timeout=90.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)
    (tmp_path / "WRITING").unlink()
    names = sorted(p.name for p in tmp_path.iterdir())
    partial = [n for n in names if ".tmp-" in n]
    assert partial, names  # the half-written file is under a temporary name ...
    assert not is_complete(tmp_path / partial[0])
    real = [n for n in names if n.startswith("ep") and n.endswith("-rank0.pt")]
    assert all(is_complete(tmp_path / n) for n in real), real  # ... and every real name is whole
    assert is_complete(tmp_path / "latest-rank0.pt") and os.readlink(tmp_path / "latest-rank0.pt") in real
    _finish(_start(tmp_path))
    assert any(n.endswith(".partial") for n in os.listdir(tmp_path))  # moved aside by recover_latest
    _compare(reference(), _final(tmp_path))


# SIGINT's path through the CLI is also tested in the default suite by test_user_path's Ctrl-C test
@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_stop_signal_at_a_random_step_saves_says_how_to_resume_and_resumes_exactly(signum, reference, tmp_path):
    """SIGTERM (a scheduler's preemption) or SIGINT: the batch finishes, a checkpoint and model.pt
    are written, the resume command is printed, exit 128 + signum; the resumed run is exact."""
    seed = int(os.environ.get("AMORTIZE_KILL_SEED", random.randrange(1 << 30)))
    after = random.Random(seed).choice(range(2, STEPS - 5, 2))
    proc = _start(tmp_path, prelude=SLOW_STEPS)
    wait_for(tmp_path, f"ep*-ba{after}-rank0.pt", proc, timeout=90.0)
    os.kill(proc.pid, signum)
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 128 + signum, f"seed {seed}: exit {proc.returncode}\n{out[-3000:]}"
    stopped = os.readlink(tmp_path / "latest-rank0.pt")
    batch = int(stopped.split("-ba")[1].split("-")[0])
    assert after <= batch < STEPS, (seed, stopped)
    assert load_weights_export(tmp_path / "model.pt")["timestamp"]["batch"] == batch  # the export is of the same batch
    assert "Traceback" not in out, out[-3000:]
    assert f"interrupted at epoch" in out and f"batch {batch}; saved" in out
    resume = out.strip().splitlines()[-1]
    assert resume.startswith("resume with: amortize train ") and resume.endswith("autoresume=true"), resume
    assert "'loss.estimator.beta={name: beta_warmup, final: 0.8, warmup_epochs: 2}'" in resume  # quoted
    out = _finish(_start(tmp_path))
    assert f"resuming from {tmp_path / stopped}" in out, out[-2000:]
    _compare(reference(), _final(tmp_path))
