"""Properties of the partition-function estimators."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import amortize.functional as F
from amortize.estimators import (
    AmortizedEstimator,
    InBatchEstimator,
    MovingAverageEstimator,
    build_estimator,
)
from amortize.losses import ContrastiveLoss
from tests.properties.strategies import feature_batches, scales


def targets(x, y, s, c=1.0):
    return F.log_partition(x, y, s, pos_weight=c)


@given(feature_batches(min_b=2), scales, st.integers(0, 10_000))
def test_in_batch_and_moving_average_are_permutation_equivariant(batch, scale, seed):
    """(d) permuting the batch permutes the estimates."""
    x, y = (t.float() for t in batch)
    B = x.shape[0]
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(seed))
    index = torch.randperm(50, generator=torch.Generator().manual_seed(seed + 1))[:B] if B <= 50 else None
    lzx, lzy = targets(x, y, scale)
    plzx, plzy = targets(x[perm], y[perm], scale)
    torch.testing.assert_close(plzx, lzx[perm])
    torch.testing.assert_close(plzy, lzy[perm])
    if index is None:
        return
    for warm in (False, True):
        a = MovingAverageEstimator(num_samples=50, gamma=0.3)
        if warm:  # give both a populated table first
            a(x, y, lzx + 0.5, lzy - 0.5, index)
        b = copy.deepcopy(a)
        ea = a(x, y, lzx, lzy, index)
        eb = b(x[perm], y[perm], plzx, plzy, index[perm])
        torch.testing.assert_close(eb.log_norm_x, ea.log_norm_x[perm])
        torch.testing.assert_close(eb.log_norm_y, ea.log_norm_y[perm])
        torch.testing.assert_close(a.log_u_x, b.log_u_x)


@given(feature_batches(min_b=2, max_b=16), scales, st.integers(0, 10_000))
def test_amortized_is_permutation_equivariant(batch, scale, seed):
    """(d) the amortized estimator: same fit and predictions up to float summation order."""
    x, y = (t.float() for t in batch)
    B = x.shape[0]
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(seed))
    lzx, lzy = targets(x, y, scale)
    for normalizer in ("previous_blend", "ema_target"):
        a = AmortizedEstimator(dim=x.shape[1], normalizer=normalizer, ema_every=1)
        b = copy.deepcopy(a)
        for _ in range(2):
            ea = a(x, y, lzx, lzy)
            eb = b(x[perm], y[perm], lzx[perm], lzy[perm])
        torch.testing.assert_close(eb.log_norm_x, ea.log_norm_x[perm], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(eb.log_norm_y, ea.log_norm_y[perm], rtol=1e-4, atol=1e-4)


@given(feature_batches(min_b=1, max_b=20), scales, st.sampled_from(["first_batch", "zero"]))
def test_moving_average_with_gamma_one_is_in_batch(batch, scale, init):
    """(d) gamma = 1 reproduces the in-batch estimate, whatever the table held."""
    x, y = batch
    B = x.shape[0]
    lzx, lzy = targets(x, y, scale)
    ma = MovingAverageEstimator(num_samples=64, gamma=1.0, init=init).double()
    idx = torch.arange(B) * 2
    ma(x, y, lzx - 3.0, lzy + 1.0, idx)  # populate with something else first
    ours = ma(x, y, lzx, lzy, idx)
    ref = InBatchEstimator()(x, y, lzx, lzy)
    torch.testing.assert_close(ours.log_norm_x, ref.log_norm_x)
    torch.testing.assert_close(ours.log_norm_y, ref.log_norm_y)


@given(st.floats(0.05, 0.95), st.lists(st.floats(-20, 20), min_size=2, max_size=6))
def test_moving_average_is_the_linear_space_average(gamma, values):
    """u_t = (1 - gamma) u_{t-1} + gamma z_t, in linear space, first visit taking z."""
    ma = MovingAverageEstimator(num_samples=3, gamma=gamma).double()
    idx = torch.tensor([1])
    u = None
    x = torch.zeros(1, 2, dtype=torch.float64)
    for v in values:
        z = torch.tensor([v], dtype=torch.float64)
        out = ma(x, x, z, z, idx).log_norm_x
        u = torch.exp(z) if u is None else (1 - gamma) * u + gamma * torch.exp(z)
        torch.testing.assert_close(out, torch.log(u))
    assert torch.isneginf(ma.log_u_x[0]) and torch.isneginf(ma.log_u_x[2])


def test_moving_average_eval_mode_does_not_write():
    ma = MovingAverageEstimator(num_samples=4, gamma=0.5)
    ma.eval()
    z = torch.zeros(2)
    ma(torch.zeros(2, 3), torch.zeros(2, 3), z, z, torch.tensor([0, 1]))
    assert torch.isneginf(ma.log_u_x).all()


def clustered_pool(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(4, d, generator=g), dim=-1)
    texts = centers[torch.randint(0, 4, (n,), generator=g)] + 0.4 * torch.randn(n, d, generator=g) / d**0.5
    texts = torch.nn.functional.normalize(texts, dim=-1)
    images = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    return images, texts, g


def test_amortized_estimator_predicts_unseen_pool_members():
    """(e) fitted on a fixed pool, it predicts the exact log partition of held-out members.

    The pool's texts are clustered so that log Z varies (std ~1.4 nats); RMSE must be < 0.05.
    """
    n, d, scale = 8192, 16, 10.0
    images, texts, g = clustered_pool(n, d)
    exact = torch.logsumexp(scale * images @ texts.T, dim=1)
    assert float(exact.std()) > 1.0
    train, test = torch.arange(0, 6144), torch.arange(6144, n)
    est = AmortizedEstimator(
        dim=d,
        normalizer="ema_target",
        lr=2e-3,
        inner_steps=3,
        ema_decay=0.99,
        ema_every=1,
        amortizer={"name": "residual_mlp", "width_factor": 2.0, "init_log_z": float(exact[train].mean())},
    )
    for _ in range(2000):
        b = train[torch.randint(0, len(train), (512,), generator=g)]
        est(images[b], images[b], exact[b], exact[b])
    est.eval()
    pred = est(images[test], images[test], exact[test], exact[test]).log_norm_x
    rmse = float((pred - exact[test]).square().mean().sqrt())
    assert rmse < 0.05, rmse


def test_amortized_beats_in_batch_at_small_batch():
    """At B = 32 the fitted amortizer's estimate of the (rescaled) full-pool sum is closer than
    the in-batch sum's own: the bias/variance argument of AmorLIP, in miniature."""
    n, d, scale, B = 4096, 16, 10.0, 32
    images, texts, g = clustered_pool(n, d, seed=1)
    full = torch.logsumexp(scale * images @ texts.T, dim=1) + torch.log(torch.tensor(B / n))
    est = AmortizedEstimator(
        dim=d, normalizer="ema_target", lr=2e-3, ema_decay=0.99, ema_every=1, amortizer={"name": "residual_mlp", "width_factor": 2.0}
    )
    errs_batch = []
    for _ in range(1500):
        b = torch.randint(0, n, (B,), generator=g)
        lzx, lzy = F.log_partition(images[b], texts[b], scale)
        est(images[b], texts[b], lzx, lzy)
        errs_batch.append((lzx - full[b]).square().mean())
    est.eval()
    b = torch.arange(n)
    pred = est.target["image"](images[b])
    rmse_amortized = float((pred - full).square().mean().sqrt())
    rmse_batch = float(torch.stack(errs_batch[-200:]).mean().sqrt())
    assert rmse_amortized < 0.5 * rmse_batch, (rmse_amortized, rmse_batch)


def test_state_dict_round_trips_exactly(tmp_path):
    """All estimator state (nets, EMA, previous, inner Adam, counters) survives save/load."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=-1)
    idx = torch.arange(16)

    def make():
        return ContrastiveLoss(
            "linearized",
            AmortizedEstimator(dim=8, ema_every=1, beta={"name": "beta_warmup", "final": 0.8, "warmup_epochs": 2}),
            pos_weight=1e-3,
            rho={"name": "piecewise", "values": [8.5, -8.5, -8.5]},
        )

    a = make()
    a.start_epoch(0, 3)
    for _ in range(3):
        a(x, y, torch.tensor(10.0), index=idx)
    a.start_epoch(1, 3)
    a(x, y, torch.tensor(10.0), index=idx)
    torch.save(a.state_dict(), tmp_path / "s.pt")
    b = make()
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), ka
    # and they continue identically
    oa = a(x, y, torch.tensor(10.0), index=idx)
    ob = b(x, y, torch.tensor(10.0), index=idx)
    for k in oa:
        torch.testing.assert_close(oa[k], ob[k], rtol=0, atol=0)
    ma = MovingAverageEstimator(num_samples=16, gamma={"name": "cosine_decay", "start": 1.0, "end": 0.2, "decay_epochs": 4})
    ma(x, y, torch.ones(16), torch.ones(16), idx)
    mb = MovingAverageEstimator(num_samples=16, gamma=0.5)
    mb.load_state_dict(ma.state_dict())
    assert torch.equal(ma.log_u_x, mb.log_u_x)


def test_epoch_start_moves_ema_to_previous_and_reinitialises():
    est = AmortizedEstimator(dim=4, ema_every=1, seed=3)
    x = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1)
    z = torch.full((8,), 3.0)
    est.start_epoch(0, 2)
    fresh0 = copy.deepcopy(est.online.state_dict())
    for _ in range(5):
        est(x, x, z, z)
    ema = copy.deepcopy(est.target.state_dict())
    est.start_epoch(1, 2)
    assert bool(est.has_previous)
    for k, v in est.previous.state_dict().items():
        assert torch.equal(v, ema[k])
    # re-initialised from a seed that depends on the epoch, EMA reset to it, Adam state cleared
    assert any(not torch.equal(v, fresh0[k]) for k, v in est.online.state_dict().items())
    for k, v in est.target.state_dict().items():
        assert torch.equal(v, est.online.state_dict()[k])
    assert len(est._optimizer.state) == 0
    # idempotent: a resumed run calling it again changes nothing
    before = copy.deepcopy(est.state_dict())
    est.start_epoch(1, 2)
    for k, v in est.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k])


def test_previous_blend_epoch_zero_is_in_batch_and_paper_mode_uses_ema():
    x = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1)
    lz = torch.linspace(1.0, 2.0, 8)
    code = AmortizedEstimator(dim=4)
    out = code(x, x, lz, lz)
    torch.testing.assert_close(out.log_norm_x, lz)
    paper = AmortizedEstimator(dim=4, normalizer="ema_target")
    paper.start_epoch(0, 1)
    expected = paper.target["image"](x)  # the normaliser is read before this step's EMA update
    out = paper(x, x, lz, lz)
    torch.testing.assert_close(out.log_norm_x, expected)


def test_amortizer_parameters_never_require_grad_outside_fit():
    est = AmortizedEstimator(dim=4)
    x = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1)
    est(x, x, torch.ones(8), torch.ones(8))
    assert not any(p.requires_grad for p in est.parameters())


def test_build_estimator_by_name():
    assert isinstance(build_estimator("in_batch"), InBatchEstimator)
    assert isinstance(build_estimator("moving_average", num_samples=10, gamma=0.5), MovingAverageEstimator)
    with pytest.raises(ValueError, match="unknown estimator 'nope'.*amortized"):
        build_estimator("nope")
    with pytest.raises(ValueError, match="bad options for estimator 'moving_average'"):
        build_estimator("moving_average", sample_count=3)
