"""Peak memory and step time of gradient-cached microbatching against the microbatch size (CPU).

``python -m benchmarks.microbatch`` writes ``results/benchmarks/microbatch.{json,md}``.

Model and loss: the default recipe (``recipes/default.yaml``: the ``cpu-small`` towers, AmorLIP's
amortized objective), batch 256 of random inputs, the recipe's AdamW and gradient clipping at 1.0.
One step is what the Composer trainer runs: forward (the first pass when microbatching), loss,
backward, the second pass, clip, optimiser step. Peak memory: each size runs one step in a fresh
process, and the figure is the growth of its resident set (``VmHWM``) over that step, so it
includes the gradients and AdamW's state (the same for every size) and the activations (which
shrink with the microbatch). Step time: one process steps through the sizes in interleaved rounds
(so that drifting machine load hits them alike) after a warm-up round; the median over ``rounds``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Optional, Sequence

import torch

BATCH = 256
SIZES = (256, 128, 64, 32, 16)
"""Microbatch sizes measured; 256 (the whole batch) is the run without microbatching."""


def _setup(batch: int = BATCH):
    from amortize.gradcache import GradientCachePasses
    from amortize.train.builders import build_composer_model
    from amortize.train.config import load_recipe
    from amortize.train.optim import build_optimizer
    from benchmarks.common import ROOT

    torch.manual_seed(0)
    recipe = load_recipe(ROOT / "recipes" / "default.yaml", [f"data.batch_size={batch}"])
    model = build_composer_model(recipe)
    opt = build_optimizer(model, recipe.optimizer)
    size, context = model.model.image_size, model.model.context_length
    data = {"image": torch.randn(batch, 3, size, size), "text": torch.randint(1, 1000, (batch, context)),
            "index": torch.arange(batch)}

    def step(microbatch: int) -> None:
        model.gradient_cache = GradientCachePasses(microbatch) if microbatch < batch else None
        opt.zero_grad(set_to_none=True)
        loss = model.loss(model(data), data)
        loss.backward()
        model.backward_cached()
        torch.nn.utils.clip_grad_norm_(model.model.parameters(), 1.0)
        opt.step()

    return step


def peak_memory(microbatch: int, batch: int = BATCH) -> dict:
    """Peak RSS growth of one step with ``microbatch`` (run in a fresh process): ``{"microbatch", "peak_bytes"}``."""
    from benchmarks.common import rss_peak_reset, rss_peak_since_reset

    step = _setup(batch)
    base = rss_peak_reset()
    step(microbatch)
    return {"microbatch": microbatch, "peak_bytes": rss_peak_since_reset(base)}


def step_times(sizes: Sequence[int], rounds: int, batch: int = BATCH) -> dict[int, list[float]]:
    """Step times of every size, interleaved (one step of each size per round, after one warm-up round)."""
    step = _setup(batch)
    times: dict[int, list[float]] = {mb: [] for mb in sizes}
    for r in range(rounds + 1):
        for mb in sizes:
            t0 = time.perf_counter()
            step(mb)
            if r > 0:
                times[mb].append(time.perf_counter() - t0)
    return times


def run(rounds: int = 3, sizes: Sequence[int] = SIZES, threads: Optional[int] = None) -> dict:
    """Peak memory of every size (each in a fresh process), then their interleaved step times (this process)."""
    from benchmarks.common import peak_rss_in_child

    threads = threads or torch.get_num_threads()
    rows = [peak_rss_in_child("benchmarks.microbatch", ["--child", str(mb), "--threads", str(threads)]) for mb in sizes]
    times = step_times(sizes, rounds)
    for row in rows:
        row.update(median_s=statistics.median(times[row["microbatch"]]), times_s=times[row["microbatch"]])
    return {"batch": BATCH, "model": "cpu-small (recipes/default.yaml)", "rounds": rounds, "threads": threads,
            "rows": rows}


def report(result: dict) -> str:
    """Write ``results/benchmarks/microbatch.{json,md}``; return the table."""
    from benchmarks.common import markdown_table, results_dir, write_json

    rows = sorted(result["rows"], key=lambda r: -r["microbatch"])
    whole = next((r for r in rows if r["microbatch"] >= result["batch"]), rows[0])
    table = markdown_table(
        ["microbatch", "peak memory (MiB)", "vs whole batch", "median step (s)", "vs whole batch"],
        [["whole (256)" if r is whole else r["microbatch"], r["peak_bytes"] / 2**20,
          f"{r['peak_bytes'] / whole['peak_bytes']:.2f}x", r["median_s"], f"{r['median_s'] / whole['median_s']:.2f}x"]
         for r in rows],
    )
    write_json("microbatch", result)
    (results_dir("benchmarks") / "microbatch.md").write_text(table)
    return table


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="timed steps per size (after one warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child is not None:
        print(json.dumps(peak_memory(a.child)))
        return
    print(report(run(a.rounds, threads=a.threads)))


if __name__ == "__main__":
    main()
