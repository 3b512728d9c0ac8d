"""Gradient-cached microbatching on two gloo processes (DDP towers, ``no_sync`` but for the last backward).

``gather`` and ``ring``: after two AdamW steps every process holds the parameters, AdamW state and
estimator state of one process training on the whole global batch, its gradients are the global
ones, and the mean of the processes' losses is the global loss, for every method and random
microbatch sizes. ``local`` (its negatives are the process's own rows): the gradient cache equals
the same two-process run without microbatching.
"""

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "properties"))
import dist_harness as H  # noqa: E402
import gradcache_cases as C  # noqa: E402
from test_gradcache import METHODS, assert_same  # noqa: E402

pytestmark = pytest.mark.multiprocess
WORLD = 2


@settings(max_examples=1, deadline=None, phases=[Phase.generate])  # each example starts 2 processes
@given(
    b_local=st.integers(2, 6),
    microbatches=st.lists(st.integers(1, 6), min_size=len(METHODS), max_size=len(METHODS)),
    d=st.integers(3, 6),
    seed=st.integers(0, 10_000),
    chunk=st.one_of(st.none(), st.integers(1, 5)),
)
def test_two_processes_with_gradient_cache_equal_one_whole_batch(b_local, microbatches, d, seed, chunk, tmp_path_factory):
    cases = []
    for mode in ("gather", "ring"):
        for (objective, estimator), mb in zip(METHODS, microbatches):
            cases.append(dict(objective=objective, estimator=estimator, mode=mode, N=WORLD * b_local, d=d, seed=seed,
                              chunk=chunk, pos_weight=1e-3 if objective == "amortized" else 1.0, dropout=0.0,
                              microbatch=min(mb, b_local), steps=2))
    local = dict(objective="sigmoid", estimator=None, mode="local", N=WORLD * b_local, d=d, seed=seed, chunk=chunk,
                 dropout=0.0, microbatch=max(1, b_local - 1), steps=2)
    cases += [dict(local, method="gradcache"), dict(local, method="whole")]
    cases = [dict(c, harness="gradcache") for c in cases]
    results = H.launch(cases, WORLD, tmp_path_factory.mktemp("gradcache"))
    for i, case in enumerate(cases[:-2]):
        ref = C.run(case, "whole")
        label = f"{case['objective']}/{case['estimator']}/{case['mode']} B={b_local} mb={case['microbatch']} chunk={chunk}"
        per_rank = [results[r][i] for r in range(WORLD)]
        torch.testing.assert_close(torch.stack([p["loss"] for p in per_rank]).mean(0), ref["loss"], rtol=1e-5,
                                   atol=1e-5, msg=lambda m: f"{label} mean loss: {m}")
        for r, got in enumerate(per_rank):
            assert_same(dict(got, loss=ref["loss"]), ref, f"{label} rank {r}", tol=2e-5)
    for r in range(WORLD):
        assert_same(results[r][-2], results[r][-1], f"sigmoid/local rank {r}")
