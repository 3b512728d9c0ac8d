"""(g) bad inputs raise errors that name the problem."""

import math

import pytest
import torch

import amortize.functional as F
from amortize.estimators import AmortizedEstimator, MovingAverageEstimator
from amortize.losses import ContrastiveLoss


def feats(b=4, d=3, dtype=torch.float32):
    return torch.nn.functional.normalize(torch.randn(b, d, dtype=dtype), dim=-1)


@pytest.mark.parametrize("fn", ["log_partition", "infonce", "sigmoid", "amortized"])
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: (feats(4, 3), feats(5, 3), 10.0), r"same shape \(B, d\), got \(4, 3\) and \(5, 3\)"),
        (lambda: (feats(4, 3)[0], feats(4, 3)[0], 10.0), r"x must have shape \(B, d\), got shape \(3,\)"),
        (lambda: (feats(), feats(dtype=torch.float64), 10.0), "same dtype"),
        (lambda: (feats().long(), feats().long(), 10.0), "floating-point"),
        (lambda: (feats().index_fill(0, torch.tensor([1]), math.nan), feats(), 10.0), "x contains NaN"),
        (lambda: (feats(), feats().index_fill(0, torch.tensor([0]), math.inf), 10.0), "y contains Inf"),
        (lambda: (feats(), feats(), 0.0), r"scale must be > 0, got 0.0"),
        (lambda: (feats(), feats(), -1.0), r"scale must be > 0"),
        (lambda: (feats(), feats(), torch.tensor(math.nan)), "scale must be finite"),
        (lambda: (feats(), feats(), torch.ones(2)), "scale must be a scalar"),
        (lambda: (feats(0, 3), feats(0, 3), 1.0), "empty batch"),
    ],
)
def test_bad_inputs_are_named(fn, make, message):
    x, y, s = make()
    with pytest.raises((ValueError, TypeError), match=message):
        if fn == "log_partition":
            F.log_partition(x, y, s)
        elif fn == "infonce":
            F.infonce_loss(x, y, s)
        elif fn == "sigmoid":
            F.sigmoid_loss(x, y, s, -10.0)
        else:
            F.amortized_loss(x, y, s, torch.zeros(x.shape[0]), torch.zeros(x.shape[0]))


def test_normaliser_shape_and_nan():
    x, y = feats(), feats()
    with pytest.raises(ValueError, match=r"log_norm_x must have shape \(B,\) = \(4,\), got \(3,\)"):
        F.amortized_loss(x, y, 1.0, torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="log_norm_y contains NaN"):
        F.amortized_loss(x, y, 1.0, torch.zeros(4), torch.full((4,), math.nan))


def test_pos_weight_and_objective_names():
    x, y = feats(1, 3), feats(1, 3)
    with pytest.raises(ValueError, match="pos_weight=0 leaves an empty partition sum"):
        F.log_partition(x, y, 1.0, pos_weight=0.0)
    with pytest.raises(ValueError, match="pos_weight must be a finite float >= 0"):
        F.log_partition(x, y, 1.0, pos_weight=-1.0)
    with pytest.raises(ValueError, match="unknown amortization objective .kld..*valid: js, kl, log_l2, reverse_kl"):
        F.amortization_loss(torch.zeros(2), torch.zeros(2), "kld")
    with pytest.raises(ValueError, match="unknown objective 'clip'"):
        ContrastiveLoss("clip")
    with pytest.raises(ValueError, match="unknown layout"):
        ContrastiveLoss("infonce", layout="allreduce")
    with pytest.raises(ValueError, match="unknown normalizer 'paper'"):
        AmortizedEstimator(dim=3, normalizer="paper")
    with pytest.raises(ValueError, match="computes its own partition function"):
        ContrastiveLoss("infonce", estimator=MovingAverageEstimator(3))


def test_moving_average_index_errors():
    ma = MovingAverageEstimator(num_samples=10)
    x, z = feats(3, 2), torch.zeros(3)
    with pytest.raises(ValueError, match="needs `index`"):
        ma(x, x, z, z)
    with pytest.raises(IndexError, match=r"index out of range: values span \[0, 10\] but the estimator holds 10"):
        ma(x, x, z, z, torch.tensor([0, 5, 10]))
    with pytest.raises(IndexError, match="out of range"):
        ma(x, x, z, z, torch.tensor([-1, 5, 3]))
    with pytest.raises(TypeError, match="integer tensor"):
        ma(x, x, z, z, torch.tensor([0.0, 1.0, 2.0]))


def test_checks_level_can_skip_value_checks():
    x = feats().index_fill(0, torch.tensor([1]), math.nan)
    with F.checks("shapes"):
        out = F.infonce_loss(x, feats(), 1.0)
    assert torch.isnan(out)
    with pytest.raises(ValueError, match="unknown checks level"):
        F.set_checks("some")
    assert F.get_checks() == "full"


@pytest.mark.parametrize("b", [1, 2])
def test_tiny_batches_are_finite(b):
    """Batch sizes 1 and 2: finite losses (with B = 1 InfoNCE is 0, the lone pair is its own partition)."""
    x, y = feats(b, 3).requires_grad_(), feats(b, 3).requires_grad_()
    for obj in ("infonce", "sigmoid", "linearized"):
        loss_fn = ContrastiveLoss(obj, **({"pos_weight": 1.0} if obj == "linearized" else {}))
        out = loss_fn(x, y, torch.tensor(20.0), bias=torch.tensor(-10.0) if obj == "sigmoid" else None)
        assert torch.isfinite(out["loss"])
        out["loss"].backward()


def test_identical_batch_is_finite_and_uninformative():
    """All pairs identical: every score ties, InfoNCE equals log B, gradients w.r.t. features vanish."""
    v = torch.nn.functional.normalize(torch.ones(8, 4), dim=-1)
    x = v.clone().requires_grad_()
    loss = F.infonce_loss(x, v, 50.0)
    torch.testing.assert_close(loss, torch.tensor(math.log(8.0)))
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g).all()


def test_the_functional_linearized_loss_does_not_warn_of_a_bias_nobody_passed():
    """The README's functional example passes no bias: no 'the bias passed has no effect' warning."""
    import warnings

    import amortize.functional as F

    x = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lzx, lzy = F.log_partition(x, y, scale=14.3, pos_weight=1e-3)
        F.amortized_loss(x, y, 14.3, lzx, lzy, pos_weight=1e-3)
        F.amortized_loss_terms(x, y, 14.3, lzx, lzy, pos_weight=1e-3)
