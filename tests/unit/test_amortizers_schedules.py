"""Amortizer networks and schedules."""

import math

import pytest
import torch

from amortize.amortizers import AMORTIZERS, RandomFourierAmortizer, ResidualMLPAmortizer, build_amortizer
from amortize.schedules import beta_cosine, build_schedule, cosine_decay, piecewise


@pytest.mark.parametrize("name", sorted(AMORTIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_amortizers_output_float32_under_autocast(name, dtype):
    net = build_amortizer(name, 16)
    u = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(u)
    assert out.shape == (5,) and out.dtype == torch.float32


def test_residual_mlp_structure_and_init():
    net = ResidualMLPAmortizer(64, width_factor=0.5, init_log_z=7.0)
    assert net.fc1.out_features == 32 and net.fc2.out_features == 64
    assert net.out.bias.item() == 7.0


def test_random_fourier_features_approximate_the_gaussian_kernel():
    """Proposition 1's ingredient: phi(x).phi(y) ~ exp(-s |x - y|^2 / 2) with bandwidth sqrt(s)."""
    s = 2.0
    rff = RandomFourierAmortizer(8, num_features=20000, bandwidth=math.sqrt(s))
    x = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    approx = rff.features(x) @ rff.features(y).T
    exact = torch.exp(-s * torch.cdist(x, y).square() / 2)
    assert float((approx - exact).abs().max()) < 0.05


def test_random_fourier_head_starts_at_init_log_z():
    rff = RandomFourierAmortizer(4, num_features=16, init_log_z=3.0)
    out = rff(torch.randn(2, 4))
    torch.testing.assert_close(out, torch.full((2,), 3.0), atol=1e-5, rtol=0)


def test_unknown_amortizer():
    with pytest.raises(ValueError, match="unknown amortizer 'mlp'; valid: linear, prototypes, random_fourier, residual_mlp"):
        build_amortizer("mlp", 4)


def test_beta_schedule_matches_eq12():
    assert beta_cosine(0, 0.8, 16) == 0.0
    assert beta_cosine(8, 0.8, 16) == pytest.approx(0.4)
    assert beta_cosine(16, 0.8, 16) == 0.8
    assert beta_cosine(40, 0.8, 16) == 0.8


def test_rho_piecewise_as_published():
    rho = build_schedule({"name": "piecewise", "values": [8.5, -8.5, -8.5]})
    assert [rho(e, 33) for e in (0, 10, 11, 32)] == [8.5, 8.5, -8.5, -8.5]
    medium = build_schedule({"name": "piecewise", "values": [6.5, 6.5, 6.5, -8.0]})
    assert [medium(e, 30) for e in (0, 20, 21, 29)] == [6.5, 6.5, -8.0, -8.0]  # parts of 7, 7, 7, 9
    assert piecewise(5, 10, [1.0]) == 1.0


def test_cosine_gamma():
    assert cosine_decay(0, 1.0, 0.2, 10) == 1.0
    assert cosine_decay(10, 1.0, 0.2, 10) == pytest.approx(0.2)
    assert cosine_decay(5, 1.0, 0.2, 10) == pytest.approx(0.6)


def test_bad_schedules():
    with pytest.raises(ValueError, match="unknown schedule .linear."):
        build_schedule({"name": "linear"})
    with pytest.raises(ValueError, match="schedule: .*decay_epochs"):
        build_schedule({"name": "cosine_decay", "start": 1.0})
    assert build_schedule(0.5)(3) == 0.5
