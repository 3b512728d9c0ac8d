"""SCENT's per-sample estimator: its update's properties, the published update, state and resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import amortize.functional as F
from amortize.estimators import InBatchEstimator, ScentEstimator, build_estimator, scent_update
from amortize.losses import ContrastiveLoss

logs = st.floats(-30.0, 30.0)
alphas = st.floats(-20.0, 20.0)
multipliers = st.floats(0.0, 3.0)


def _t(*v):
    return torch.tensor(v, dtype=torch.float64)


@given(logs, alphas, multipliers, st.floats(-30.0, 30.0))
def test_the_fixed_point_is_g_equal_to_e_u(u, alpha, m, ref):
    """A sample whose batch estimate equals its state keeps it."""
    out = scent_update(_t(u), _t(u), alpha, m, ref)
    torch.testing.assert_close(out, _t(u))


@given(logs, logs, alphas, multipliers, st.floats(-30.0, 30.0))
def test_the_weight_lies_in_zero_one_and_is_sigmoid_of_the_state(u, z, alpha, m, ref):
    """``e^new = (1 - gamma) e^u + gamma e^z`` with ``gamma = sigmoid(alpha + m (u - r))`` in (0, 1)."""
    new = float(scent_update(_t(u), _t(z), alpha, m, ref))
    lo, hi = min(u, z), max(u, z)
    assert lo - 1e-9 <= new <= hi + 1e-9
    gamma = 1.0 / (1.0 + math.exp(-(alpha + m * (u - ref))))
    if abs(u - z) > 0.1 and 1e-6 < gamma < 1 - 1e-6:
        # the weight read back from the update (in a frame where both values are moderate)
        shift = max(u, z)
        recovered = (math.exp(new - shift) - math.exp(u - shift)) / (math.exp(z - shift) - math.exp(u - shift))
        assert 0.0 < recovered < 1.0
        assert recovered == pytest.approx(gamma, rel=1e-6, abs=1e-9)


@given(logs, logs, multipliers)
def test_alpha_to_infinity_gives_the_batch_estimate(u, z, m):
    assert float(scent_update(_t(u), _t(z), math.inf, m)) == z
    # large but finite alpha: the weight is 1 to within float64 for moderate states
    torch.testing.assert_close(scent_update(_t(u), _t(z), 200.0, m if m > 0 else 1.0), _t(z))


def test_an_unseen_sample_takes_the_batch_estimate():
    out = scent_update(_t(-math.inf, 1.0), _t(2.0, 3.0), 10.0)
    assert float(out[0]) == 2.0 and 2.0 < float(out[1]) < 3.0


@settings(max_examples=20, deadline=None)
@given(feature_batches_seed=st.integers(0, 10_000), alpha=st.sampled_from([10.0, 3.0, 0.0, -2.0]),
       m=st.sampled_from([1.0, 0.5, 2.0]), scale=st.floats(1.0, 30.0))
def test_it_equals_the_published_update_step_for_step(feature_batches_seed, alpha, m, scale):
    """LibAUC's closed form (``libauc/losses/xc.py``, restated in ``shared/spec/scent.md``) on the
    authors' state: ``u`` = log of the mean over the batch's other samples of ``exp(S_ij - S_ii)``
    (the positive masked out), 0 = never seen. On a dataset whose pairs are fixed (``S_ii`` of a
    sample does not change between its visits) the two frames coincide, and our table, read in the
    authors' frame (``reference="positive"``), follows theirs step for step on random batches."""
    g = torch.Generator().manual_seed(feature_batches_seed)
    N, B, d = 24, 6, 5
    X = torch.nn.functional.normalize(torch.randn(N, d, generator=g, dtype=torch.float64), dim=-1)
    Y = torch.nn.functional.normalize(X + 0.7 * torch.randn(N, d, generator=g, dtype=torch.float64), dim=-1)
    est = ScentEstimator(N, alpha=alpha, alpha_multiplier=m).double()
    u_theirs = torch.zeros(N, dtype=torch.float64)  # the authors' table (image side), 0 = never seen

    def published(u, gval):
        step = (u + torch.log1p(math.exp(alpha) * gval * torch.exp(u * (m - 1)))
                - torch.log1p(math.exp(alpha) * torch.exp(u * m)))
        return torch.where(u == 0, torch.log(gval), step)

    for _ in range(8):
        idx = torch.randperm(N, generator=g)[:B]
        x, y = X[idx], Y[idx]
        S = scale * x @ y.T
        pos = S.diagonal()
        g_theirs = (S - pos[:, None]).exp().masked_fill(torch.eye(B, dtype=torch.bool), 0.0).sum(1) / (B - 1)
        u_theirs[idx] = published(u_theirs[idx], g_theirs)
        lzx, lzy = F.log_partition(x, y, scale, pos_weight=0.0)
        est(x, y, lzx, lzy, idx, scale=torch.tensor(scale, dtype=torch.float64), bias=None, num_negatives=B - 1)
        seen = u_theirs != 0
        ours = est.log_u_x - (scale * (X * Y).sum(1) + math.log(B - 1))  # our table in the authors' frame
        torch.testing.assert_close(ours[seen], u_theirs[seen], rtol=1e-9, atol=1e-9)


def test_reference_none_reads_the_weight_on_the_tables_own_scale():
    est = ScentEstimator(4, alpha=1.0, reference="none")
    assert est.extra_inputs == () and not est.reads_features
    x = torch.zeros(2, 3)
    est(x, x, torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([0, 1]))
    out = est(x, x, torch.tensor([2.0, 2.0]), torch.tensor([2.0, 2.0]), torch.tensor([0, 1]))
    torch.testing.assert_close(out.log_norm_x, scent_update(torch.zeros(2), torch.full((2,), 2.0), 1.0))


def _loss(est):
    return ContrastiveLoss("linearized", estimator=est, pos_weight=1e-3)


def _batches(n_steps, N=20, B=5, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_steps):
        x = torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=-1)
        y = torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=-1)
        yield x, y, torch.randperm(N, generator=g)[:B]


def test_alpha_infinite_is_the_in_batch_estimator_through_the_loss():
    a, b = _loss(ScentEstimator(20, alpha=math.inf)), ContrastiveLoss("linearized", estimator=InBatchEstimator(),
                                                                   pos_weight=1e-3)
    for x, y, idx in _batches(4):
        oa, ob = a(x, y, torch.tensor(8.0), index=idx), b(x, y, torch.tensor(8.0), index=idx)
        torch.testing.assert_close(oa["loss"], ob["loss"])


def test_resume_is_bit_identical():
    """The state is the tables and the epoch: a copy loaded from ``state_dict`` continues identically."""
    whole = _loss(build_estimator("scent", num_samples=20, alpha={"name": "cosine_decay", "start": 10.0,
                                                                    "end": 2.0, "decay_epochs": 3}))
    steps = list(_batches(12))
    for i, (x, y, idx) in enumerate(steps[:6]):
        whole.start_epoch(i // 2, 6)
        whole(x, y, torch.tensor(8.0), index=idx)
    saved = copy.deepcopy(whole.state_dict())
    resumed = _loss(build_estimator("scent", num_samples=20, alpha={"name": "cosine_decay", "start": 10.0,
                                                                      "end": 2.0, "decay_epochs": 3}))
    resumed.load_state_dict(saved)
    for i, (x, y, idx) in enumerate(steps[6:], start=6):
        for loss_fn in (whole, resumed):
            loss_fn.start_epoch(i // 2, 6)
        a = whole(x, y, torch.tensor(8.0), index=idx)
        b = resumed(x, y, torch.tensor(8.0), index=idx)
        assert torch.equal(a["loss"], b["loss"])
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert set(whole.estimator.state_rules()) == {"log_u_x", "log_u_y", "epoch", "max_epochs"}


@pytest.mark.parametrize("bad, message", [
    ({"reference": "mean"}, "unknown reference 'mean'; valid: positive, none"),
    ({"alpha_multiplier": -1.0}, "alpha_multiplier must be finite and >= 0"),
    ({"alpha": math.nan}, "alpha must be a number or \\+inf"),
])
def test_bad_options_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        est = ScentEstimator(4, **bad)
        x = torch.zeros(2, 3)
        est(x, x, torch.zeros(2), torch.zeros(2), torch.tensor([0, 1]), scale=1.0, bias=None, num_negatives=1.0)
