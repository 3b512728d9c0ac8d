"""The studies' short runs (``make bench-all``, ``-m benchmark``): the small-batch regime in 2 epochs."""

import json

import pytest

from studies import small_batch

pytestmark = pytest.mark.benchmark


def test_small_batch_quick(benchmark):
    """The short version of the small-batch regime: 2 epochs, seed 0, B in {16, 64}, five methods."""
    benchmark.pedantic(small_batch.main, args=(["--quick", "--fresh", "--jobs", "1"],), rounds=1, iterations=1)
    summary = json.loads((small_batch.OUT / "small_batch_quick.json").read_text())["summary"]
    cells = {(c["tag"], c["batch"]) for c in summary["cells"]}
    assert cells == {(m, b) for m in small_batch.METHODS for b in (16, 64)}
    benchmark.extra_info.update({f"{c['tag']}_b{c['batch']}_R@1": c["mean"] for c in summary["cells"]})
