"""Collects the measurements of the benchmark tests and writes each benchmark's JSON, table and plot."""

import pytest
import torch

from benchmarks.common import RESULTS


@pytest.fixture(scope="session", autouse=True)
def _write_reports():
    torch.set_num_threads(2)  # the root conftest pins one thread for unit tests; benchmarks use the machine
    yield
    from benchmarks import estimator_accuracy, loss_speed, microbatch, step_overhead

    if RESULTS["loss_speed"]:
        loss_speed.report(RESULTS["loss_speed"])
    if RESULTS["estimator_accuracy"]:
        estimator_accuracy.report(sorted(RESULTS["estimator_accuracy"], key=lambda r: r["B"]))
    if RESULTS["step_overhead"]:
        step_overhead.report(RESULTS["step_overhead"][0])
    if RESULTS["microbatch"]:
        microbatch.report(RESULTS["microbatch"][0])
