"""Preemption under Composer's launcher: ``composer -n 2 -m amortize.cli train ...`` stopped by
SIGTERM (what a cluster scheduler sends the job) or Ctrl-C (SIGINT to the terminal's process
group) saves one checkpoint and the export at the same batch on both processes, prints the
resume command and exits with the signal's status; resumed, it ends bit-identical to an
uninterrupted two-process run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amortize.checkpoints import is_complete, safe_load
from amortize.weights_export import load_weights_export
from tests.reliability.common import DEFAULT_RECIPE, ROOT, assert_same, wait_for

COMPOSER = Path(sys.executable).with_name("composer")
STEPS = 12  # 8 samples per process and batch, 32 samples: 2 batches per epoch
TIMEOUT = 240

pytestmark = [pytest.mark.multiprocess,
              pytest.mark.skipif(not COMPOSER.exists(), reason="the composer launcher is not installed")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(folder: Path, steps: int = STEPS) -> list[str]:
    return ["model.name=tiny", "data.name=synthetic", "data.batch_size=8", "data.num_samples=32",
            "data.num_workers=0", "precision=fp32", "device=cpu", f"max_duration={steps}ba",
            "save_interval=2ba", f"save_folder={folder}", "autoresume=true", "deterministic_mode=true",
            "scheduler.t_warmup=2ba", "log_to_console=false", "progress_bar=false", "eval.tasks=none",
            "loss.estimator.beta={name: beta_warmup, final: 0.8, warmup_epochs: 2}"]


# each backward sleeps 50 ms in the stopped run: it cannot reach its end before the signal lands
SLOW = "import time, torch\n_b = torch.Tensor.backward\ntorch.Tensor.backward = lambda self, *a, **k: (time.sleep(0.05), _b(self, *a, **k))[1]\n"


def _launch(folder: Path, logs: Path, slow: bool = False) -> subprocess.Popen:
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "0",
           "MASTER_ADDR": "127.0.0.1"}
    if slow:  # a sitecustomize on the path of both workers slows their backward passes
        (logs / "sitecustomize.py").write_text(SLOW)
        env["PYTHONPATH"] = f"{logs}{os.pathsep}{ROOT}"
    cmd = [str(COMPOSER), "-n", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "--stdout", str(logs / "rank{rank}.out"), "--stderr", str(logs / "rank{rank}.err"),
           "-m", "amortize.cli", "train", str(DEFAULT_RECIPE), *_overrides(folder)]
    # its own process group, as a job step or a terminal has: a signal to the group reaches every process
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _stop(folder: Path, logs: Path, signum: int, after: int = 2) -> tuple[int, str, int]:
    """Start a slowed two-process run, signal its process group after checkpoint ``after``."""
    proc = _launch(folder, logs, slow=True)
    try:
        wait_for(folder, f"ep*-ba{after}-rank0.pt", proc, timeout=180.0, poll=0.02)
        os.killpg(proc.pid, signum)
        out, _ = proc.communicate(timeout=TIMEOUT)  # the pipe closes when rank 0 (which shares it) exits too
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(0.5)
    batch = int(os.readlink(folder / "latest-rank0.pt").split("-ba")[1].split("-")[0])
    return proc.returncode, out, batch


def _check_stopped(folder: Path, logs: Path, code: int, out: str, batch: int, signum: int) -> None:
    rank1 = "".join(p.read_text() for p in sorted(logs.glob("rank1.*")))
    assert "Traceback" not in rank1, rank1[-3000:]
    # the workers print no traceback; Composer's launcher, whose signal handler (installed by
    # importing composer) raises SystemExit(128 + signum), prints that one itself: its code, not ours
    tracebacks = out.count("Traceback")
    assert tracebacks == 0 or (tracebacks == 1 and f"SystemExit: {128 + signum}" in out), out[-4000:]
    assert 2 <= batch < STEPS and is_complete(folder / "latest-rank0.pt")
    assert load_weights_export(folder / "model.pt")["timestamp"]["batch"] == batch
    assert f"batch {batch}; saved" in out, out[-3000:]
    resume = next(ln for ln in out.splitlines() if ln.startswith("resume with: "))
    assert resume.startswith("resume with: composer -n 2 -m amortize.cli train ") and "autoresume=true" in resume
    assert "'loss.estimator.beta={name: beta_warmup, final: 0.8, warmup_epochs: 2}'" in resume
    # the launcher itself died of SIGTERM (-15, the shell's 143), or returned the workers' 130 after Ctrl-C
    assert code in ((-signal.SIGTERM, 143) if signum == signal.SIGTERM else (130,)), (code, out[-3000:])


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_two_processes_save_the_same_batch_and_print_the_resume_command(signum, tmp_path):
    code, out, batch = _stop(tmp_path / "run", tmp_path / "logs", signum)
    _check_stopped(tmp_path / "run", tmp_path / "logs", code, out, batch, signum)


def _final(folder: Path) -> dict:
    st = safe_load(folder / "latest-rank0.pt")["state"]
    return {"model": {k: v for k, v in st["model"].items() if k != "_extra_state"},
            "optimizers": st["optimizers"], "export": load_weights_export(folder / "model.pt")}


@pytest.mark.slow
def test_two_process_sigterm_then_resume_is_bit_identical(tmp_path):
    ref = _launch(tmp_path / "reference", tmp_path / "ref-logs")
    code, out, batch = _stop(tmp_path / "run", tmp_path / "logs", signal.SIGTERM, after=4)
    _check_stopped(tmp_path / "run", tmp_path / "logs", code, out, batch, signal.SIGTERM)
    again = _launch(tmp_path / "run", tmp_path / "logs2")
    out2, _ = again.communicate(timeout=TIMEOUT)
    assert again.returncode == 0, out2[-3000:]
    assert "resuming from" in out2
    out_ref, _ = ref.communicate(timeout=TIMEOUT)
    assert ref.returncode == 0, out_ref[-3000:]
    a, b = _final(tmp_path / "reference"), _final(tmp_path / "run")
    assert_same(a["model"], b["model"], "model")
    assert_same(a["optimizers"], b["optimizers"], "optimizers")
    assert_same(a["export"]["model"], b["export"]["model"], "export.model")
    assert_same(a["export"]["loss_fn"], b["export"]["loss_fn"], "export.loss_fn")
    assert a["export"]["timestamp"]["batch"] == b["export"]["timestamp"]["batch"] == STEPS
