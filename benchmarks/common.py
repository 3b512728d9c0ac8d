"""Shared helpers of the benchmarks: timing, peak memory of a child process, JSON and tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_DIR = ROOT / "results"
"""The one folder every benchmark and study writes its results to (``results/benchmarks/``,
``results/studies/``); no script writes beside its code."""

__all__ = ["HERE", "ROOT", "RESULTS_DIR", "results_dir", "machine", "time_call", "peak_rss_in_child", "rss_peak_reset", "rss_peak_since_reset",
           "write_json", "markdown_table"]


def machine() -> dict:
    """A description of the machine the numbers were measured on."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }


def time_call(fn: Callable[[], None], rounds: int, warmup: int = 1) -> dict:
    """Run ``fn`` ``warmup`` times, then time ``rounds`` calls (seconds; min, median, all)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"min_s": min(times), "median_s": statistics.median(times), "times_s": times}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_peak_reset() -> int:
    """Reset the kernel's RSS high-water mark of this process (``/proc/self/clear_refs``); bytes now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") * 1024


def rss_peak_since_reset(base: int) -> int:
    """Peak RSS (``VmHWM``) since :func:`rss_peak_reset` minus the RSS at the reset, in bytes."""
    return _status_kb("VmHWM") * 1024 - base


def peak_rss_in_child(module: str, args: Sequence[str], timeout: float = 900) -> dict:
    """Run ``python -m module args`` in a fresh process that prints one JSON line; return it."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if out.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def results_dir(kind: str) -> Path:
    """``results/<kind>/`` (``benchmarks`` or ``studies``), made if missing."""
    path = RESULTS_DIR / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(name: str, payload: dict, kind: str = "benchmarks") -> Path:
    """Write ``results/<kind>/<name>.json`` (with the machine description) and return its path."""
    path = results_dir(kind) / f"{name}.json"
    payload = {"machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub-markdown table."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


RESULTS: dict[str, list] = {"loss_speed": [], "estimator_accuracy": [], "step_overhead": [], "microbatch": []}
"""Measurements collected by the pytest-benchmark wrappers (``make bench``) during one session;
``tests/benchmarks/conftest.py`` turns them into each benchmark's JSON, table and plot at the end."""
