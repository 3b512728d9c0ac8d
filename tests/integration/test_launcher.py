"""`composer -n 2 -m amortize.cli train ...`: the real launcher, two CPU processes, gloo."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amortize.checkpoints import safe_load
from amortize.weights_export import load_weights_export
from tests.integration.helpers import RECIPES, tiny_overrides


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_composer_launcher_trains_amorlip_on_two_processes(tmp_path):
    composer = Path(sys.executable).with_name("composer")
    if not composer.exists():
        pytest.skip("the composer launcher is not installed next to this interpreter")
    run = tmp_path / "run"
    overrides = [o for o in tiny_overrides(8, 32, run, "4ba") if not o.startswith(("save_interval", "log_to_console"))]
    overrides += ["save_interval=2ba", "run_name=launcher", "log_to_console=true"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    cmd = [str(composer), "-n", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "--stdout", str(tmp_path / "rank{rank}.out"), "--stderr", str(tmp_path / "rank{rank}.err"),
           "-m", "amortize.cli", "train", str(RECIPES / "amorlip-log-l2-medium.yaml"), *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("rank*.*")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs[-3000:]
    # both ranks finished (exit 0 above); rank 0 wrote the Composer checkpoints (unsharded DDP
    # state is saved once) and the weights export
    assert (run / "ep0-ba4-rank0.pt").exists(), sorted(os.listdir(run))
    assert "state" in safe_load(run / "latest-rank0.pt")  # a whole Composer checkpoint, weights_only
    export = load_weights_export(run / "model.pt")
    assert export["recipe"]["loss"]["estimator"]["name"] == "amortized"
    steps = [v for k, v in export["loss_fn"].items() if k.endswith("estimator.step")]
    assert steps and int(steps[0]) == 4  # the amortizer was fitted on every one of the 4 global batches
    assert all(torch.isfinite(v).all() for v in export["model"].values() if torch.is_tensor(v) and v.is_floating_point())
