"""The normaliser-network estimator on W simulated ranks in one process (``InProcessWorld``).

The loss passes its layout's topology to the estimator (the declared input ``topology``). On the
``local`` layout each rank's rows are its own, so NeuCLIP's fit averages its gradients and its
restart gathers its rows through that topology's exchanger: the networks stay identical on every
rank and equal those of one process fitting the union of the ranks' rows with their targets. The
``world_size`` lr scaling reads the same topology's world size, at an epoch start, on a load and at
a step. The two-process gloo tests (tests/distributed) check the same on real process groups.
"""

from __future__ import annotations

import copy

import pytest
import torch

import amortize.comm as D
import amortize.functional as F
from amortize.comm import ONE_PROCESS, Gather, InProcessWorld, Local, Topology
from amortize.estimators import AmortizedEstimator, build_estimator
from amortize.losses import ContrastiveLoss

W, B, DIM = 3, 4, 6


def unit(n, d, seed):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _neuclip():
    # m = 5 prototypes < W * B rows; a restart at steps 0 and 2 draws from the gathered rows
    return build_estimator("neuclip", dim=DIM, num_prototypes=5, restart_every=2, inner_steps=3)


def _batches(steps):
    """Per step: the global (W * B) rows and, per rank, its B rows' local in-batch sums."""
    out = []
    for t in range(steps):
        x, y = unit(W * B, DIM, 2 * t), unit(W * B, DIM, 2 * t + 1)
        s = torch.tensor(10.0)
        parts = [F.log_partition(x[r * B:(r + 1) * B], y[r * B:(r + 1) * B], s, pos_weight=0.0) for r in range(W)]
        out.append((x, y, s, parts))
    return out


class _Counting(D.Exchanger):
    """An exchanger that counts the collectives it runs for another."""

    def __init__(self, inner: D.Exchanger):
        self.inner, self.calls = inner, []

    def world_size(self):
        return self.inner.world_size()

    def rank(self):
        return self.inner.rank()

    def all_gather(self, t):
        self.calls.append(("all_gather", tuple(t.shape)))
        return self.inner.all_gather(t)

    def all_reduce(self, t):
        self.calls.append(("all_reduce", tuple(t.shape)))
        return self.inner.all_reduce(t)


def test_local_rows_average_the_fit_and_gather_the_restart_through_the_topology():
    steps = _batches(4)
    negatives = float(W * B - 1)

    def rank(topo):
        counted = Topology(topo.world_size, topo.rank, exchanger=_Counting(topo.exchanger))
        est = _neuclip()
        for x, y, s, parts in steps:
            rows = slice(topo.rank * B, (topo.rank + 1) * B)
            lzx, lzy = parts[topo.rank]
            est(x[rows], y[rows], lzx, lzy, None, scale=s, bias=None, num_negatives=negatives, local_rows=True,
                topology=counted)
        return est.state_dict(), counted.exchanger.calls

    per_rank = InProcessWorld(W).run(rank)
    ref = _neuclip()  # one process, every rank's rows at once
    for x, y, s, parts in steps:
        lzx, lzy = (torch.cat([p[i] for p in parts]) for i in (0, 1))
        ref(x, y, lzx, lzy, None, scale=s, bias=None, num_negatives=negatives, local_rows=False, topology=ONE_PROCESS)
    params = [k for k in ref.state_dict() if k.endswith(".prototypes") or ".online." in k]
    assert any(k.endswith(".prototypes") for k in params)
    for r, (state, calls) in enumerate(per_rank):
        for k in params:
            assert torch.equal(state[k], per_rank[0][0][k]), f"{k} differs between rank {r} and rank 0"
            torch.testing.assert_close(state[k], ref.state_dict()[k], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"rank {r} {k}: {m}")
        # two restarts gather both modalities; 4 steps x 3 inner steps all-reduce each parameter's gradient
        gathers = [c for c in calls if c[0] == "all_gather"]
        reduces = [c for c in calls if c[0] == "all_reduce"]
        assert gathers == [("all_gather", (B, DIM))] * 4
        assert len(reduces) == 4 * 3 * len(list(ref.online.parameters()))


def test_without_local_rows_no_collective_runs_and_the_ranks_drift_apart():
    """The control: the same ranks fitting alone (exact layouts, or one process) leave the exchanger idle."""
    steps = _batches(2)

    def rank(topo):
        counted = Topology(topo.world_size, topo.rank, exchanger=_Counting(topo.exchanger))
        est = _neuclip()
        for x, y, s, parts in steps:
            rows = slice(topo.rank * B, (topo.rank + 1) * B)
            est(x[rows], y[rows], *parts[topo.rank], None, scale=s, bias=None, num_negatives=float(B - 1),
                local_rows=False, topology=counted)
        return est.online["image"].prototypes.clone(), counted.exchanger.calls

    per_rank = InProcessWorld(W).run(rank)
    assert all(calls == [] for _, calls in per_rank)
    assert not torch.equal(per_rank[0][0], per_rank[1][0])


def test_the_loss_hands_its_layouts_topology_to_the_estimator():
    x, y = unit(W * B, DIM, 0), unit(W * B, DIM, 1)

    def rank(topo):
        loss_fn = ContrastiveLoss.from_sections({"name": "linearized", "pos_weight": 0.0},
                                                {"name": "neuclip", "num_prototypes": 5, "restart_every": 2},
                                                layout=Local(topo), context={"dim": DIM})
        rows = slice(topo.rank * B, (topo.rank + 1) * B)
        for _ in range(3):
            loss_fn(x[rows], y[rows], torch.tensor(10.0))
        assert loss_fn.estimator.topology is topo
        return loss_fn.estimator.state_dict()

    per_rank = InProcessWorld(W).run(rank)
    for k, v in per_rank[0].items():
        if isinstance(v, torch.Tensor):
            assert all(torch.equal(state[k], v) for state in per_rank[1:]), f"{k} differs across ranks"


def _amorlip_loss(layout):
    est = AmortizedEstimator(dim=DIM, lr=1e-3, lr_scaling="world_size")
    return ContrastiveLoss("linearized", est, layout=layout, pos_weight=1e-3)


def _fit_lrs(est):
    """Record the inner lr of every fit ``est`` runs."""
    seen = []
    run = est.fit.run
    est.fit.run = lambda *a, **kw: (seen.append(est._optimizer.param_groups[0]["lr"]), run(*a, **kw))[1]
    return seen


@pytest.mark.parametrize("world", [2, 4])
def test_the_world_size_lr_scaling_follows_the_topology_at_epoch_starts_steps_and_loads(world):
    x, y = unit(world * B, DIM, 3), unit(world * B, DIM, 4)
    s = torch.tensor(10.0)

    def rank(topo):
        rows = slice(topo.rank * B, (topo.rank + 1) * B)
        loss_fn = _amorlip_loss(Gather(topo))
        seen = _fit_lrs(loss_fn.estimator)
        loss_fn.start_epoch(0, 2)  # before the first step: the default group (one process here)
        loss_fn(x[rows], y[rows], s)  # the step's topology sets lr x W before the fit
        loss_fn.start_epoch(1, 2)  # a new Adam, at the remembered topology's lr
        after_epoch = loss_fn.estimator._optimizer.param_groups[0]["lr"]
        loss_fn(x[rows], y[rows], s)
        return seen, after_epoch, copy.deepcopy(loss_fn.state_dict())

    per_rank = InProcessWorld(world).run(rank)
    for seen, after_epoch, _ in per_rank:
        assert seen == [1e-3 * world] * 2 and after_epoch == 1e-3 * world

    saved = per_rank[0][2]

    def resumed(topo):  # the same state resumed on 3 ranks
        loss_fn = _amorlip_loss(Gather(topo))
        loss_fn(x[:B], y[:B], s)  # a first step: the estimator knows its topology
        loss_fn.load_state_dict(saved)
        at_load = loss_fn.estimator._optimizer.param_groups[0]["lr"]
        moments = len(loss_fn.estimator._optimizer.state)
        return at_load, moments

    for at_load, moments in InProcessWorld(3).run(resumed):
        assert at_load == pytest.approx(3e-3) and moments > 0


def test_the_default_layout_reads_the_groups_world_size_for_the_lr_at_each_use(monkeypatch):
    """A real torch.distributed run: the loss's default topology is the lazy default group's."""
    loss_fn = _amorlip_loss("gather")
    est = loss_fn.estimator
    assert loss_fn.layout.topology is D.DEFAULT_TOPOLOGY and est.topology is D.DEFAULT_TOPOLOGY
    assert est.inner_lr == 1e-3
    monkeypatch.setattr(D.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(D.dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(D.dist, "get_rank", lambda group=None: 0)
    loss_fn.start_epoch(0, 1)  # the trainer created the group after the loss was built
    assert est._optimizer.param_groups[0]["lr"] == pytest.approx(4e-3)
    assert est.inner_lr == pytest.approx(4e-3)


def test_a_topology_input_that_is_not_a_topology_is_named():
    est = AmortizedEstimator(dim=DIM)
    x = unit(4, DIM, 0)
    with pytest.raises(TypeError, match="the topology input must be an amortize.comm.Topology .* got int"):
        est(x, x, torch.zeros(4), torch.zeros(4), topology=2)
