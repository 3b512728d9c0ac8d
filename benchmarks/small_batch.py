"""Small-batch quality: the default CPU recipe at batch 32 and 128 for five methods, three seeds.

    python -m benchmarks.small_batch                     # all runs (hours on a 2-core CPU)
    python -m benchmarks.small_batch --dry-run           # check every recipe override, train nothing
    python -m benchmarks.small_batch --max-duration 2ep --seeds 0

Each run is ``amortize train recipes/default.yaml <method overrides> data.batch_size=B seed=S
run_name=... max_duration=...`` followed by ``amortize eval runs/<run_name> --json``; the JSON
lines ``{task, metric, value}`` are collected into ``benchmarks/small_batch.json`` and a table of
mean and spread (sample standard deviation over seeds) per method, batch and metric in
``benchmarks/small_batch.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/default.yaml"

# overrides of the default (AmorLIP log-L2) recipe that turn it into each method
METHODS: dict[str, list[str]] = {
    "clip": ["method=clip", "loss.objective=infonce", "loss.estimator=in_batch", "loss.rho=null", "loss.pos_weight=1.0"],
    "siglip": ["method=siglip", "loss.objective=sigmoid", "loss.estimator=in_batch", "loss.rho=null",
               "loss.pos_weight=1.0"],
    "sogclr": ["method=sogclr", "loss.estimator=moving_average", "loss.rho=null", "loss.moving_average.gamma=0.9"],
    "fastclip": ["method=fastclip", "loss.estimator=moving_average",
                 "loss.moving_average.gamma={name: cosine_decay, start: 1.0, end: 0.2, decay_epochs: 5}"],
    # the default recipe warms beta up over 3 epochs; a short benchmark run must reach the amortizer
    "amorlip": ["method=amorlip-log-l2", "loss.amortizer.beta={name: beta_warmup, final: 0.8, warmup_epochs: 1}"],
}
BATCHES = (32, 128)
SEEDS = (0, 1, 2)


def _amortize(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("amortize")
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "amortize.cli"]), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=capture, text=True, check=True)


def run_one(method: str, batch: int, seed: int, max_duration: str, dry_run: bool = False) -> list[dict]:
    name = f"small-batch-{method}-b{batch}-s{seed}"
    overrides = METHODS[method] + [f"data.batch_size={batch}", f"seed={seed}", f"run_name={name}",
                                   f"max_duration={max_duration}"]
    if dry_run:
        _amortize("train", RECIPE, *overrides, "--dry-run", capture=True)
        return []
    _amortize("train", RECIPE, *overrides)
    out = _amortize("eval", f"runs/{name}", "--json", capture=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [dict(r, method=method, batch=batch, seed=seed) for r in rows]


def summarise(rows: list[dict]) -> str:
    from benchmarks.common import markdown_table

    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["batch"], r["task"], r["metric"]), []).append(float(r["value"]))
    table = []
    for (method, batch, task, metric), vals in sorted(groups.items()):
        spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
        table.append([method, batch, task, metric, statistics.mean(vals), spread, len(vals)])
    return markdown_table(["method", "batch", "task", "metric", "mean", "std", "seeds"], table)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-duration", default="10ep")
    p.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    p.add_argument("--batches", type=int, nargs="*", default=list(BATCHES))
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--dry-run", action="store_true", help="validate the recipes only")
    a = p.parse_args(argv)
    rows: list[dict] = []
    for method in a.methods:
        for batch in a.batches:
            for seed in a.seeds:
                rows += run_one(method, batch, seed, a.max_duration, a.dry_run)
    if a.dry_run:
        print(f"{len(a.methods) * len(a.batches) * len(a.seeds)} recipes validated")
        return
    from benchmarks.common import HERE, write_json

    write_json("small_batch", {"max_duration": a.max_duration, "rows": rows})
    (HERE / "small_batch.md").write_text(summarise(rows))
    print(summarise(rows))


if __name__ == "__main__":
    main()
