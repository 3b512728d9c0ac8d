"""The GPU benchmark script runs end to end in its CPU smoke mode."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_benchmark.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The same build/step/measure code the GPU run uses, on the 1.6M-parameter "tiny" towers with no
# --precision given: on a CPU that must resolve to fp32 (bf16 autocast is emulated on CPUs without
# native bf16 and took over 300 s with ViT-B/32 on an AMD EPYC). 3 to 7 s on a busy 2-core AMD EPYC;
# one thread, so the same work on any core count.
def test_gpu_benchmark_cpu_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--model", "tiny", "--batch-size", "8",
         "--steps", "2", "--warmup", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert (summary["device"], summary["model"], summary["precision"]) == ("cpu", "tiny", "fp32")
    assert (summary["batch_size"], summary["image_size"]) == (8, 28)
    clip, amor = summary["results"]
    assert (clip["method"], amor["method"]) == ("clip", "amorlip")
    for r in (clip, amor):
        assert len(r["times_s"]) == 2 and r["median_step_s"] > 0 and r["peak_memory_bytes"] > 0
        assert r["context_length"] == 16 and r["parameters"] == clip["parameters"] > 1e6
        assert r["flops_per_step"] > 1e7 and r["mfu"] > 0
    # the amortizer's inner fits are matmuls too, so an AmorLIP step counts more FLOPs than a CLIP step
    assert amor["flops_per_step"] > clip["flops_per_step"]
    assert summary["step_overhead"] == pytest.approx(amor["median_step_s"] / clip["median_step_s"] - 1)
    assert "AmorLIP step overhead" in proc.stdout


def test_gpu_benchmark_precision_depends_on_the_device():
    bench = _load_script()
    assert bench.resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert bench.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert bench.resolve_precision("bf16", torch.device("cpu")) == "bf16"  # allowed, documented as slow
    assert bench.resolve_precision("fp32", torch.device("cuda")) == "fp32"
    with pytest.raises(ValueError, match="valid: auto, bf16, fp32"):
        bench.resolve_precision("fp16", torch.device("cpu"))


# the microbatch mode (gradient cache, one microbatch size) runs end to end, on the tiny towers
def test_gpu_benchmark_microbatch_mode_cpu_smoke(tmp_path):
    out = tmp_path / "mb.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--model", "tiny",
         "--batch-size", "4", "--steps", "1", "--warmup", "0", "--microbatch-sizes", "3", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["microbatch"]
    assert [r["microbatch"] for r in rows] == [3]
    assert all(r["median_step_s"] > 0 and r["peak_memory_bytes"] > 0 for r in rows)
