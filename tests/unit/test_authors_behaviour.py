"""Where the authors' code differs from the paper or from our older behaviour (docs/differences.md).

Every expected value here is worked out by hand in the test from the rule it checks: the epochs at
which a piecewise schedule switches, the steps at which the amortizer is fitted and its EMA moved,
the ramped EMA decays, the inner learning rate under a world size of 2. The two-process check of
``lr_scaling`` is in ``tests/distributed/test_lr_scaling.py``.
"""

import copy
import math
from pathlib import Path

import pytest
import torch

from amortize.comm import Topology
from amortize import functional as F
from amortize.estimators import AmortizedEstimator
from amortize.estimators.amortized import CADENCES, EPOCH0_PREVIOUS, LR_SCALINGS, NORMALIZERS, REINIT_POLICIES
from amortize.losses import ContrastiveLoss
from amortize.schedules import BetaWarmup, build_schedule, piecewise
from amortize.train.builders import build_loss
from amortize.train.config import load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
PAPER_AMORLIP_RECIPES = sorted(RECIPES.glob("amorlip-*-medium.yaml")) + sorted(RECIPES.glob("amorlip-*-large.yaml"))


def unit(n, d, seed=0):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ------------------------------------------------------------------ 1. piecewise schedules


def test_piecewise_gives_each_part_e_div_n_epochs_and_the_last_part_the_rest():
    # 30 epochs, 4 values: parts of 30 // 4 = 7 epochs (0-6, 7-13, 14-20) and the rest, 21-29 (9 epochs)
    medium = build_schedule({"name": "piecewise", "values": [6.5, 6.5, 6.5, -8.0]})
    assert [medium(e, 30) for e in range(30)] == [6.5] * 21 + [-8.0] * 9
    # 33 epochs, 3 values: 11 each; the authors' large list anneals from epoch 11 on
    large = build_schedule({"name": "piecewise", "values": [8.5, -8.5, -8.5]})
    assert [large(e, 33) for e in range(33)] == [8.5] * 11 + [-8.5] * 22
    # 10 epochs, 3 values: 10 // 3 = 3, so 0-2, 3-5 and 6-9 (4 epochs)
    assert [piecewise(e, 10, [1.0, 2.0, 3.0]) for e in range(10)] == [1.0] * 3 + [2.0] * 3 + [3.0] * 4
    # n == E: one epoch each
    assert [piecewise(e, 3, [1.0, 2.0, 3.0]) for e in range(3)] == [1.0, 2.0, 3.0]


def test_piecewise_with_fewer_epochs_than_values_takes_the_last_value_throughout():
    # E < n: E // n = 0, so the first n - 1 parts are empty (the authors' list is [values[-1]] * E)
    assert [piecewise(e, 2, [1.0, 2.0, 3.0, 4.0]) for e in range(2)] == [4.0, 4.0]
    assert [piecewise(e, 3, [8.5, -8.5, -8.5, -8.5]) for e in range(3)] == [-8.5] * 3
    # past the planned epochs the last part continues
    assert piecewise(12, 10, [1.0, 2.0, 3.0]) == 3.0


# ------------------------------------------------------------------ 2. inner lr x world size


def test_world_size_lr_scaling_recreates_adam_with_lr_times_w():
    two = Topology(2, 0)  # the layout's processes, which the loss passes as `topology`
    est = AmortizedEstimator(dim=4, lr=1e-3, lr_scaling="world_size")
    plain = AmortizedEstimator(dim=4, lr=1e-3)  # lr_scaling="none"
    x, z = unit(8, 4), torch.full((8,), 3.0)
    est(x, x, z, z, topology=two)  # the first step starts epoch 0 (a new optimiser) on 2 processes
    plain(x, x, z, z, topology=two)
    assert est._optimizer.param_groups[0]["lr"] == 0.002  # 1e-3 x 2
    assert est.inner_lr == 0.002
    assert plain._optimizer.param_groups[0]["lr"] == 0.001
    first = est._optimizer
    assert len(first.state) > 0
    est.start_epoch(1, 2)
    assert est._optimizer is not first and len(est._optimizer.state) == 0  # a new Adam, no moments
    assert est._optimizer.param_groups[0]["lr"] == 0.002


def test_world_size_lr_follows_the_world_size_of_a_resumed_run():
    x, z = unit(8, 4), torch.full((8,), 3.0)
    a = AmortizedEstimator(dim=4, lr=1e-3, lr_scaling="world_size")
    a(x, x, z, z, topology=Topology(4, 0))  # the first call starts epoch 0 on 4 processes
    assert a._optimizer.param_groups[0]["lr"] == 0.004
    saved = copy.deepcopy(a.state_dict())
    b = AmortizedEstimator(dim=4, lr=1e-3, lr_scaling="world_size")
    b.eval()
    b(x, x, z, z, topology=Topology(2, 1))  # resumed on 2 processes (the state is then replaced by the load)
    b.load_state_dict(saved)
    assert b._optimizer.param_groups[0]["lr"] == 0.002
    assert len(b._optimizer.state) > 0  # the moments came back


def test_the_lr_of_an_estimator_loaded_before_its_first_call_is_set_at_the_call():
    x, z = unit(8, 4), torch.full((8,), 3.0)
    a = AmortizedEstimator(dim=4, lr=1e-3, lr_scaling="world_size")
    a(x, x, z, z, topology=Topology(4, 0))
    b = AmortizedEstimator(dim=4, lr=1e-3, lr_scaling="world_size")
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # before any call: the default group, one process here
    assert b.inner_lr == 0.001 and b._optimizer.param_groups[0]["lr"] == 0.001
    fit = b.fit.run
    seen = []
    b.fit.run = lambda *args, **kw: (seen.append(b._optimizer.param_groups[0]["lr"]), fit(*args, **kw))[1]
    b(x, x, z, z, topology=Topology(3, 2))  # a step on 3 processes fits at lr x 3
    assert seen == [0.003] and b.inner_lr == 0.003


# ------------------------------------------------------------------ 3. fit and EMA cadence


def _cadence_trace(cadence, epochs=2, steps=5, update_every=3, ema_every=2):
    """Per epoch, which steps fitted (``amortizer_fit`` reported) and which moved the EMA."""
    est = AmortizedEstimator(dim=4, update_every=update_every, ema_every=ema_every, cadence=cadence, ema_decay=0.5)
    moved = []
    original = est._ema_update
    est._ema_update = lambda decay: (moved.append(True), original(decay))
    x, z = unit(6, 4), torch.full((6,), 2.0)
    fits, emas = [], []
    for epoch in range(epochs):
        est.start_epoch(epoch, epochs)
        fit_row, ema_row = [], []
        for _ in range(steps):
            n = len(moved)
            fit_row.append("amortizer_fit" in est(x, x, z, z).terms)
            ema_row.append(len(moved) > n)
        fits.append(fit_row)
        emas.append(ema_row)
    return fits, emas


def test_per_epoch_cadence_restarts_the_counter_at_every_epoch():
    # T_online = 3: fits at within-epoch steps 0 and 3; T_target = 2: EMA after steps 0, 2 and 4
    fits, emas = _cadence_trace("per_epoch")
    T, f = True, False
    assert fits == [[T, f, f, T, f], [T, f, f, T, f]]
    assert emas == [[T, f, T, f, T], [T, f, T, f, T]]


def test_global_cadence_counts_steps_over_the_run():
    # global steps 0-4 then 5-9; fits at 0, 3, 6, 9; EMA after steps 1, 3, 5, 7, 9 ((step + 1) % 2 == 0)
    fits, emas = _cadence_trace("global")
    T, f = True, False
    assert fits == [[T, f, f, T, f], [f, T, f, f, T]]
    assert emas == [[f, T, f, T, f], [T, f, T, f, T]]


def test_per_epoch_cadence_resumes_exactly_inside_an_epoch():
    x, z = unit(6, 4), torch.full((6,), 2.0)

    def make():
        return AmortizedEstimator(dim=4, update_every=3, ema_every=2, ema_decay=0.5)

    a = make()
    a.start_epoch(0, 2)
    for _ in range(5):
        a(x, x, z, z)
    a.start_epoch(1, 2)
    for _ in range(2):
        a(x, x, z, z)
    assert int(a.epoch_step) == 2 and int(a.step) == 7
    b = make()
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    b.start_epoch(1, 2)  # a resumed run repeats EPOCH_START: nothing changes
    assert int(b.epoch_step) == 2
    # within-epoch steps 2, 3, 4: a fit only at step 3, in both
    for expect_fit in (False, True, False):
        oa, ob = a(x, x, z, z), b(x, x, z, z)
        assert ("amortizer_fit" in oa.terms) == ("amortizer_fit" in ob.terms) == expect_fit
        assert torch.equal(oa.log_norm_x, ob.log_norm_x)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), k


# ------------------------------------------------------------------ 4. the authors' EMA mode


def test_ema_ramp_decay_follows_the_beta_cosine():
    est = AmortizedEstimator(dim=4, normalizer="ema_ramp", ema_decay=0.92, beta=BetaWarmup(0.8, 4))
    # beta_t = 0.8 - 0.4 (1 + cos(pi t / 4)) for t < 4, then 0.8
    r = 0.2 * math.sqrt(2.0)  # 0.4 cos(pi / 4)
    expected = [0.0, 0.4 - r, 0.4, 0.4 + r, 0.8, 0.8]
    assert [est.ema_decay_at(t, 6) for t in range(6)] == pytest.approx(expected, abs=1e-12)
    for normalizer in ("previous_blend", "ema_target"):  # the others keep the constant alpha
        other = AmortizedEstimator(dim=4, normalizer=normalizer, ema_decay=0.92, beta=BetaWarmup(0.8, 4))
        assert [other.ema_decay_at(t, 6) for t in range(6)] == [0.92] * 6


def test_ema_ramp_moves_the_target_with_the_ramped_decay_and_does_not_blend():
    est = AmortizedEstimator(dim=4, normalizer="ema_ramp", update_every=1, ema_every=1, beta=BetaWarmup(0.8, 4))
    seen_targets = []
    original = est._fit
    est._fit = lambda u, targets, *rest: (seen_targets.append(targets["image"].clone()), original(u, targets, *rest))[1]
    x, y = unit(8, 4, seed=1), unit(8, 4, seed=2)
    lz = torch.linspace(1.0, 3.0, 8)
    # epoch 0: decay 0, so after the step's EMA update the target IS the fitted online net
    est.start_epoch(0, 6)
    est(x, y, lz, lz)
    for pt, po in zip(est.target.parameters(), est.online.parameters()):
        assert torch.equal(pt, po)
    for epoch in (1, 2):
        est.start_epoch(epoch, 6)
    assert bool(est.has_previous) and est.beta == 0.4
    # epoch 2: decay 0.4: target <- 0.4 target + 0.6 online (after this step's fit)
    before = [p.clone() for p in est.target.parameters()]
    expected_norm = est.target["image"](x)  # the encoders are divided by the target net, read before its update
    seen_targets.clear()
    out = est(x, y, lz, lz)
    torch.testing.assert_close(out.log_norm_x, expected_norm)
    for pt, p0, po in zip(est.target.parameters(), before, est.online.parameters()):
        torch.testing.assert_close(pt, 0.4 * p0 + 0.6 * po, rtol=1e-6, atol=1e-7)
    # not blended: with beta = 0.4 and a previous network, Stage I still fits the batch sums
    assert torch.equal(seen_targets[0], lz)


def test_ema_target_blends_what_ema_ramp_does_not():
    # the same epoch in the paper's mode fits log(0.4 exp(prev) + 0.6 exp(lz))
    est = AmortizedEstimator(dim=4, normalizer="ema_target", beta=BetaWarmup(0.8, 4))
    seen = []
    original = est._fit
    est._fit = lambda u, targets, *rest: (seen.append(targets["image"].clone()), original(u, targets, *rest))[1]
    x, lz = unit(8, 4, seed=1), torch.linspace(1.0, 3.0, 8)
    for epoch in range(3):
        est.start_epoch(epoch, 6)
    prev = est.previous["image"](x)
    est(x, x, lz, lz)
    torch.testing.assert_close(seen[0], torch.log(0.4 * torch.exp(prev) + 0.6 * torch.exp(lz)))


# ------------------------------------------------------------------ 5. beta above 0 at epoch 0


def test_epoch_zero_is_never_blended_even_when_beta_starts_above_zero():
    # the authors would blend epoch 0 with the EMA copy of the untrained network; we have no
    # previous network in epoch 0, so Z_comb is the batch sum; from epoch 1 on beta = 0.5 blends
    est = AmortizedEstimator(dim=4, beta=0.5)
    x, lz = unit(8, 4), torch.linspace(1.0, 3.0, 8)
    est.start_epoch(0, 2)
    assert est.beta == 0.5
    out = est(x, x, lz, lz)
    assert torch.equal(out.log_norm_x, lz)
    est.start_epoch(1, 2)
    prev = est.previous["image"](x)
    out = est(x, x, lz, lz)
    torch.testing.assert_close(out.log_norm_x, torch.log(0.5 * torch.exp(prev) + 0.5 * torch.exp(lz)))


def test_epoch0_previous_initial_blends_epoch_zero_with_the_untrained_network():
    # the untrained linear amortizer has w = 0 and b = init_log_z = 2: log lambda_prev = 2 everywhere
    x, lz = unit(8, 4), torch.linspace(1.0, 3.0, 8)
    est = AmortizedEstimator(dim=4, amortizer={"name": "linear", "init_log_z": 2.0}, beta=0.5,
                             epoch0_previous="initial")
    est.start_epoch(0, 2)
    assert bool(est.has_previous)
    out = est(x, x, lz, lz)
    torch.testing.assert_close(out.log_norm_x, torch.log(0.5 * math.exp(2.0) + 0.5 * torch.exp(lz)))
    # with beta(0) = 0 (every recipe's beta_warmup) both choices give the batch sums in epoch 0
    for choice in EPOCH0_PREVIOUS:
        est = AmortizedEstimator(dim=4, beta=BetaWarmup(0.8, 16), epoch0_previous=choice)
        assert torch.equal(est(x, x, lz, lz).log_norm_x, lz)


# ------------------------------------------------------------------ 6. output bias


def test_output_bias_is_init_log_z_at_every_reinitialisation():
    est = AmortizedEstimator(dim=4, amortizer={"name": "residual_mlp", "init_log_z": 5.5})
    for epoch in range(2):
        est.start_epoch(epoch, 2)
        for net in (est.online, est.target):
            assert net["image"].out.bias.item() == 5.5 and net["text"].out.bias.item() == 5.5


# ------------------------------------------------------------------ 7. s = 100, near-duplicate pairs


def test_targets_stay_finite_at_s_100_where_a_float32_exp_sum_overflows():
    # four near-duplicate pairs: every score is ~100, and exp(100) ~ 2.7e43 > float32 max ~3.4e38
    x = torch.nn.functional.normalize(torch.ones(4, 8) + 1e-4 * unit(4, 8), dim=-1)
    y = x.clone()
    S = 100.0 * x @ y.T
    naive = torch.exp(S).sum(dim=1)  # what exponentiating in float32 gives
    assert torch.isinf(naive).all()
    log_z_x, log_z_y = F.log_partition(x, y, 100.0, pos_weight=1e-3)
    # log(3 e^100 + 1e-3 e^100) = 100 + log(3.001), up to the scores' distance from 100 (< 1e-3 here)
    assert torch.isfinite(log_z_x).all() and torch.isfinite(log_z_y).all()
    torch.testing.assert_close(log_z_x, torch.full((4,), 100.0 + math.log(3.001)), rtol=0, atol=1e-3)
    # and so are the amortizer's normalisers and the encoder loss
    loss = ContrastiveLoss("linearized", estimator=AmortizedEstimator(dim=8), pos_weight=1e-3)
    out = loss(x.clone().requires_grad_(), y.clone().requires_grad_(), torch.tensor(100.0))
    assert torch.isfinite(out["loss"])


# ------------------------------------------------------------------ the paper recipes and the schema


def test_unknown_choices_are_named_with_the_valid_ones():
    for option, valid in (("normalizer", NORMALIZERS), ("reinit", REINIT_POLICIES), ("cadence", CADENCES),
                          ("lr_scaling", LR_SCALINGS), ("epoch0_previous", EPOCH0_PREVIOUS)):
        with pytest.raises(ValueError, match=f"unknown {option} 'nope'; valid: {', '.join(valid)}"):
            AmortizedEstimator(dim=4, **{option: "nope"})


def test_every_paper_amorlip_recipe_selects_the_authors_behaviour():
    assert [p.name for p in PAPER_AMORLIP_RECIPES] == [
        "amorlip-fdiv-medium.yaml", "amorlip-log-l2-medium.yaml", "amorlip-fdiv-large.yaml", "amorlip-log-l2-large.yaml",
    ]
    for path in PAPER_AMORLIP_RECIPES:
        r = load_recipe(path)
        a = r.loss.estimator
        assert a["name"] == "amortized", path.name
        assert (a["cadence"], a["lr_scaling"], a["normalizer"], a["reinit"]) == (
            "per_epoch", "world_size", "previous_blend", "every_epoch"), path.name
        epochs = int(r.max_duration.removesuffix("ep"))
        assert build_schedule(a["beta"])(0, epochs) == 0.0, path.name  # no epoch-0 blend to differ on
        assert r.loss.rho["name"] == "piecewise", path.name
        est = build_loss(r, embed_dim=8).estimator
        assert (est.cadence, est.lr_scaling, est.normalizer, est.epoch0_previous) == (
            "per_epoch", "world_size", "previous_blend", "none")
