"""Chunked objectives equal the dense ones in value and gradients, for every chunk size."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from amortize import functional as F
from amortize.estimators import AmortizedEstimator, InBatchEstimator
from amortize.losses import ContrastiveLoss


@st.composite
def problems(draw, max_b=20):
    b = draw(st.integers(2, max_b))
    d = draw(st.integers(2, 8))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    mix = draw(st.floats(0.0, 0.9))
    y = torch.nn.functional.normalize(mix * x + (1 - mix) * y + 1e-3, dim=-1)
    scale = draw(st.floats(0.5, 100.0))
    bias = draw(st.floats(-10.0, 5.0))
    chunk = draw(st.integers(1, b + 3))  # includes sizes that do not divide B and sizes > B
    return x, y, scale, bias, chunk, g


def _leaves(x, y, scale, bias):
    return (
        x.clone().requires_grad_(),
        y.clone().requires_grad_(),
        torch.tensor(scale, dtype=torch.float64, requires_grad=True),
        torch.tensor(bias, dtype=torch.float64, requires_grad=True),
    )


def _compare(dense_fn, chunk_fn, x, y, scale, bias, rtol=1e-9, atol=1e-9):
    a = _leaves(x, y, scale, bias)
    b = _leaves(x, y, scale, bias)
    la, lb = dense_fn(*a), chunk_fn(*b)
    torch.testing.assert_close(lb, la, rtol=rtol, atol=atol)
    la.backward()
    lb.backward()
    for name, p, q in zip(("x", "y", "scale", "bias"), a, b):
        if p.grad is None:
            assert q.grad is None or torch.all(q.grad == 0), name
            continue
        torch.testing.assert_close(q.grad, p.grad, rtol=rtol, atol=atol, msg=lambda m: f"grad of {name}: {m}")


@given(problems(), st.sampled_from([1.0, 1e-3, 0.5, 0.0]))
def test_amortized_chunked_equals_dense(p, pos_weight):
    x, y, scale, bias, chunk, g = p
    B = x.shape[0]
    lnx = torch.randn(B, generator=g, dtype=torch.float64) + scale * 0.5 + math.log(B)
    lny = torch.randn(B, generator=g, dtype=torch.float64) + scale * 0.5 + math.log(B)
    for cs in (chunk, None):
        _compare(
            lambda x, y, s, b: F.amortized_loss(x, y, s, lnx, lny, b, pos_weight),
            lambda x, y, s, b: F.amortized_loss(x, y, s, lnx, lny, b, pos_weight, chunk_size=cs),
            x, y, scale, bias,
        )


@given(problems())
def test_amortized_terms_chunked_equal_dense_terms(p):
    x, y, scale, bias, chunk, g = p
    B = x.shape[0]
    lnx = torch.randn(B, generator=g, dtype=torch.float64) + 3
    lny = torch.randn(B, generator=g, dtype=torch.float64) + 3
    dense = F.amortized_loss_terms(x, y, scale, lnx, lny, bias, 1e-3)
    chunked = F.amortized_loss_terms(x, y, scale, lnx, lny, bias=bias, pos_weight=1e-3, chunk_size=chunk)
    assert set(chunked) == {"positive", "image", "text"}
    for k in dense:
        torch.testing.assert_close(chunked[k], dense[k], rtol=1e-9, atol=1e-9)


@given(problems())
def test_infonce_chunked_equals_dense(p):
    x, y, scale, bias, chunk, _ = p
    for cs in (chunk, None):
        _compare(
            lambda x, y, s, b: F.infonce_loss(x, y, s),
            lambda x, y, s, b: F.infonce_loss(x, y, s, chunk_size=cs),
            x, y, scale, bias,
        )


@given(problems())
def test_sigmoid_chunked_equals_dense(p):
    x, y, scale, bias, chunk, _ = p
    for cs in (chunk, None):
        _compare(
            lambda x, y, s, b: F.sigmoid_loss(x, y, s, b),
            lambda x, y, s, b: F.sigmoid_loss(x, y, s, b, chunk_size=cs),
            x, y, scale, bias,
        )


@given(problems(), st.sampled_from([1.0, 1e-3, 0.0]))
def test_log_partition_chunked_equals_dense(p, pos_weight):
    x, y, scale, bias, chunk, _ = p
    dense = F.log_partition(x, y, scale, bias, pos_weight)
    chunked = F.log_partition(x, y, scale, bias, pos_weight, chunk_size=chunk)
    for a, b in zip(dense, chunked):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


@settings(max_examples=10)
@given(problems(), st.sampled_from(["in_batch", "amortized"]))
def test_contrastive_loss_chunked_equals_dense(p, est_name):
    x, y, scale, bias, chunk, _ = p
    d = x.shape[1]

    def make(cs):
        torch.manual_seed(0)
        est = InBatchEstimator() if est_name == "in_batch" else AmortizedEstimator(dim=d)
        return ContrastiveLoss("linearized", estimator=est, pos_weight=1e-3, chunk_size=cs)

    a, b = _leaves(x, y, scale, bias), _leaves(x, y, scale, bias)
    oa = make(None)(a[0], a[1], a[2], a[3])
    ob = make(chunk)(b[0], b[1], b[2], b[3])
    for k in oa:
        torch.testing.assert_close(ob[k], oa[k], rtol=1e-7, atol=1e-7)
    oa["loss"].backward()
    ob["loss"].backward()
    for p_, q in zip(a, b):
        torch.testing.assert_close(q.grad, p_.grad, rtol=1e-7, atol=1e-7)


def test_contrastive_loss_matches_functional_dense():
    """The fused single-process path gives the dense functional's value and gradients."""
    g = torch.Generator().manual_seed(3)
    x = torch.nn.functional.normalize(torch.randn(33, 16, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(33, 16, generator=g), dim=-1)
    a, b = _leaves(x, y, 20.0, 0.0), _leaves(x, y, 20.0, 0.0)
    out = ContrastiveLoss("linearized", pos_weight=1e-3)(a[0], a[1], a[2])
    lz = F.log_partition(b[0], b[1], b[2], 0.0, 1e-3)
    ref = F.amortized_loss(b[0], b[1], b[2], lz[0], lz[1], 0.0, 1e-3)
    torch.testing.assert_close(out["loss"], ref, rtol=1e-5, atol=1e-5)
    out["loss"].backward()
    ref.backward()
    for p_, q in zip(a[:3], b[:3]):
        torch.testing.assert_close(p_.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_float32_and_large_scale_are_finite():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(64, 8, generator=g), dim=-1).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn(64, 8, generator=g), dim=-1).requires_grad_()
    lz = F.log_partition(x, y, 100.0, 0.0, 1e-3)
    loss = F.amortized_loss(x, y, 100.0, lz[0], lz[1], 0.0, 1e-3, chunk_size=7)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()


def test_half_inputs_are_upcast():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=-1)
    xb = x.bfloat16().requires_grad_()
    yb = y.bfloat16().requires_grad_()
    loss = F.sigmoid_loss(xb, yb, 10.0, -10.0, chunk_size=5)
    assert loss.dtype == torch.float32
    loss.backward()
    assert xb.grad.dtype == torch.bfloat16
    ref = F.sigmoid_loss(xb.detach().float(), yb.detach().float(), 10.0, -10.0)
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_chunk_size_is_rejected(bad):
    x = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    with pytest.raises(ValueError, match="chunk_size"):
        F.infonce_loss(x, x, 1.0, chunk_size=bad)


def test_chunked_never_holds_the_square_matrix():
    """Largest tensor allocated while the chunked loss runs is (chunk, B), not (B, B)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.biggest = max(Largest.biggest, t.numel())
            return out

    B, d, chunk = 256, 8, 16
    x = torch.nn.functional.normalize(torch.randn(B, d), dim=-1).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn(B, d), dim=-1).requires_grad_()
    with Largest():
        lz = F.log_partition(x, y, 10.0, 0.0, 1e-3, chunk_size=chunk)
        F.amortized_loss(x, y, 10.0, lz[0], lz[1], 0.0, 1e-3, chunk_size=chunk).backward()
        F.infonce_loss(x, y, 10.0, chunk_size=chunk).backward()
        F.sigmoid_loss(x, y, 10.0, -10.0, chunk_size=chunk).backward()
    assert Largest.biggest <= chunk * B
