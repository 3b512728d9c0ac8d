"""Benchmarks (``make bench-all``): pytest-benchmark timings plus the measurements behind docs/benchmarks.md.

Each test records its numbers in ``benchmark.extra_info`` (so they land in
``results/benchmarks/results.json``) and in the session collector of ``conftest.py``, which writes
``results/benchmarks/<name>.json``, ``.md`` and ``.png`` at the end of the session. The studies'
short run is ``tests/studies/test_study_quick.py`` (``make bench-all``).

``AMORTIZE_BENCH=quick`` (``make bench``) keeps the quick set: the losses at the smallest B, the
estimator accuracy at the two smallest B and the step overhead at batch 32 (no microbatch sweep);
its numbers go to ``results/benchmarks/results.json`` only, so the committed reports of the full
set are not replaced by partial ones.
"""

import os

import pytest

from benchmarks import estimator_accuracy, loss_speed, microbatch, step_overhead
from benchmarks.common import RESULTS

pytestmark = pytest.mark.benchmark

QUICK = os.environ.get("AMORTIZE_BENCH", "all") == "quick"
"""``make bench``: the quick set (see the module docstring); ``make bench-all``: every benchmark."""
full_only = pytest.mark.skipif(QUICK, reason="AMORTIZE_BENCH=quick (make bench): run by make bench-all")


@pytest.mark.parametrize("variant,B", [c for c in loss_speed.all_cases() if not QUICK or c[1] == loss_speed.SIZES[0]], ids=lambda v: str(v).replace(" ", "_"))
def test_loss_forward_backward(benchmark, variant, B):
    run = loss_speed.step_fn(variant, B)
    benchmark.pedantic(run, rounds=loss_speed.rounds_for(B), iterations=1, warmup_rounds=1)
    result = loss_speed.measure(variant, B, time_it=False)
    result.update(min_s=benchmark.stats.stats.min, median_s=benchmark.stats.stats.median)
    benchmark.extra_info.update(result)
    RESULTS["loss_speed"].append(result)


@pytest.mark.parametrize("B", estimator_accuracy.SIZES[:2] if QUICK else estimator_accuracy.SIZES)
def test_estimator_accuracy(benchmark, B):
    result = benchmark.pedantic(estimator_accuracy.run, args=(B,), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    RESULTS["estimator_accuracy"].append(result)


@pytest.mark.parametrize("batch", [32] if QUICK else [32, 256])
def test_step_overhead(benchmark, batch):
    result = benchmark.pedantic(step_overhead.run, kwargs={"batch": batch}, rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in result.items() if k != "times_s"})
    RESULTS["step_overhead"].append(result)


@full_only
def test_microbatch_memory_and_time(benchmark):
    result = benchmark.pedantic(microbatch.run, rounds=1, iterations=1)
    rows = {r["microbatch"]: r for r in result["rows"]}
    benchmark.extra_info.update({f"peak_bytes_mb{k}": r["peak_bytes"] for k, r in rows.items()})
    benchmark.extra_info.update({f"median_s_mb{k}": r["median_s"] for k, r in rows.items()})
    RESULTS["microbatch"].append(result)
    # the activations shrink with the microbatch: the smallest microbatch needs less than the whole batch
    assert rows[min(rows)]["peak_bytes"] < rows[max(rows)]["peak_bytes"]

