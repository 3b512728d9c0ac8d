"""Gradient-cache cases shared by the single-process property tests and the gloo workers.

A case (plain dict: objective, estimator, mode, N, d, seed, chunk, dropout, microbatch, steps) is
run by :func:`run` on this process: small MLP towers and a :class:`~amortize.losses.ContrastiveLoss`
take ``steps`` AdamW steps on fixed global batches, either on the whole per-process batch
(``microbatch=None``), with gradient-cached microbatches (``method="gradcache"``), or with the
microbatches encoded one after the other *with* a graph and the loss on their concatenation
(``method="chunked_graph"``: the reference that draws the same dropout masks as the gradient cache).
Under torch.distributed the towers are wrapped in DDP and every process takes its rows of the batch.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_harness as H  # noqa: E402

from amortize.gradcache import gradient_cached_backward, split_batch  # noqa: E402

D_IN = 6


class Towers(nn.Module):
    """Two small MLP towers with dropout, a logit scale and (optionally) a bias."""

    def __init__(self, d: int, dropout: float, bias: bool):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(D_IN, 16), nn.GELU(), nn.Dropout(dropout), nn.Linear(16, d))
        self.text = nn.Sequential(nn.Linear(D_IN + 1, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, d))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0)) if bias else None

    def forward(self, image, text):
        x = nn.functional.normalize(self.image(image), dim=-1)
        y = nn.functional.normalize(self.text(text), dim=-1)
        return x, y, self.logit_scale.exp(), self.logit_bias


def batch_of(case: dict, step: int) -> dict:
    g = torch.Generator().manual_seed(case["seed"] * 1000 + step)
    N = case["N"]
    image = torch.randn(N, D_IN, generator=g)
    text = torch.cat([image + 0.5 * torch.randn(N, D_IN, generator=g), torch.randn(N, 1, generator=g)], dim=1)
    return {"image": image, "text": text, "index": torch.randperm(H.NUM_SAMPLES, generator=g)[:N]}


def build(case: dict):
    torch.manual_seed(case["seed"])
    towers = Towers(case["d"], case.get("dropout", 0.0), bias=case["objective"] != "infonce")
    loss_fn = H.make_loss(dict(case, scale=None, bias=None))
    opt = torch.optim.AdamW(towers.parameters(), lr=1e-2, weight_decay=0.1)
    return towers, loss_fn, opt


def run(case: dict, method: str, rank: int = 0, world: int = 1) -> dict:
    """Take ``case["steps"]`` steps; return losses, the last gradients, parameters, optimiser and estimator state."""
    towers, loss_fn, opt = build(case)
    model = towers
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(towers)
    torch.manual_seed(case["seed"] + 1 + rank)  # the dropout masks: same stream for every method
    B = case["N"] // world
    losses = []
    for step in range(case["steps"]):
        full = batch_of(case, step)
        batch = {k: v[rank * B:(rank + 1) * B] for k, v in full.items()}
        opt.zero_grad(set_to_none=True)

        def loss_of(x, y, s, b):
            return loss_fn(x, y, s, b, index=batch["index"] if loss_fn.needs_index else None)

        def encode(mb):
            return model(mb["image"], mb["text"])

        if method == "gradcache":
            no_sync = model.no_sync if world > 1 else None
            out = gradient_cached_backward(encode, batch, case["microbatch"], loss_of, no_sync=no_sync)
        else:
            if method == "chunked_graph":
                outs = [encode(mb) for mb in split_batch(batch, case["microbatch"])]
                x, y = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
                s, b = outs[0][2], outs[0][3]
            else:
                x, y, s, b = encode(batch)
            out = loss_of(x, y, s, b)
            out["loss"].backward()
        losses.append(out["loss"].detach().clone())
        grads = {n: p.grad.detach().clone() for n, p in towers.named_parameters()}
        opt.step()
    return {
        "loss": torch.stack(losses),
        "grads": grads,
        "params": {n: p.detach().clone() for n, p in towers.named_parameters()},
        "optimizer": copy.deepcopy(opt.state_dict()["state"]),
        "estimator": {k: v.detach().clone() for k, v in loss_fn.state_dict().items() if isinstance(v, torch.Tensor)},
        "rng": torch.get_rng_state(),
    }
