"""The GPU benchmark script runs end to end in its CPU smoke mode."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


# ViT-B/32 on the CPU: about 20 s on an idle 2-core machine; keeps the GPU script from rotting
def test_gpu_benchmark_cpu_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_benchmark.py"), "--device", "cpu", "--batch-size", "8",
         "--steps", "2", "--warmup", "0", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert [r["method"] for r in summary["results"]] == ["clip", "amorlip"]
    for r in summary["results"]:
        assert r["median_step_s"] > 0 and r["flops_per_step"] > 1e9 and r["peak_memory_bytes"] > 0
    assert "AmorLIP step overhead" in proc.stdout


# the microbatch mode (ViT-B/32, gradient cache, one microbatch size) runs end to end
def test_gpu_benchmark_microbatch_mode_cpu_smoke(tmp_path):
    out = tmp_path / "mb.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_benchmark.py"), "--device", "cpu", "--batch-size", "4",
         "--steps", "1", "--warmup", "0", "--precision", "fp32", "--microbatch-sizes", "3", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["microbatch"]
    assert [r["microbatch"] for r in rows] == [3]
    assert all(r["median_step_s"] > 0 and r["peak_memory_bytes"] > 0 for r in rows)
