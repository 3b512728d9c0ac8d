"""Collects the measurements of the benchmark tests and writes each benchmark's JSON, table and plot."""

import pytest
import torch

from benchmarks.common import RESULTS


@pytest.fixture(autouse=True)
def _two_threads_for_benchmarks(request):
    """Benchmarks run on 2 threads (the root conftest pins 1 for unit tests); the thread count is
    process-wide, so it is set per benchmark and restored after, and the smoke test here (default
    suite) leaves the rest of the suite on its single thread."""
    if request.node.get_closest_marker("benchmark") is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _write_reports():
    yield
    import os

    if os.environ.get("AMORTIZE_BENCH", "all") == "quick":
        return  # make bench: a partial set must not replace the committed reports of make bench-all
    from benchmarks import estimator_accuracy, loss_speed, microbatch, step_overhead

    if RESULTS["loss_speed"]:
        loss_speed.report(RESULTS["loss_speed"])
    if RESULTS["estimator_accuracy"]:
        estimator_accuracy.report(sorted(RESULTS["estimator_accuracy"], key=lambda r: r["B"]))
    if RESULTS["step_overhead"]:
        step_overhead.report(RESULTS["step_overhead"])
    if RESULTS["microbatch"]:
        microbatch.report(RESULTS["microbatch"][0])
