"""Resume cost on shards: seconds from process start to the first resumed step, at 10 % and 90 % of an epoch.

Writes ``--samples`` tiny generated samples as img2dataset-style shards, trains one batch to get
a checkpoint, and rewrites that checkpoint's position to 10 % and 90 % of the epoch. Each case
resumes it with ``autoresume=true`` and one more batch to train, and reports the seconds from the
process's start to its first training step:

* ``after``: the checkpoint holds the data's state (this release): the loader starts at the batch;
* ``spin``: the same checkpoint without the data's state (as every checkpoint before it): Composer
  spins the loader, reading and decoding every batch of the epoch before the position;
* ``before`` (``--before DIR``): the package as it was before exact resume (e.g.
  ``git archive cea3191 amortize | tar -x -C DIR``) resuming the checkpoint without data state.

Not a test: a measurement, printed as a table (and as JSON with ``--json``)::

    python benchmarks/resume_cost.py --samples 100000 --batch 1000 --workers 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the resumed process prints the seconds since its start at its first training step, then exits
FIRST_STEP = """
import os, sys, time
from amortize.train.model import ContrastiveComposerModel
_real_loss = ContrastiveComposerModel.loss
def _first(self, *a, **k):
    print(f"FIRST_STEP {time.time() - float(os.environ['BENCH_T0']):.2f}", flush=True)
    os._exit(0)
ContrastiveComposerModel.loss = _first
"""


def write_shards(folder: Path, samples: int, per_shard: int) -> str:
    """Tiny img2dataset-style shards (an 8x8 JPEG and a caption a sample, a ``_stats.json`` a shard)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    n_shards = -(-samples // per_shard)
    pattern = str(folder / f"{{00000..{n_shards - 1:05d}}}.tar")
    if (folder / f"{n_shards - 1:05d}_stats.json").is_file():
        return pattern
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format="JPEG")
        jpegs.append(buf.getvalue())
    for s in range(n_shards):
        n = min(per_shard, samples - s * per_shard)
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(n):
                key = f"{s * per_shard + i:09d}"
                for name, data in ((key + ".jpg", jpegs[i % 64]), (key + ".txt", f"sample {key}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"successes": n}))
    return pattern


def train_args(shards: str, folder: Path, batch: int, workers: int, duration: str) -> list[str]:
    return ["train", str(ROOT / "recipes" / "default.yaml"), "model.name=tiny", "device=cpu", "precision=fp32",
            "data.name=webdataset", f"data.shards={shards}", f"data.batch_size={batch}", f"data.num_workers={workers}",
            "loss.estimator=moving_average", f"max_duration={duration}", "save_interval=1ba", "seed=3",
            f"save_folder={folder}", "autoresume=true", "eval.tasks=none", "scheduler.t_warmup=1ba",
            "log_to_console=false", "progress_bar=false"]


def run(args: list[str], pythonpath: Path, prelude: str = "") -> subprocess.CompletedProcess:
    code = f"{prelude}\nimport sys\nfrom amortize.cli import main\nsys.exit(main({args!r}))"
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "BENCH_T0": repr(time.time())}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)


def place(base_ckpt: Path, folder: Path, batch_in_epoch: int, batch: int, with_state: bool) -> None:
    """A copy of ``base_ckpt`` in ``folder`` whose position is ``batch_in_epoch`` of epoch 0 (latest link too)."""
    import torch

    ck = torch.load(base_ckpt, weights_only=False)
    ts = ck["state"]["timestamp"]["Timestamp"]
    ts.update(batch=batch_in_epoch, batch_in_epoch=batch_in_epoch, sample=batch_in_epoch * batch,
              sample_in_epoch=batch_in_epoch * batch)
    train = ck["state"].get("dataset_state", {}).get("train")
    if with_state:
        assert train is not None, "the base checkpoint holds no data state"
        train.update(batch=batch_in_epoch, epoch=0, num_samples=batch_in_epoch * batch)
    else:
        ck["state"]["dataset_state"] = {"train": None, "eval": {}}
    folder.mkdir(parents=True)
    name = f"ep0-ba{batch_in_epoch}-rank0.pt"
    torch.save(ck, folder / name)
    os.symlink(name, folder / "latest-rank0.pt")
    for f in base_ckpt.parent.iterdir():  # the run's recipe and lock-free side files autoresume reads
        if not f.name.endswith(".pt") and f.is_file() and not f.name.startswith(".lock"):
            shutil.copy(f, folder / f.name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=100_000)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/amortize-resume-cost"))
    p.add_argument("--before", type=Path, default=None, help="a folder holding the package before exact resume")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.9])
    p.add_argument("--modes", nargs="+", default=["after", "spin", "before"], help="which cases to run")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    shards = write_shards(a.work / "shards", a.samples, a.per_shard)
    base = a.work / "base"
    if not (base / "latest-rank0.pt").exists():
        shutil.rmtree(base, ignore_errors=True)
        r = run(train_args(shards, base, a.batch, a.workers, "1ba"), ROOT)
        if r.returncode:
            print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
            return 1
    base_ckpt = (base / "latest-rank0.pt").resolve()
    per_epoch = a.samples // a.batch
    modes = [("after", ROOT, True), ("spin", ROOT, False)] + ([("before", a.before, False)] if a.before else [])
    modes = [m for m in modes if m[0] in a.modes]
    rows = []
    for frac in a.fractions:
        k = max(1, round(frac * per_epoch))
        for mode, path, with_state in modes:
            folder = a.work / f"{mode}-{k}"
            shutil.rmtree(folder, ignore_errors=True)
            place(base_ckpt, folder, k, a.batch, with_state)
            r = run(train_args(shards, folder, a.batch, a.workers, f"{k + 2}ba"), path, FIRST_STEP)
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("FIRST_STEP")), None)
            if line is None:
                print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append({"fraction": frac, "batch": k, "mode": mode, "seconds": float(line.split()[1])})
            print(f"{frac:>5.0%}  batch {k:>5}/{per_epoch}  {mode:<7} {rows[-1]['seconds']:7.2f} s", flush=True)
    if a.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
