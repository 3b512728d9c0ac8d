"""Layouts on W simulated ranks in one process (``InProcessWorld``) against one process on the global batch.

Exact layouts (``gather``, ``ring``): for every objective, the mean over ranks of the per-rank losses
equals the single-process loss on the global batch, the per-rank feature gradients (each rank's own
rows, summed over ranks by the layout's collectives) divided by ``W`` equal its gradients, and the
scale gradient averaged over ranks equals its scale gradient: what DDP's averaging then gives.
``local``: over every split of the global batch into ``W`` equal parts the mean loss and gradient
equal the global ones exactly (for fixed normalisers), which is the layout's unbiasedness.

The two-process gloo tests (tests/distributed) check the same on real process groups.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from amortize.comm import ONE_PROCESS, Gather, InProcessWorld, Local, Ring, Topology
from amortize.estimators import MovingAverageEstimator, PartitionEstimate, PartitionEstimator, ScentEstimator
from amortize.losses import ContrastiveLoss

OBJECTIVES = ("infonce", "sigmoid", "linearized")
EXACT = {"gather": Gather, "ring": Ring}


def _batch(n: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    y = torch.nn.functional.normalize(x + torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return x, y


def _loss(objective: str, layout, chunk=None, estimator=None) -> ContrastiveLoss:
    opts = {"pos_weight": 1e-3} if objective == "linearized" else {}
    return ContrastiveLoss(objective, estimator, layout=layout, chunk_size=chunk, **opts)


def _step(loss_fn, x, y, scale, bias, index=None):
    """One step on these rows: loss, the rows' feature gradients, the scale gradient, the terms."""
    x = x.clone().requires_grad_()
    y = y.clone().requires_grad_()
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(bias, dtype=torch.float64) if loss_fn.objective.name == "sigmoid" else None
    out = loss_fn(x, y, s, b, index=index)
    out["loss"].backward()
    return out["loss"].detach(), x.grad, y.grad, s.grad, {k: v for k, v in out.items() if k != "loss"}


def _close(a, b, what, tol=1e-9):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("layout", sorted(EXACT))
@pytest.mark.parametrize("objective", OBJECTIVES)
@settings(max_examples=10, deadline=None)
@given(world=st.integers(1, 4), b=st.integers(1, 4), d=st.integers(2, 6), seed=st.integers(0, 10_000),
       chunk=st.one_of(st.none(), st.integers(1, 5)), scale=st.floats(0.5, 30.0))
def test_exact_layouts_on_simulated_ranks_equal_one_process(layout, objective, world, b, d, seed, chunk, scale):
    X, Y = _batch(world * b, d, seed)
    bias = -2.0
    ref_loss, ref_gx, ref_gy, ref_gs, ref_terms = _step(_loss(objective, Gather(ONE_PROCESS), chunk), X, Y, scale, bias)

    def rank(topo: Topology):
        rows = slice(topo.rank * b, (topo.rank + 1) * b)
        return _step(_loss(objective, EXACT[layout](topo), chunk), X[rows], Y[rows], scale, bias)

    per_rank = InProcessWorld(world).run(rank)
    label = f"{objective}/{layout} W={world} B={b}"
    _close(torch.stack([r[0] for r in per_rank]).mean(), ref_loss, f"{label} loss")
    _close(torch.cat([r[1] for r in per_rank]) / world, ref_gx, f"{label} image gradient")
    _close(torch.cat([r[2] for r in per_rank]) / world, ref_gy, f"{label} text gradient")
    _close(torch.stack([r[3] for r in per_rank]).mean(), ref_gs, f"{label} scale gradient")
    for k in ("positive", "image", "text", "pairwise"):  # the objective's terms: shares of the loss
        if k in ref_terms:
            _close(torch.stack([r[4][k] for r in per_rank]).mean(), ref_terms[k], f"{label} term {k}")


@pytest.mark.parametrize("per_sample", ["moving_average", "scent"])
@pytest.mark.parametrize("layout", sorted(EXACT))
def test_estimator_state_on_simulated_ranks_is_the_one_process_state(layout, per_sample):
    """Exact layouts give every rank the global rows: each applies the one-process update."""
    world, b, n = 3, 2, 20
    X, Y = _batch(world * b, 4, 5)
    index = torch.tensor([3, 17, 0, 9, 11, 4])

    def fresh():
        return MovingAverageEstimator(n, gamma=0.5) if per_sample == "moving_average" else ScentEstimator(n, alpha=2.0)

    ref = _loss("linearized", Gather(ONE_PROCESS), estimator=fresh())
    _step(ref, X, Y, 6.0, 0.0, index)  # a first visit takes the batch's value, the second updates
    ref_out = _step(ref, X.flip(1), Y, 6.0, 0.0, index)

    def rank(topo):
        loss_fn = _loss("linearized", EXACT[layout](topo), estimator=fresh())
        rows = slice(topo.rank * b, (topo.rank + 1) * b)
        _step(loss_fn, X[rows], Y[rows], 6.0, 0.0, index[rows])
        out = _step(loss_fn, X.flip(1)[rows], Y[rows], 6.0, 0.0, index[rows])
        return out, loss_fn.estimator.state_dict()

    per_rank = InProcessWorld(world).run(rank)
    _close(torch.stack([r[0][0] for r in per_rank]).mean(), ref_out[0], "loss")
    for key, v in ref.estimator.state_dict().items():
        for r, (_, state) in enumerate(per_rank):
            _close(state[key], v, f"{layout} {key} on rank {r}")
            assert torch.equal(state[key], per_rank[0][1][key]), f"{key} differs across ranks"


class _FixedNormalizers(PartitionEstimator):
    """Normalisers that depend on each sample alone (not on the batch): ``3 + sum(features)``."""

    def forward(self, x, y, log_z_x, log_z_y, index=None):
        return PartitionEstimate(3.0 + x.sum(-1), 3.0 + y.sum(-1))


def _splits(n: int, world: int):
    """Every split of ``range(n)`` into ``world`` unordered parts of ``n // world``."""
    b = n // world

    def rec(left):
        if not left:
            yield []
            return
        first, rest = left[0], left[1:]
        for others in itertools.combinations(rest, b - 1):
            part = (first, *others)
            remaining = [i for i in rest if i not in others]
            for tail in rec(remaining):
                yield [part, *tail]

    return [list(s) for s in rec(list(range(n)))]


@pytest.mark.parametrize("objective", ["sigmoid", "linearized"])
@settings(max_examples=6, deadline=None)
@given(shape=st.sampled_from([(2, 2), (2, 3), (3, 2), (2, 4)]), d=st.integers(2, 5), seed=st.integers(0, 10_000),
       scale=st.floats(0.5, 20.0))
def test_local_layout_is_unbiased_over_every_split(objective, shape, d, seed, scale):
    world, b = shape
    n = world * b
    X, Y = _batch(n, d, seed)
    est = _FixedNormalizers if objective == "linearized" else (lambda: None)
    ref_loss, ref_gx, ref_gy, ref_gs, _ = _step(_loss(objective, Gather(ONE_PROCESS), estimator=est()), X, Y,
                                                scale, -2.0)
    splits = _splits(n, world)
    assert len(splits) == math.factorial(n) // (math.factorial(b) ** world * math.factorial(world))
    loss = torch.zeros((), dtype=torch.float64)
    gx, gy, gs = torch.zeros_like(X), torch.zeros_like(Y), torch.zeros((), dtype=torch.float64)
    for split in splits:
        for r, part in enumerate(split):  # the local layout runs no collective: the ranks run one after another
            rows = torch.tensor(part)
            out = _step(_loss(objective, Local(Topology(world, r)), estimator=est()), X[rows], Y[rows], scale, -2.0)
            loss += out[0] / world
            gx[rows] += out[1] / world
            gy[rows] += out[2] / world
            gs += out[3] / world
    k = len(splits)
    _close(loss / k, ref_loss, f"{objective} local loss")
    _close(gx / k, ref_gx, f"{objective} local image gradient")
    _close(gy / k, ref_gy, f"{objective} local text gradient")
    _close(gs / k, ref_gs, f"{objective} local scale gradient")
