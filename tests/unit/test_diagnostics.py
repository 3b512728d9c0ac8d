"""amortize.diagnostics: the estimator monitor warns on a stale or biased normaliser, and only then."""

import warnings

import pytest
import torch

from amortize.diagnostics import EstimatorMonitor, EstimatorWarning, quarter_means


def _epoch(mon, offsets, B=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mon.start_epoch(0)
    for off in offsets:
        lz = torch.randn(B, generator=g) + 5.0
        mon.update(lz, lz - off, lz, lz - off)
    return mon.end_epoch()


def test_quarter_means_by_hand():
    assert quarter_means(torch.arange(8.0)) == (0.5, 6.5)
    assert quarter_means(torch.tensor([3.0])) == (3.0, 3.0)
    with pytest.raises(ValueError, match="non-empty 1-d"):
        quarter_means(torch.zeros(0))


def test_an_exact_normaliser_never_warns():
    mon = EstimatorMonitor()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = _epoch(mon, [0.0] * 100)
    assert stats["r2_first"] == stats["r2_last"] == stats["r_mean"] == 0.0
    assert mon.warnings == []


def test_an_error_that_grows_over_the_epoch_warns():
    mon = EstimatorMonitor()
    with pytest.warns(EstimatorWarning, match="grew from"):
        stats = _epoch(mon, [0.01 * t for t in range(100)])  # r = t/100: 0 .. 0.99
    assert stats["r2_last"] > 2 * stats["r2_first"]
    assert len(mon.warnings) == 1


def test_a_constant_bias_warns_but_a_small_one_does_not():
    mon = EstimatorMonitor(max_bias=1.0)
    with pytest.warns(EstimatorWarning, match="off the in-batch sums by \\+1.50"):
        _epoch(mon, [1.5] * 60)
    quiet = EstimatorMonitor(max_bias=1.0, warn=False)
    _epoch(quiet, [0.3] * 60)
    assert quiet.warnings == []


def test_a_short_epoch_is_not_judged():
    mon = EstimatorMonitor(min_steps=40, warn=False)
    _epoch(mon, [0.1 * t for t in range(20)])
    assert mon.warnings == [] and mon.end_epoch() is not None
    mon.start_epoch(1)
    assert mon.end_epoch() is None


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="growth"):
        EstimatorMonitor(growth=1.0)
    with pytest.raises(ValueError, match="min_steps"):
        EstimatorMonitor(min_steps=2)


def test_attach_records_training_calls_of_an_estimator_only():
    from amortize.estimators import MovingAverageEstimator

    est = MovingAverageEstimator(8, gamma=0.5)
    mon = EstimatorMonitor(warn=False)
    handle = mon.attach(est)
    mon.start_epoch(0)
    x = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    idx = torch.arange(4)
    est(x, x, torch.full((4,), 2.0), torch.full((4,), 2.0), idx)  # first visit: u = the batch, r = 0
    est(x, x, torch.full((4,), 3.0), torch.full((4,), 3.0), idx)  # u = log(0.5 e^2 + 0.5 e^3)
    est.eval()
    est(x, x, torch.full((4,), 9.0), torch.full((4,), 9.0), idx)  # not recorded
    stats = mon.end_epoch()
    assert stats["steps"] == 2.0
    r = 3.0 - torch.logaddexp(torch.tensor(2.0), torch.tensor(3.0)).item() + torch.log(torch.tensor(2.0)).item()
    assert stats["r_mean"] == pytest.approx(r / 2, rel=1e-5)
    handle.remove()
