"""Run the tutorial's objective and estimator on one process, or on W gloo processes, and save the results.

    python check_layouts.py OUT.pt                                  # one process: the reference
    RANK=r WORLD_SIZE=W python check_layouts.py OUT.pt file:///tmp/rendezvous   # process r of W

The optional second argument is torch.distributed's ``init_method``; without it the processes meet
at ``MASTER_ADDR:MASTER_PORT`` (``env://``), as under a launcher.

Every process builds the same global batch of N pairs and feeds the loss its own N / W rows. It
saves, for each case, layout and step: its loss share, the gradients of its features (scattered
into their global rows), the scale's gradient, and the loss module's final state (the estimator's
buffers).
"""

import faulthandler
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import my_estimator  # noqa: E402,F401  (registers 'running_mean')
import my_objective  # noqa: E402,F401  (registers 'margin_ranking')

from amortize.losses import ContrastiveLoss  # noqa: E402

CASES = {  # name: (loss.objective, loss.estimator), as a recipe would give them
    "margin_ranking": ({"name": "margin_ranking", "margin": 0.5}, None),
    "running_mean": ({"name": "linearized", "pos_weight": 0.001}, {"name": "running_mean", "gamma": 0.3}),
}
LAYOUTS = ("gather", "ring")
N, D, STEPS = 8, 6, 3


def global_batch(step: int):
    g = torch.Generator().manual_seed(step)
    x = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1)
    y = torch.nn.functional.normalize(0.5 * x + torch.randn(N, D, generator=g), dim=-1)
    return x, y


def run(objective, estimator, layout: str, rank: int, world: int) -> dict:
    loss_fn = ContrastiveLoss.from_sections(objective, estimator, layout=layout)
    rows = slice(rank * N // world, (rank + 1) * N // world)
    records = []
    for step in range(STEPS):
        X, Y = global_batch(step)
        x, y = X[rows].clone().requires_grad_(), Y[rows].clone().requires_grad_()
        scale = torch.tensor(8.0, requires_grad=True)
        out = loss_fn(x, y, scale)
        out["loss"].backward()
        gx, gy = torch.zeros_like(X), torch.zeros_like(Y)
        gx[rows], gy[rows] = x.grad, y.grad
        records.append({"loss": out["loss"].detach(), "gx": gx, "gy": gy, "gs": scale.grad})
    return {"records": records, "state": dict(loss_fn.state_dict())}


def main() -> None:
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(100, exit=True)  # a stalled process says where, then exits
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        init_method = sys.argv[2] if len(sys.argv) > 2 else "env://"
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
    try:
        results = {(case, layout): run(*CASES[case], layout, rank, world) for case in CASES for layout in LAYOUTS}
        torch.save(results, sys.argv[1])
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
