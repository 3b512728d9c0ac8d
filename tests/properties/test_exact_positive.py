"""The exact-positive wrapper: the positive's term exact, the negatives' sums from any estimator."""

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import amortize.functional as F
from amortize.estimators import ESTIMATORS, AmortizedEstimator, ExactPositive, InBatchEstimator
from amortize.estimators.exact_positive import add_positive, remove_positive
from amortize.losses import ContrastiveLoss
from amortize.options import RecipeError
from tests.properties.strategies import feature_batches, scales


def _pos(x, y, s, c):
    return s * (x * y).sum(1) + (math.log(c) if c > 0 else -math.inf)


@given(feature_batches(min_b=2), scales, st.sampled_from([1.0, 1e-3, 0.5]))
def test_remove_then_add_is_the_identity(batch, scale, c):
    """add_positive(remove_positive(log Z)) = log Z, and the negatives' sums are the in-batch sums at c = 0."""
    x, y = batch
    lzx = F.log_partition(x, y, scale, pos_weight=c)[0]
    neg = F.log_partition(x, y, scale, pos_weight=0.0)[0]
    lp = _pos(x, y, scale, c)
    ok = (lp - lzx) < math.log(1 - 1e-4)  # rows where the negatives are not all rounding
    got = remove_positive(lzx, lp)
    torch.testing.assert_close(got[ok], neg[ok], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(add_positive(got, lp)[ok], lzx[ok], rtol=1e-9, atol=1e-9)


def test_a_positive_that_carries_all_of_z_leaves_a_finite_floor():
    """float32 rounding can make Z - c exp(S_ii) zero or negative: the floor keeps it finite."""
    lz = torch.tensor([3.0, 3.0, 3.0])
    lp = torch.tensor([3.0, 3.0 + 1e-6, 2.0])
    out = remove_positive(lz, lp)
    assert torch.isfinite(out).all()
    assert out[0] == pytest.approx(3.0 + math.log(8 * torch.finfo(torch.float32).eps), abs=1e-3)
    assert out[2] == pytest.approx(3.0 + math.log1p(-math.exp(-1.0)), abs=1e-6)


@given(feature_batches(min_b=2, max_b=16), scales, st.sampled_from([1.0, 1e-3]))
def test_wrapping_the_in_batch_estimator_changes_nothing(batch, scale, c):
    """exact_positive(in_batch) returns the in-batch sums: the split is exact where nothing is estimated."""
    x, y = batch
    lzx, lzy = F.log_partition(x, y, scale, pos_weight=c)
    out = ExactPositive(InBatchEstimator())(x, y, lzx, lzy, scale=torch.tensor(scale, dtype=x.dtype), pos_weight=c)
    lp = _pos(x, y, scale, c)
    for got, ref in ((out.log_norm_x, lzx), (out.log_norm_y, lzy)):
        keep = (lp - ref) < math.log(1 - 1e-4)
        torch.testing.assert_close(got[keep], ref[keep], rtol=1e-6, atol=1e-6)


@given(feature_batches(min_b=2, max_b=12, dtype=torch.float64), st.floats(0.5, 20.0))
def test_linearized_with_exact_positive_in_batch_has_clips_gradient(batch, scale):
    """c = 1 and exact_positive(in_batch) through the loss module: CLIP's gradient (the in-batch estimator's)."""
    x0, y0 = batch
    grads = []
    lin = {"name": "linearized", "pos_weight": 1.0}
    for objective, est in ((lin, "in_batch"), (lin, {"name": "exact_positive", "inner": "in_batch"})):
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
        ContrastiveLoss.from_sections(objective, est)(x, y, s)["loss"].backward()
        grads.append((x.grad, y.grad, s.grad))
    for a, b in zip(*grads):  # Z - exp(S_ii) loses digits where the positive carries nearly all of Z
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_the_inner_estimator_sees_the_negatives_and_owns_its_state():
    """The amortizer fits the negatives' sums; its state is under ``inner.`` and round-trips."""
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(16, 8), dim=-1)
    y = torch.nn.functional.normalize(x + 0.3 * torch.randn(16, 8), dim=-1)
    s = torch.tensor(10.0)
    lzx, lzy = F.log_partition(x, y, s, pos_weight=1.0)
    neg_x, neg_y = F.log_partition(x, y, s, pos_weight=0.0)
    est = ContrastiveLoss.from_sections({"name": "linearized", "pos_weight": 1.0},
                                        {"name": "exact_positive", "inner": {"name": "amortized", "lr": 0.01}},
                                        context={"dim": 8, "num_samples": 100}).estimator
    assert isinstance(est.inner, AmortizedEstimator)
    seen = []
    est.inner.register_forward_hook(lambda m, args, out: seen.append(args[2:4]))
    twin = copy.deepcopy(est)
    out = est(x, y, lzx, lzy, scale=s, pos_weight=1.0)
    # float32: Z - exp(S_ii) loses digits where the positive carries most of Z
    torch.testing.assert_close(seen[0][0], neg_x, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(seen[0][1], neg_y, rtol=1e-3, atol=1e-3)
    assert 0.0 < float(out.terms["positive_share"]) < 1.0 and "amortizer_fit" in out.terms
    keys = set(est.state_dict())
    assert keys and all(k.startswith("inner.") for k in keys)
    assert {n for n, _ in est.declared_tensors("estimator.")} == {f"estimator.inner.{n}" for n, _ in
                                                                   est.inner.declared_tensors()}
    twin.load_state_dict(est.state_dict())
    for k, v in est.state_dict().items():
        if isinstance(v, torch.Tensor):  # the inner optimiser's state is a dict (extra state)
            assert torch.equal(v, twin.state_dict()[k]), k


def test_bad_input_is_refused_by_name():
    x = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    lz = torch.zeros(4)
    est = ExactPositive(InBatchEstimator())
    with pytest.raises(ValueError, match="pos_weight"):
        est(x, x, lz, lz, scale=torch.tensor(1.0))
    with pytest.raises(ValueError, match="paired rows and columns"):
        est(x, x[:3], lz, lz[:3], scale=torch.tensor(1.0), pos_weight=1.0)
    with pytest.raises(ValueError, match="wrap the negatives' estimator once"):
        ExactPositive(ExactPositive(InBatchEstimator()))
    with pytest.raises(RecipeError, match="inner"):
        ESTIMATORS.bind({"name": "exact_positive", "inner": {"name": "amortised"}}, "loss.estimator",
                        known=("dim",)).build(dim=8)
    with pytest.raises(ValueError, match="floor"):
        ExactPositive(InBatchEstimator(), floor=0.0)


def test_ddp_and_the_rollback_read_the_inner_estimators_declared_state():
    """DDP's ignore list holds every tensor of the inner amortizer (its nets and counters), under loss_fn.estimator.inner."""
    from amortize.train.compat import loss_state_to_ignore

    loss = ContrastiveLoss.from_sections({"name": "linearized", "pos_weight": 0.03},
                                         {"name": "exact_positive", "inner": "amortized"}, context={"dim": 8})
    ignored = set(loss_state_to_ignore(loss))
    inner = {f"loss_fn.estimator.inner.{n}" for n, _ in loss.estimator.inner.named_parameters()}
    inner |= {f"loss_fn.estimator.inner.{n}" for n, _ in loss.estimator.inner.named_buffers()}
    assert inner and inner <= ignored
