"""Properties of the loss module training runs (``ContrastiveLoss``), for every registered objective.

The functional face runs the same objective modules; these properties are checked on the module a
recipe builds, so no second copy of the math can drift from what is tested.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from amortize import functional as F
from amortize.losses import ContrastiveLoss
from amortize.objectives import OBJECTIVES

NAMES = [n for n in OBJECTIVES.names() if n in ("infonce", "sigmoid", "linearized")]
assert set(NAMES) == {"infonce", "sigmoid", "linearized"}, "a built-in objective lost its registration"


def _loss(name: str, chunk=None, rho=None) -> ContrastiveLoss:
    opts = {"pos_weight": 1e-3} if name == "linearized" else {}
    return ContrastiveLoss(name, chunk_size=chunk, rho=rho, **opts)


def _batch(b: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    y = torch.nn.functional.normalize(x + torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    return x, y


def _run(loss_fn, x, y, scale=7.0, bias=-3.0):
    x = x.clone().requires_grad_()
    y = y.clone().requires_grad_()
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    out = loss_fn(x, y, s, b)
    grads = torch.autograd.grad(out["loss"], (x, y, s), allow_unused=True)
    return out, grads


def _close(a, b, tol=1e-9):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=8, deadline=None)
@given(b=st.integers(2, 12), chunk=st.integers(1, 13), seed=st.integers(0, 10_000))
def test_chunked_equals_dense(name, b, chunk, seed):
    """Dense is the same code with one chunk: any chunk size gives the same loss, terms and gradients."""
    x, y = _batch(b, 5, seed)
    dense, gd = _run(_loss(name), x, y)
    chunked, gc = _run(_loss(name, chunk=chunk), x, y)
    for k in dense:
        _close(chunked[k], dense[k])
    for a, c in zip(gd, gc):
        _close(c, a)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=8, deadline=None)
@given(b=st.integers(2, 10), seed=st.integers(0, 10_000))
def test_permutation_equivariance(name, b, seed):
    """Reordering the pairs leaves the loss unchanged and reorders the feature gradients."""
    x, y = _batch(b, 4, seed)
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(seed))
    out, (gx, gy, gs) = _run(_loss(name), x, y)
    out_p, (gx_p, gy_p, gs_p) = _run(_loss(name), x[perm], y[perm])
    _close(out_p["loss"], out["loss"], 1e-10)
    _close(gx_p, gx[perm], 1e-10)
    _close(gy_p, gy[perm], 1e-10)
    _close(gs_p, gs, 1e-10)


@settings(max_examples=10, deadline=None)
@given(b=st.integers(2, 12), seed=st.integers(0, 10_000), chunk=st.one_of(st.none(), st.integers(1, 5)))
def test_linearized_gradient_equals_infonce_at_exact_normalisers(b, seed, chunk):
    """In-batch normalisers with c = 1: the gradient is that of the SUM of the two cross-entropies (2x InfoNCE)."""
    x, y = _batch(b, 6, seed)
    lin = ContrastiveLoss("linearized", pos_weight=1.0, chunk_size=chunk)
    _, g_lin = _run(lin, x, y, bias=0.0)
    _, g_nce = _run(ContrastiveLoss("infonce", chunk_size=chunk), x, y, bias=0.0)
    for a, c in zip(g_lin, g_nce):
        _close(a, 2.0 * c, 1e-8)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=6, deadline=None)
@given(b=st.integers(2, 8), seed=st.integers(0, 10_000), rho=st.floats(-9.0, 9.0))
def test_temperature_rescaling(name, b, seed, rho):
    """With rho: loss = L / sg(s) + rho / s; feature gradients are divided by s."""
    x, y = _batch(b, 4, seed)
    plain, (gx, gy, gs) = _run(_loss(name), x, y, scale=5.0)
    resc, (hx, hy, hs) = _run(_loss(name, rho=rho), x, y, scale=5.0)
    _close(resc["loss"], plain["loss"] / 5.0 + rho / 5.0)
    _close(hx, gx / 5.0)
    _close(hy, gy / 5.0)
    _close(hs, gs / 5.0 - rho / 25.0)


@pytest.mark.parametrize("name", NAMES)
def test_functional_face_runs_the_same_module(name):
    """``amortize.functional`` returns exactly what the loss module returns."""
    x, y = _batch(9, 5, 3)
    out, _ = _run(_loss(name, chunk=4), x, y)
    s, b = torch.tensor(7.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    if name == "infonce":
        got = F.infonce_loss(x, y, s, chunk_size=4)
    elif name == "sigmoid":
        got = F.sigmoid_loss(x, y, s, b, chunk_size=4)
    else:
        lz = F.log_partition(x, y, s, b, pos_weight=1e-3)
        got = F.amortized_loss(x, y, s, *lz, bias=b, pos_weight=1e-3, chunk_size=4)
    assert torch.equal(got, out["loss"].detach())


@pytest.mark.parametrize("name", NAMES)
def test_a_float_scale_is_accepted_like_the_functional_face(name):
    """``ContrastiveLoss`` takes ``scale`` (and ``bias``) as floats, as ``amortize.functional`` does."""
    x, y = _batch(6, 4, 1)
    out = _loss(name)(x, y, 7.0, -3.0)
    ref, _ = _run(_loss(name), x, y, scale=7.0, bias=-3.0)
    _close(out["loss"].detach(), ref["loss"].detach())


@settings(max_examples=8, deadline=None)
@given(b=st.integers(2, 8), seed=st.integers(0, 10_000), rho=st.floats(-9.0, 9.0), c=st.sampled_from([0.0, 1e-3, 1.0]),
       scale=st.floats(1.0, 30.0))
def test_robust_temperature_is_the_gradient_of_the_robust_global_contrastive_loss(b, seed, rho, c, scale):
    """With exact in-batch normalisers, ``temperature: robust`` gives ``s`` the gradient of NeuCLIP's /
    FastCLIP-v3's ``tau (F + rho)``, ``F = mean_i sum_sides log(c / N + mean_{j != i} exp(S_ij - S_ii))``,
    written here directly and differentiated by autograd; the features' gradients are the rescaled ones."""
    x, y = _batch(b, 4, seed)
    robust = ContrastiveLoss("linearized", pos_weight=c, rho=rho, temperature="robust")
    out, (hx, hy, hs) = _run(robust, x, y, scale=scale, bias=0.0)
    _, (gx, gy, _) = _run(ContrastiveLoss("linearized", pos_weight=c, rho=rho), x, y, scale=scale, bias=0.0)
    _close(hx, gx)
    _close(hy, gy)
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    S = s * x @ y.T
    n = b - 1
    off = ~torch.eye(b, dtype=torch.bool)
    diag = S.diagonal()

    def side(scores):  # log(c / N + mean_{j != i} exp(S_ij - S_ii)) per row
        d = scores - scores.diagonal()[:, None]
        neg = torch.logsumexp(d.masked_fill(~off, -float("inf")), dim=1) - torch.log(torch.tensor(float(n)))
        return torch.logaddexp(neg, torch.log(torch.tensor(c / n))) if c > 0 else neg

    F = (side(S) + side(S.T)).mean()
    want = torch.autograd.grad((F + rho) / s, s)[0]
    _close(hs, want, 1e-6)  # the partition sums' kernels round at ~1e-8 relative
    assert torch.isfinite(diag).all()
    _close(out["log_ratio"], F.detach(), 1e-6)


def test_robust_temperature_needs_rho_and_normalisers():
    """``robust`` without rho, or with an objective that computes its own normalisers, is refused by name."""
    with pytest.raises(ValueError, match="robust.*needs rho"):
        ContrastiveLoss("linearized", temperature="robust")
    with pytest.raises(ValueError, match="robust.*infonce"):
        ContrastiveLoss("infonce", rho=6.5, temperature="robust")
    with pytest.raises(ValueError, match="unknown temperature 'robus'"):
        ContrastiveLoss("linearized", rho=6.5, temperature="robus")
