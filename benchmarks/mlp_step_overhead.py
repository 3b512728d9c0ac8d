"""AmorLIP's step overhead over CLIP on small MLP towers, where the estimator's own cost shows.

    python -m benchmarks.mlp_step_overhead

Towers: two-layer MLPs (32 -> 64 -> 16 and 24 -> 64 -> 16, the plain-PyTorch tutorial's) on fixed
random inputs; one step is forward, loss, backward and an AdamW step. CLIP is ``ContrastiveLoss("infonce")``;
AmorLIP the linearized objective with an ``AmortizedEstimator`` fitted every step (3 inner Adam
steps, EMA every 2 steps, previous-epoch blending on). 20 warm-up steps, then 200 interleaved steps
per variant; prints the median step times (ms) and their ratio for batch 32 and 256.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from amortize.estimators import AmortizedEstimator
from amortize.losses import ContrastiveLoss


def make_step(variant: str, batch: int):
    """One training step of ``variant`` (``clip`` or ``amorlip``) as a closure."""
    torch.manual_seed(0)
    image = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    text = torch.nn.Sequential(torch.nn.Linear(24, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    log_s = torch.nn.Parameter(torch.tensor(2.0))
    if variant == "clip":
        loss = ContrastiveLoss("infonce")
    else:
        est = AmortizedEstimator(dim=16, amortizer={"name": "residual_mlp", "width_factor": 0.5}, inner_steps=3,
                                 update_every=1, ema_decay=0.92, ema_every=2)
        loss = ContrastiveLoss("linearized", estimator=est, pos_weight=1e-3, rho=6.5)
        loss.start_epoch(1, 10)  # past epoch 0: the previous-epoch network is blended in
    opt = torch.optim.AdamW([*image.parameters(), *text.parameters(), log_s], lr=1e-3)
    a, b = torch.randn(batch, 32), torch.randn(batch, 24)

    def step():
        x = torch.nn.functional.normalize(image(a), dim=-1)
        y = torch.nn.functional.normalize(text(b), dim=-1)
        out = loss(x, y, log_s.exp())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()

    return step


def run(batch: int, steps: int = 200, warmup: int = 20) -> dict:
    """Median step times (ms) of CLIP and AmorLIP at ``batch`` and their ratio."""
    fns = {v: make_step(v, batch) for v in ("clip", "amorlip")}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {v: [] for v in fns}
    for _ in range(steps):
        for v, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[v].append(time.perf_counter() - t0)
    med = {v: 1000 * statistics.median(t) for v, t in times.items()}
    return {"batch": batch, "clip_ms": med["clip"], "amorlip_ms": med["amorlip"], "ratio": med["amorlip"] / med["clip"]}


if __name__ == "__main__":
    print(json.dumps([run(b) for b in (32, 256)], indent=2))
