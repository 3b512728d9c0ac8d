"""Mathematical properties of the objectives in amortize.functional."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import amortize.functional as F
from tests.properties.strategies import feature_batches, pos_weights, scales

open_clip_loss = pytest.importorskip("open_clip.loss")


def weighted_infonce_sum(x, y, s, c, bias=0.0):
    """Sum of the image->text and text->image cross-entropies with the positive weighted by c."""
    S = s * x @ y.T + bias
    B = S.shape[0]
    logw = torch.zeros_like(S)
    idx = torch.arange(B)
    logw[idx, idx] = math.log(c) if c > 0 else -math.inf
    diag = S.diagonal() + (math.log(c) if c > 0 else -math.inf)
    ce_img = (torch.logsumexp(S + logw, dim=1) - diag).mean()
    ce_txt = (torch.logsumexp(S + logw, dim=0) - diag).mean()
    return ce_img + ce_txt


@given(feature_batches(min_b=2), scales, pos_weights, st.floats(-5, 5))
def test_amortized_gradient_equals_infonce_with_exact_normalisers(batch, scale, c, bias):
    """(a) with log norms = log_partition, the amortized loss has InfoNCE's gradient (x, y, scale)."""
    x, y = (t.clone().requires_grad_() for t in batch)
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    lzx, lzy = F.log_partition(x, y, s, bias, pos_weight=c)
    ours = F.amortized_loss(x, y, s, lzx, lzy, bias=bias, pos_weight=c)
    g_ours = torch.autograd.grad(ours, (x, y, s))
    ref = weighted_infonce_sum(x, y, s, c, bias)
    g_ref = torch.autograd.grad(ref, (x, y, s))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9 * max(1.0, scale))


@given(feature_batches(min_b=2), scales)
def test_amortized_with_pos_weight_one_is_twice_infonce_gradient(batch, scale):
    x, y = (t.clone().requires_grad_() for t in batch)
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    lzx, lzy = F.log_partition(x, y, s)
    g1 = torch.autograd.grad(F.amortized_loss(x, y, s, lzx, lzy), (x, y, s))
    g2 = torch.autograd.grad(2 * F.infonce_loss(x, y, s), (x, y, s))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9 * max(1.0, scale))


@given(feature_batches(), scales)
def test_infonce_matches_open_clip(batch, scale):
    """(b) infonce_loss equals open_clip's ClipLoss."""
    x, y = batch
    s = torch.tensor(scale, dtype=torch.float64)
    ref = open_clip_loss.ClipLoss()(x, y, s)
    torch.testing.assert_close(F.infonce_loss(x, y, s), ref, rtol=1e-10, atol=1e-10)


@given(feature_batches(), scales, st.floats(-15, 5))
def test_sigmoid_matches_open_clip(batch, scale, bias):
    """(b) sigmoid_loss equals open_clip's SigLipLoss."""
    x, y = batch
    s = torch.tensor(scale, dtype=torch.float64)
    b = torch.tensor(bias, dtype=torch.float64)
    ref = open_clip_loss.SigLipLoss()(x, y, s, b)
    torch.testing.assert_close(F.sigmoid_loss(x, y, s, b), ref, rtol=1e-10, atol=1e-10)


@given(feature_batches(), scales, pos_weights)
def test_log_partition_matches_direct_sum(batch, scale, c):
    x, y = batch
    if c == 0 and x.shape[0] < 2:
        return
    S = scale * x @ y.T
    W = torch.ones_like(S)
    W.fill_diagonal_(c)
    lzx, lzy = F.log_partition(x, y, scale, pos_weight=c)
    torch.testing.assert_close(lzx, torch.log((W * torch.exp(S)).sum(1)), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lzy, torch.log((W * torch.exp(S)).sum(0)), rtol=1e-9, atol=1e-9)
    assert not lzx.requires_grad


@given(feature_batches(), scales)
def test_log_partition_shift_by_bias(batch, scale):
    """A bias adds exactly to every log partition sum."""
    x, y = batch
    a = F.log_partition(x, y, scale, 0.0)
    b = F.log_partition(x, y, scale, 3.25)
    torch.testing.assert_close(b[0], a[0] + 3.25)
    torch.testing.assert_close(b[1], a[1] + 3.25)


@given(feature_batches(min_b=2), scales, st.floats(-10, 10))
def test_rho_rescaling(batch, scale, rho):
    """L / sg(s) + rho / s: value and the scale gradient -L'... only through rho / s."""
    x, y = batch
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    lzx, lzy = F.log_partition(x, y, s)
    plain = F.amortized_loss(x, y, s, lzx, lzy)
    resc = F.amortized_loss(x, y, s, lzx, lzy, rho=rho)
    torch.testing.assert_close(resc, plain / scale + rho / scale)
    (gs,) = torch.autograd.grad(resc, s)
    (gp,) = torch.autograd.grad(plain, s)
    torch.testing.assert_close(gs, gp / scale - rho / scale**2)


@pytest.mark.parametrize("kind", sorted(F.AMORTIZATION_OBJECTIVES))
@given(
    st.lists(st.floats(-30, 120), min_size=1, max_size=32),
    st.lists(st.floats(-3, 3), min_size=32, max_size=32),
    st.sampled_from([0.0, 0.1]),
)
def test_stage1_objectives_minimised_at_target(kind, targets, offsets, l2):
    """(c) zero gradient at log_lambda = log_target, larger loss elsewhere."""
    t = torch.tensor(targets, dtype=torch.float64)
    at = t.clone().requires_grad_()
    v0 = F.amortization_loss(at, t, kind, log_l2_weight=l2)
    (g,) = torch.autograd.grad(v0, at)
    assert float(v0) == pytest.approx(0.0, abs=1e-12)
    assert float(g.abs().max()) <= 1e-12
    off = torch.tensor(offsets[: len(targets)], dtype=torch.float64)
    if float(off.abs().max()) > 1e-6:
        assert float(F.amortization_loss(t + off, t, kind, log_l2_weight=l2)) > 0.0


@pytest.mark.parametrize("kind", sorted(F.AMORTIZATION_OBJECTIVES))
def test_stage1_objectives_descend_towards_target(kind):
    """Gradient descent from a wrong guess converges to the target, for every objective."""
    t = torch.tensor([2.0, 10.0, -1.0, 40.0], dtype=torch.float64)
    ll = (t + torch.tensor([1.5, -1.5, 0.7, -0.4], dtype=torch.float64)).requires_grad_()
    opt = torch.optim.SGD([ll], lr=0.5)
    for _ in range(400):
        opt.zero_grad()
        F.amortization_loss(ll, t, kind).backward()
        opt.step()
    torch.testing.assert_close(ll.detach(), t, atol=1e-3, rtol=0)


def test_kl_is_not_minimised_at_e_times_target():
    """The authors' f(t) = t log t is minimised at lambda = e Z; ours at lambda = Z."""
    t = torch.zeros(1, dtype=torch.float64)
    at_target = F.amortization_loss(t.clone(), t, "kl")
    at_e = F.amortization_loss(t + 1.0, t, "kl")
    assert float(at_target) < float(at_e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("objective", ["amortized", "infonce", "sigmoid"])
def test_finite_at_scale_100_in_half_precision(dtype, objective):
    """(f) finite losses and gradients at the clamp s = 100 for fp16 and bf16 inputs."""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(64, 32, generator=g), dim=-1)
    x = base.to(dtype).requires_grad_()
    y = torch.nn.functional.normalize(base + 0.01 * torch.randn(64, 32, generator=g), dim=-1).to(dtype)
    y.requires_grad_()
    s = torch.tensor(100.0, requires_grad=True)
    if objective == "amortized":
        lzx, lzy = F.log_partition(x, y, s, pos_weight=1e-3)
        loss = F.amortized_loss(x, y, s, lzx, lzy, pos_weight=1e-3, rho=8.5)
    elif objective == "infonce":
        loss = F.infonce_loss(x, y, s)
    else:
        loss = F.sigmoid_loss(x, y, s, torch.tensor(-10.0))
    grads = torch.autograd.grad(loss, (x, y, s))
    assert torch.isfinite(loss)
    for gr in grads:
        assert torch.isfinite(gr.float()).all()
    assert grads[0].dtype == dtype


def test_reverse_kl_is_unbiased_in_linear_space_over_random_targets():
    """Over noisy targets, reverse_kl's minimiser is log E[Z]; log-L2's is E[log Z] (lower, by Jensen)."""
    g = torch.Generator().manual_seed(0)
    log_z = torch.randn(4096, generator=g, dtype=torch.float64) * 1.0 + 5.0  # log-normal Z
    expected = float(torch.logsumexp(log_z, 0) - math.log(len(log_z)))  # log E[Z]
    fits = {}
    for kind in ("reverse_kl", "log_l2"):
        ll = torch.full((1,), 5.0, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([ll], lr=0.05)
        for _ in range(800):
            opt.zero_grad()
            F.amortization_loss(ll.expand(len(log_z)), log_z, kind).backward()
            opt.step()
        fits[kind] = float(ll)
    assert fits["reverse_kl"] == pytest.approx(expected, abs=1e-2)
    assert fits["log_l2"] == pytest.approx(float(log_z.mean()), abs=1e-2)
    assert fits["log_l2"] < expected - 0.4  # Jensen gap sigma^2 / 2 = 0.5
