"""Hypothesis strategies for batches of unit features."""

import torch
from hypothesis import strategies as st


@st.composite
def feature_batches(draw, min_b=1, max_b=24, min_d=2, max_d=16, dtype=torch.float64):
    """(x, y) unit features of one random shape, from a drawn seed."""
    b = draw(st.integers(min_b, max_b))
    d = draw(st.integers(min_d, max_d))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1)
    # correlate some pairs so positives are not random
    mix = draw(st.floats(0.0, 0.9))
    y = torch.nn.functional.normalize(mix * x + (1 - mix) * y + 1e-3, dim=-1)
    return x, y


scales = st.floats(0.5, 100.0)
pos_weights = st.sampled_from([1.0, 1e-3, 0.5, 0.0])
