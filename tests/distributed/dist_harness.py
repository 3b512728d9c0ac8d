"""Shared by the multi-process tests and their gloo workers: cases, losses and one training run.

A *case* is a plain dict (objective, mode, estimator, sizes, seed, ``estimator_options`` of the
amortized estimator, ...). ``run_case`` runs it on
this process (single-process when torch.distributed is not initialised) and returns what the
parent test compares: per-step losses, feature gradients scattered into global positions, scale
and bias gradients, and the estimator's final state.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from amortize.estimators import AmortizedEstimator, InBatchEstimator, MovingAverageEstimator
from amortize.losses import ContrastiveLoss

ROOT = Path(__file__).resolve().parents[2]
NUM_SAMPLES = 64


def make_loss(case: dict) -> ContrastiveLoss:
    obj, est = case["objective"], case.get("estimator")
    estimator = None
    if obj == "amortized":
        if est == "in_batch":
            estimator = InBatchEstimator()
        elif est == "moving_average":
            estimator = MovingAverageEstimator(NUM_SAMPLES, gamma=0.5)
        elif est == "amortized":
            estimator = AmortizedEstimator(dim=case["d"], inner_steps=2, update_every=1, ema_every=1, ema_decay=0.5,
                                           **case.get("estimator_options", {}))
        elif est == "neuclip":  # restarts at steps 0 and 2: the draw must be the same on every rank
            from amortize.estimators import build_estimator

            estimator = build_estimator("neuclip", dim=case["d"], num_prototypes=case.get("m", 5), restart_every=2,
                                        inner_steps=3)
        elif est == "amortized_fixed":  # deterministic normalisers: lambda of the (untrained) target net
            estimator = AmortizedEstimator(dim=case["d"], normalizer="ema_target").eval()
        else:
            raise ValueError(est)
    if obj == "amortized":  # the linearized objective with an estimator
        return ContrastiveLoss("linearized", estimator=estimator, pos_weight=case.get("pos_weight", 1.0),
                               chunk_size=case.get("chunk"), layout=case["mode"])
    return ContrastiveLoss(obj, chunk_size=case.get("chunk"), layout=case["mode"])


def global_batch(case: dict, step: int):
    g = torch.Generator().manual_seed(case["seed"] * 1000 + step)
    N, d = case["N"], case["d"]
    X = torch.nn.functional.normalize(torch.randn(N, d, generator=g), dim=-1)
    Y = torch.nn.functional.normalize(0.5 * X + torch.randn(N, d, generator=g), dim=-1)
    index = torch.randperm(NUM_SAMPLES, generator=g)[:N]
    return X, Y, index


def _one_step(loss_fn, case, X, Y, index, rows):
    x = X[rows].clone().requires_grad_()
    y = Y[rows].clone().requires_grad_()
    s = torch.tensor(case["scale"], requires_grad=True)
    b = torch.tensor(case["bias"], requires_grad=True) if case["objective"] != "infonce" else None
    out = loss_fn(x, y, s, b, index=index[rows])
    out["loss"].backward()
    gx, gy = torch.zeros_like(X), torch.zeros_like(Y)
    gx[rows], gy[rows] = x.grad, y.grad
    return {
        "loss": out["loss"].detach(),
        "gx": gx,
        "gy": gy,
        "gs": s.grad.clone(),
        "gb": None if b is None else b.grad.clone(),
        "terms": {k: v.detach().clone() for k, v in out.items() if k != "loss"},
    }


def run_case(case: dict, rank: int = 0, world: int = 1, loss_fn: ContrastiveLoss | None = None) -> dict:
    """Run ``case`` on this process; exact modes: ``steps`` steps; local mode: ``perms`` random splits.

    ``loss_fn``: the case's loss built earlier (a worker builds it before the process group exists,
    as a recipe's loss is built before Composer's trainer creates the group); None: built here.
    """
    if loss_fn is None:
        torch.manual_seed(0)
        loss_fn = make_loss(case)
    N = case["N"]
    B = N // world
    records = []
    if case["mode"] == "local" and world > 1:
        X, Y, index = global_batch(case, 0)
        for p in range(case["perms"]):
            perm = torch.randperm(N, generator=torch.Generator().manual_seed(10_000 + p))
            records.append(_one_step(loss_fn, case, X, Y, index, perm[rank * B : (rank + 1) * B]))
    else:
        for step in range(case["steps"]):
            X, Y, index = global_batch(case, step)
            records.append(_one_step(loss_fn, case, X, Y, index, torch.arange(rank * B, (rank + 1) * B)))
    state = {k: v.detach().clone() for k, v in loss_fn.state_dict().items() if isinstance(v, torch.Tensor)}
    inner_lr = getattr(getattr(loss_fn, "estimator", None), "inner_lr", None)  # amortized estimators only
    return {"records": records, "state": state, "inner_lr": inner_lr}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cases: list, world: int, tmp: Path, timeout: float = 150.0) -> list[list[dict]]:
    """Run ``cases`` on ``world`` gloo processes (localhost); returns ``results[rank][case]``."""
    case_file = tmp / "cases.pt"
    torch.save(cases, case_file)
    port = free_port()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
               OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    worker = Path(__file__).with_name("dist_worker.py")
    procs = []
    for r in range(world):
        out = tmp / f"rank{r}.pt"
        procs.append(subprocess.Popen(
            [sys.executable, str(worker), str(case_file), str(out)],
            env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        ))
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            logs.append(out.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        if p.returncode != 0:
            raise RuntimeError(f"rank {r} failed (exit {p.returncode}):\n{logs[r][-4000:]}")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]
