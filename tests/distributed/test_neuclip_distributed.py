"""NeuCLIP on two gloo processes: the prototypes stay identical on every rank, and the exact layouts
equal one process (the same fit on the gathered batch, the same restart draw)."""

import pytest
import torch

from tests.distributed import dist_harness as H

pytestmark = pytest.mark.multiprocess


def _case(mode, m):
    return dict(objective="amortized", estimator="neuclip", mode=mode, N=8, d=6, seed=3, steps=4, chunk=None,
                scale=10.0, bias=0.0, pos_weight=0.0, m=m, perms=3)


def test_neuclip_prototypes_are_identical_on_every_rank_and_equal_one_process(tmp_path):
    cases = [_case(mode, m) for mode in ("gather", "ring", "local") for m in (3, 12)]
    results = H.launch(cases, 2, tmp_path)
    for i, case in enumerate(cases):
        label = f"{case['mode']}/m={case['m']}"
        a, b = results[0][i]["state"], results[1][i]["state"]
        protos = [k for k in a if k.endswith(".prototypes")]
        assert len(protos) == 2, sorted(a)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{label}: {k} differs across ranks"
        if case["mode"] == "local":
            continue
        ref = H.run_case(case)
        for k in protos:
            torch.testing.assert_close(a[k], ref["state"][k], rtol=1e-4, atol=1e-4, msg=lambda s: f"{label} {k}: {s}")
        for step, rec in enumerate(ref["records"]):
            got = torch.stack([results[r][i]["records"][step]["loss"] for r in range(2)]).mean()
            torch.testing.assert_close(got, rec["loss"], rtol=1e-4, atol=1e-4)
