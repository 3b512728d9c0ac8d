"""A layout's topology: lazy by default, fixed when given, checked against its exchanger, in-process ranks.

And the one-process layout: ``Gather(ONE_PROCESS)``, which the functional face runs through
``ContrastiveLoss`` (objectives have no ``forward`` of their own).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import amortize.comm as D
import amortize.functional as F
from amortize.comm import ONE_PROCESS, Exchanger, Gather, InProcessWorld, Local, Ring, Topology
from amortize.losses import ContrastiveLoss
from amortize.objectives import Objective


def test_the_default_topology_reads_the_group_when_asked_not_when_built(monkeypatch):
    """A loss is built before the trainer initialises torch.distributed: its layout must follow the group."""
    loss_fn = ContrastiveLoss("linearized")  # layout "gather" on the default topology
    assert loss_fn.layout.topology.lazy and loss_fn.layout.world() == 1
    monkeypatch.setattr(D.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(D.dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(D.dist, "get_rank", lambda group=None: 2)
    assert loss_fn.layout.world() == 4
    assert loss_fn.layout.row_offset(3) == 6
    assert loss_fn.layout.num_columns(3) == 12
    assert D.world_size() == 4 and D.rank() == 2  # the default group's, for estimators
    assert Gather(ONE_PROCESS).world() == 1  # the one-process layout ignores the group


def test_a_lazy_topology_follows_its_exchanger():
    class Growing(Exchanger):
        size = 1

        def world_size(self):
            return self.size

        def rank(self):
            return 0

    ex = Growing()
    lay = Local(Topology(exchanger=ex))
    assert lay.negative_weight(4) == 1.0
    ex.size = 3
    assert lay.negative_weight(4) == pytest.approx(11 / 3)


def test_a_fixed_topology_that_its_group_contradicts_is_refused_at_the_collective():
    y = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    lay = Gather(Topology(2, 1))  # torch.distributed is not initialised: the group is one process
    assert lay.world() == 2 and lay.row_offset(3) == 3  # what it was told
    with pytest.raises(ValueError,
                       match=r"the topology is rank 1 of 2 but its exchanger \(TorchDistributed\) is rank 0 of 1"):
        lay.columns(y)


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=2), "both world_size and rank, or neither"),
    (dict(rank=0), "both world_size and rank, or neither"),
    (dict(world_size=0, rank=0), r"world_size must be a whole number >= 1, got 0"),
    (dict(world_size=2, rank=2), r"rank must be a whole number in \[0, 2\), got 2"),
    (dict(world_size=2.0, rank=0), r"world_size must be a whole number >= 1, got 2.0"),
    (dict(group=object(), exchanger=Exchanger()), "a process group .* or an exchanger, not both"),
])
def test_bad_topologies_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Topology(**kwargs)


def test_a_layout_takes_only_a_topology():
    with pytest.raises(TypeError, match="topology must be an amortize.comm.Topology, got dict"):
        Gather({"world_size": 2})


def test_layout_names_build_on_a_given_topology():
    lay = D.build_layout("ring", Topology(3, 2))
    assert isinstance(lay, Ring) and lay.world() == 3 and lay.row_offset(2) == 4
    with pytest.raises(ValueError, match="brings its own topology"):
        D.build_layout(Ring(), Topology(3, 2))


def test_in_process_ranks_gather_reduce_and_pass_round_the_ring():
    world = InProcessWorld(3)

    def rank(topo):
        t = torch.full((2,), float(topo.rank), requires_grad=True)
        gathered = D.all_gather_with_grad(t, topo)
        (gathered * torch.arange(6.0)).sum().backward()
        ring = [(o, b.detach()[0].item()) for o, b in D.ring_blocks(t.detach(), topo)]
        return gathered.detach().tolist(), t.grad.tolist(), ring

    out = world.run(rank)
    for r, (gathered, grad, ring) in enumerate(out):
        assert gathered == [0, 0, 1, 1, 2, 2]
        assert grad == [3 * (2 * r), 3 * (2 * r + 1)]  # the sum over the 3 ranks of its slice's gradient
        assert ring == [(r, r), ((r - 1) % 3, (r - 1) % 3), ((r - 2) % 3, (r - 2) % 3)]


def test_an_in_process_rank_that_fails_releases_the_others():
    world = InProcessWorld(2, timeout=30)

    def rank(topo):
        if topo.rank == 1:
            raise RuntimeError("rank 1 broke")
        return D.all_gather_no_grad(torch.zeros(1), topo)

    with pytest.raises(RuntimeError, match="rank 1 broke"):
        world.run(rank)


def test_the_functional_face_runs_the_loss_module(monkeypatch):
    calls = []
    step = ContrastiveLoss._step

    def counting(self, *args):
        calls.append((type(self.objective).__name__, type(self.layout).__name__, self.layout.world()))
        return step(self, *args)

    monkeypatch.setattr(ContrastiveLoss, "_step", counting)
    x = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    F.infonce_loss(x, y, 10.0)
    F.sigmoid_loss(x, y, 10.0, -10.0)
    F.amortized_loss(x, y, 10.0, torch.zeros(4), torch.zeros(4))
    F.amortized_loss_terms(x, y, 10.0, torch.zeros(4), torch.zeros(4))
    assert calls == [("InfoNCE", "Gather", 1), ("Sigmoid", "Gather", 1), ("Linearized", "Gather", 1),
                     ("Linearized", "Gather", 1)]
    assert Objective.forward is nn.Module.forward  # no second place orders a step


def test_given_normalisers_keep_their_shape_errors():
    x = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    with pytest.raises(ValueError, match=r"log_norm_y must have shape \(B,\) = \(4,\), got \(5,\)"):
        F.amortized_loss(x, x, 1.0, torch.zeros(4), torch.zeros(5))  # a longer vector is not cut to fit
    assert F.GivenNormalizers(torch.zeros(4), torch.zeros(4)).state_dict() == {}  # stateless


def test_an_estimator_returning_more_normalisers_than_the_layout_gives_it_is_refused():
    from amortize.estimators import PartitionEstimate, PartitionEstimator

    class OneTooMany(PartitionEstimator):
        reads_features = False

        def forward(self, x, y, log_z_x, log_z_y, index=None):
            return PartitionEstimate(torch.zeros(log_z_x.shape[0] + 1), torch.zeros(log_z_y.shape[0]))

    x = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    with pytest.raises(ValueError, match=r"OneTooMany returned normalisers of shapes \(5,\) and \(4,\); "
                                         r"the layout gives it 4 rows and 4 columns"):
        ContrastiveLoss("linearized", OneTooMany())(x, x, torch.tensor(5.0))
