"""Shared test settings: hypothesis profiles and small helpers."""

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))

# tiny test models run fastest on one thread, and helpers or xdist workers do not oversubscribe
torch.set_num_threads(1)


def unit_rows(gen: torch.Generator, n: int, d: int, dtype=torch.float64) -> torch.Tensor:
    """n random unit vectors in R^d."""
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=dtype), dim=-1)
