"""DCL: InfoNCE without the positive in its own normaliser (Yeh et al., ECCV 2022)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from amortize.estimators import InBatchEstimator
from amortize.losses import ContrastiveLoss
from tests.properties.strategies import feature_batches


def _dcl_by_hand(x, y, s):
    S = s * x @ y.T
    off = torch.eye(S.shape[0], dtype=torch.bool)
    neg = S.masked_fill(off, -math.inf)
    return 0.5 * ((torch.logsumexp(neg, 1) - S.diagonal()).mean() + (torch.logsumexp(neg, 0) - S.diagonal()).mean())


@settings(max_examples=30, deadline=None)
@given(feature_batches(min_b=2, max_b=12), st.floats(0.5, 50.0), st.one_of(st.none(), st.integers(1, 4)))
def test_dcl_is_its_papers_loss_with_the_in_batch_linearized_gradient_at_c_zero(batch, s, chunk):
    x, y = (t.clone().requires_grad_(True) for t in batch)
    out = ContrastiveLoss("dcl", chunk_size=chunk)(x, y, torch.tensor(s, dtype=x.dtype))
    ref = _dcl_by_hand(x.detach(), y.detach(), s)
    torch.testing.assert_close(out["loss"].detach().to(ref.dtype), ref, rtol=1e-5, atol=1e-5)
    gx, gy = torch.autograd.grad(out["loss"], (x, y))
    x2, y2 = (t.clone().requires_grad_(True) for t in batch)
    lin = ContrastiveLoss("linearized", estimator=InBatchEstimator(), pos_weight=0.0)(x2, y2, torch.tensor(s, dtype=x.dtype))
    hx, hy = torch.autograd.grad(lin["loss"], (x2, y2))
    # the linearized objective is the two cross-entropies summed, DCL (as InfoNCE) their mean
    torch.testing.assert_close(gx, 0.5 * hx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gy, 0.5 * hy, rtol=1e-4, atol=1e-5)


def test_infonce_keeps_the_positive():
    x = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    y = torch.nn.functional.normalize(x + 0.1 * torch.randn(6, 4), dim=-1)
    s = torch.tensor(10.0)
    dcl, infonce = ContrastiveLoss("dcl")(x, y, s)["loss"], ContrastiveLoss("infonce")(x, y, s)["loss"]
    assert float(dcl) < float(infonce)  # the positive's own share leaves the normaliser
