"""The normaliser-network estimator's parts, presets and declared state."""

import pytest
import torch

from amortize import functional as F
from amortize.estimators import (
    ESTIMATORS,
    AmortizedEstimator,
    MovingAverageEstimator,
    NormalizerNetworkEstimator,
    build_estimator,
)
from amortize.estimators.normalizer import PRESETS, from_preset
from amortize.losses import ContrastiveLoss
from amortize.registry import SectionError
from amortize.train.compat import loss_state_to_ignore, rollback_keys


def unit(n, d, seed=0):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _run(est, steps=5, epochs=(0, 1), **inputs):
    """The estimator's outputs over ``epochs`` of ``steps`` random unit batches (``inputs``: its declared inputs)."""
    outs = []
    for epoch in epochs:
        est.start_epoch(epoch, 4)
        for t in range(steps):
            x, y = unit(8, 6, seed=3 * t + epoch), unit(8, 6, seed=3 * t + 1 + epoch)
            lzx, lzy = F.log_partition(x, y, 10.0, pos_weight=1e-3)
            outs.append(est(x, y, lzx, lzy, **inputs))
    return outs


@pytest.mark.parametrize("normalizer", ["previous_blend", "ema_target", "ema_ramp"])
@pytest.mark.parametrize("cadence", ["per_epoch", "global"])
def test_the_flat_amortized_keys_are_the_parts_spelled_out(normalizer, cadence):
    flat = AmortizedEstimator(dim=6, objective="reverse_kl", lr=2e-3, inner_steps=2, update_every=2, ema_every=3,
                              beta=0.5, normalizer=normalizer, cadence=cadence, epoch0_previous="initial")
    parts = NormalizerNetworkEstimator(
        6, network="residual_mlp",
        fit={"objective": "reverse_kl", "optimizer": {"name": "adam", "lr": 2e-3}, "inner_steps": 2},
        normalizer=normalizer, cadence=cadence, epoch0_previous="initial", update_every=2, ema_every=3, beta=0.5)
    assert list(flat.state_dict()) == list(parts.state_dict())
    for a, b in zip(_run(flat), _run(parts)):
        assert torch.equal(a.log_norm_x, b.log_norm_x) and torch.equal(a.log_norm_y, b.log_norm_y)
    for (k, va), vb in zip(flat.state_dict().items(), parts.state_dict().values()):
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), k


def test_every_preset_builds_and_trains_by_name():
    for name in PRESETS:
        est = build_estimator(name, dim=6) if name in ESTIMATORS else from_preset(name, 6)
        loss = ContrastiveLoss("linearized", estimator=est, pos_weight=0.0)
        out = loss(unit(8, 6).requires_grad_(), unit(8, 6, 1).requires_grad_(), torch.tensor(10.0))
        assert torch.isfinite(out["loss"]), name
    assert build_estimator("amorlip_paper", dim=6, fit={"objective": "kl"}).fit.objective == "kl"
    assert build_estimator("amorlip_paper", dim=6).normalizer == "ema_target"
    assert build_estimator("amorlip_code", dim=6).fit.lr_scaling == "world_size"


def test_unknown_parts_and_options_are_named():
    with pytest.raises(SectionError, match="unknown normalizer 'nope'"):
        NormalizerNetworkEstimator(4, normalizer="nope")
    with pytest.raises(SectionError, match="unknown inner optimizer 'sgd'"):
        NormalizerNetworkEstimator(4, fit={"optimizer": {"name": "sgd"}})
    with pytest.raises(ValueError, match="restart 'batch_embeddings' needs a network with a restart"):
        NormalizerNetworkEstimator(4, restart={"name": "batch_embeddings", "every": 3})
    with pytest.raises(ValueError, match="keeps no EMA network"):
        AmortizedEstimator(dim=4, normalizer="online")
    with pytest.raises(ValueError, match="unknown option 'gamma' of preset 'neuclip'"):
        from_preset("neuclip", 4, gamma=1)
    with pytest.raises(ValueError, match=r"AmortizedEstimator was built with dim=32 but x has shape \(4, 16\)"):
        AmortizedEstimator(dim=32)(unit(4, 16), unit(4, 16), torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="epoch must be a whole number >= 0"):
        AmortizedEstimator(dim=4).start_epoch(-3, 4)


def test_the_declared_state_is_what_ddp_ignores_and_the_guard_rolls_back():
    for est in (AmortizedEstimator(dim=6), MovingAverageEstimator(10), build_estimator("neuclip", dim=6,
                                                                                        num_prototypes=4)):
        loss = ContrastiveLoss("linearized", estimator=est)
        everything = [f"loss_fn.{n}" for n, _ in loss.named_parameters()] + [f"loss_fn.{n}" for n, _ in loss.named_buffers()]
        assert loss_state_to_ignore(loss) == everything  # the same list DDP was given before the declaration
        assert rollback_keys(loss) == list(loss.state_dict())
        declared = dict(est.declared_tensors())
        assert set(declared) == {n for n, _ in est.named_parameters()} | {n for n, _ in est.named_buffers()}
        assert all(r.cross_process == "identical" and r.resume == "restore" for r in declared.values())
    assert set(AmortizedEstimator(dim=6).state_rules()) == {
        "step", "epoch_step", "epoch", "max_epochs", "has_previous", "online", "target", "previous", "_extra_state"}


def test_reset_state_rows_resets_only_the_named_rows_to_the_initial_state():
    from amortize.estimators.normalizer.parts import reset_state_rows

    p = torch.nn.Parameter(torch.ones(4, 3))
    for opt, key, fill in ((torch.optim.Adagrad([p], lr=0.1, initial_accumulator_value=0.5), "sum", 0.5),
                           (torch.optim.Adam([p], lr=0.1), "exp_avg_sq", 0.0)):
        p.grad = torch.full((4, 3), 2.0)
        opt.step()
        before = opt.state[p][key].clone()
        reset_state_rows(opt, p, torch.tensor([1, 3]))
        assert torch.equal(opt.state[p][key][[0, 2]], before[[0, 2]])
        assert torch.all(opt.state[p][key][[1, 3]] == fill)
        reset_state_rows(opt, p, None)
        assert torch.all(opt.state[p][key] == fill)
    with pytest.raises(ValueError, match="not optimised by this optimizer"):
        reset_state_rows(torch.optim.Adagrad([torch.nn.Parameter(torch.ones(2))]), p, torch.tensor([0]))


def test_the_restart_reset_rule_is_named_and_bools_map_onto_it():
    from amortize.estimators.normalizer.parts import BatchEmbeddingRestart

    assert BatchEmbeddingRestart(reset_optimizer=True).reset_optimizer == "restarted"
    assert BatchEmbeddingRestart(reset_optimizer=False).reset_optimizer == "none"
    assert BatchEmbeddingRestart().reset_optimizer == "restarted"
    assert build_estimator("neuclip", dim=6, restart={"reset_optimizer": "all"})._restart.reset_optimizer == "all"
    with pytest.raises(ValueError, match="unknown restart.reset_optimizer 'sometimes'; valid: restarted, all, none"):
        BatchEmbeddingRestart(reset_optimizer="sometimes")
