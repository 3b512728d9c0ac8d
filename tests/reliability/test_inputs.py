"""(1) Bad input through the loss module (the unit tests in tests/unit/test_validation.py and
tests/properties/test_objectives.py cover the functional API): every estimator names the problem."""

from __future__ import annotations

import math

import pytest
import torch

from amortize.estimators import AmortizedEstimator, MovingAverageEstimator
from amortize.losses import ContrastiveLoss


def _feats(b=4, d=8, dtype=torch.float32):
    return torch.nn.functional.normalize(torch.randn(b, d), dim=-1).to(dtype)


def _losses():
    return {
        "in_batch": ContrastiveLoss("linearized", pos_weight=1e-3),
        "moving_average": ContrastiveLoss("linearized", estimator=MovingAverageEstimator(8), pos_weight=1e-3),
        "amortized": ContrastiveLoss("linearized", estimator=AmortizedEstimator(dim=8), pos_weight=1e-3),
    }


@pytest.mark.parametrize("name", ["in_batch", "moving_average", "amortized"])
def test_non_finite_and_mismatched_features_are_named(name):
    loss_fn, idx = _losses()[name], torch.arange(4)
    x = _feats().index_fill(0, torch.tensor([2]), math.nan)
    with pytest.raises(ValueError, match="contains NaN"):
        loss_fn(x, _feats(), torch.tensor(10.0), index=idx)
    with pytest.raises(ValueError, match="contains Inf"):
        loss_fn(_feats(), _feats().index_fill(0, torch.tensor([1]), math.inf), torch.tensor(10.0), index=idx)
    with pytest.raises(ValueError, match="same shape"):
        loss_fn(_feats(4), _feats(3), torch.tensor(10.0), index=idx)
    with pytest.raises(ValueError, match="scale must be > 0"):
        loss_fn(_feats(), _feats(), torch.tensor(0.0), index=idx)


def test_moving_average_index_out_of_range_through_the_loss():
    loss_fn = _losses()["moving_average"]
    before = loss_fn.estimator.log_u_x.clone()
    with pytest.raises(IndexError, match=r"values span \[0, 8\] but the estimator holds 8 samples"):
        loss_fn(_feats(), _feats(), torch.tensor(10.0), index=torch.tensor([0, 1, 2, 8]))
    assert torch.equal(before, loss_fn.estimator.log_u_x)  # the refused batch wrote nothing


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b", [2, 8])
def test_scale_at_the_clamp_in_half_precision_is_finite(dtype, b):
    for name, loss_fn in _losses().items():
        x, y = _feats(b, dtype=dtype).requires_grad_(), _feats(b, dtype=dtype).requires_grad_()
        out = loss_fn(x, y, torch.tensor(100.0, dtype=dtype), index=torch.arange(b))
        assert torch.isfinite(out["loss"]), name
        out["loss"].float().backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all(), name


# ------------------------------------------------------------------ issue 19, item 9: the Python API says what is wrong


def test_amortized_estimator_names_a_feature_width_it_was_not_built_for():
    loss_fn = ContrastiveLoss("linearized", estimator=AmortizedEstimator(dim=32), pos_weight=1e-3)
    with pytest.raises(ValueError, match=r"AmortizedEstimator was built with dim=32 but x has shape \(4, 16\)"):
        loss_fn(_feats(d=16), _feats(d=16), torch.tensor(10.0), index=torch.arange(4))


def test_repeated_indices_in_a_moving_average_batch_are_reported(recwarn):
    from amortize import checks

    checks._WARNED.clear()
    loss_fn = ContrastiveLoss("linearized", estimator=MovingAverageEstimator(8), pos_weight=1e-3)
    with pytest.warns(UserWarning, match=r"repeated samples \(first: \[3\]\)"):
        loss_fn(_feats(), _feats(), torch.tensor(10.0), index=torch.tensor([0, 3, 3, 5]))


@pytest.mark.parametrize("owner", ["loss", "estimator"])
@pytest.mark.parametrize("epoch, max_epochs, named", [(-3, 10, "epoch must be a whole number >= 0"),
                                                      (0, 0, "max_epochs must be a whole number >= 1")])
def test_start_epoch_refuses_counts_outside_the_run(owner, epoch, max_epochs, named):
    loss_fn = ContrastiveLoss("linearized", estimator=AmortizedEstimator(dim=8), pos_weight=1e-3)
    target = loss_fn if owner == "loss" else loss_fn.estimator
    with pytest.raises(ValueError, match=named):
        target.start_epoch(epoch, max_epochs)


@pytest.mark.parametrize("objective", ["infonce", "linearized"])
def test_a_bias_an_objective_does_not_use_is_reported(objective):
    from amortize import checks

    checks._WARNED.clear()
    loss_fn = ContrastiveLoss(objective)
    x, y = _feats(), _feats()
    with pytest.warns(UserWarning, match=f"the {objective} objective does not use a logit bias"):
        with_bias = loss_fn(x, y, torch.tensor(10.0), torch.tensor(-5.0))["loss"]
    assert torch.allclose(with_bias, loss_fn(x, y, torch.tensor(10.0))["loss"])  # it has no effect, as said


def test_unnormalised_features_are_reported_once():
    import warnings

    from amortize import checks

    checks._WARNED.clear()
    loss_fn = ContrastiveLoss("infonce")
    with pytest.warns(UserWarning, match="image_features is not L2-normalised"):
        loss_fn(3 * _feats(), _feats(), torch.tensor(10.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_fn(3 * _feats(), _feats(), torch.tensor(10.0))  # once per process
        loss_fn(_feats(), _feats(), torch.tensor(10.0))
