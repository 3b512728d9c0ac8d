"""The presets of the normaliser-network constructor are data: each builds what its parts spelled
out build, the Python spellings of before keep working, and a bad key is named."""

import pytest
import torch

from amortize.comm import ONE_PROCESS
from amortize.estimators import AmortizedEstimator, NormalizerNetworkEstimator, build_estimator
from amortize.estimators.normalizer import PRESETS, from_preset, neuclip
from amortize.estimators.normalizer.presets import PRESET_TABLE
from amortize.options import RecipeError
from tests.unit.test_normalizer_parts import _run as run_steps

# the presets as they were written out in full before they became data (at 91ff5f5)
SPELLED_OUT = {
    "amorlip_code": dict(
        network={"name": "residual_mlp", "width_factor": 1.0},
        fit={"objective": "log_l2", "optimizer": {"name": "adam", "lr": 1e-3}, "inner_steps": 3, "clip_norm": 1.0,
             "lr_scaling": "world_size"},
        normalizer="previous_blend", cadence="per_epoch", reinit="every_epoch", epoch0_previous="initial",
        restart="none", update_every=1, ema_decay=0.92, ema_every=2,
        beta={"name": "beta_warmup", "final": 0.8, "warmup_epochs": 16}),
    "amorlip_paper": dict(
        network={"name": "residual_mlp", "width_factor": 1.0},
        fit={"objective": "log_l2", "optimizer": {"name": "adam", "lr": 1e-3}, "inner_steps": 3, "clip_norm": 1.0,
             "lr_scaling": "none"},
        normalizer="ema_target", cadence="per_epoch", reinit="every_epoch", epoch0_previous="none",
        restart="none", update_every=1, ema_decay=0.92, ema_every=2,
        beta={"name": "beta_warmup", "final": 0.8, "warmup_epochs": 16}),
    "neuclip": dict(
        network={"name": "prototypes", "num_prototypes": 4096, "eps": 0.0},
        fit={"objective": "reverse_kl", "optimizer": {"name": "adagrad", "lr": 0.05}, "inner_steps": 10,
             "clip_norm": None, "lr_scaling": "none"},
        normalizer="online", cadence="global", reinit="never", epoch0_previous="none",
        restart={"name": "batch_embeddings", "every": 500}, update_every=1, ema_decay=0.0, ema_every=1, beta=0.0),
}


def _run(est):
    return run_steps(est, steps=4, scale=torch.tensor(10.0), bias=None, num_negatives=7.0, local_rows=False,
                     topology=ONE_PROCESS)


def _same(a, b):
    assert list(a.state_dict()) == list(b.state_dict())
    for oa, ob in zip(_run(a), _run(b)):
        assert torch.equal(oa.log_norm_x, ob.log_norm_x) and torch.equal(oa.log_norm_y, ob.log_norm_y)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), k


@pytest.mark.parametrize("name", sorted(SPELLED_OUT))
def test_each_preset_is_its_parts_spelled_out(name):
    over = {"network": {"num_prototypes": 4}} if name == "neuclip" else {}
    spelled = dict(SPELLED_OUT[name])
    if over:
        spelled["network"] = {**spelled["network"], "num_prototypes": 4}
    _same(from_preset(name, 6, **over), NormalizerNetworkEstimator(6, **spelled))
    _same(build_estimator(name, dim=6, **over), NormalizerNetworkEstimator(6, **spelled))


def test_amorlip_paper_is_written_as_amorlip_code_and_its_differences():
    assert PRESET_TABLE["amorlip_paper"].base == "amorlip_code"
    code, paper = PRESETS["amorlip_code"], PRESETS["amorlip_paper"]
    assert {k for k in code if code[k] != paper[k]} == {"fit", "normalizer", "epoch0_previous"}


def test_the_flat_names_of_before_still_build_the_same_estimator():
    flat = AmortizedEstimator(dim=6, amortizer={"name": "residual_mlp", "width_factor": 0.5}, objective="kl",
                              log_l2_weight=0.1, lr=2e-3, inner_steps=2, clip_norm=0.5, lr_scaling="world_size")
    parts = NormalizerNetworkEstimator(6, network={"name": "residual_mlp", "width_factor": 0.5},
                                       fit={"objective": "kl", "log_l2_weight": 0.1,
                                            "optimizer": {"name": "adam", "lr": 2e-3}, "inner_steps": 2,
                                            "clip_norm": 0.5, "lr_scaling": "world_size"})
    _same(flat, parts)
    assert (flat.amortizer, flat.objective, flat.log_l2_weight, flat.lr, flat.inner_steps, flat.clip_norm,
            flat.lr_scaling) == ({"name": "residual_mlp", "width_factor": 0.5}, "kl", 0.1, 2e-3, 2, 0.5, "world_size")
    # positional, as before: dim, amortizer, objective, log_l2_weight, lr, inner_steps
    _same(AmortizedEstimator(6, "residual_mlp", "log_l2", 0.0, 2e-3, 2), AmortizedEstimator(dim=6, lr=2e-3, inner_steps=2))
    # neuclip's flat names, positional too; a flat name is applied after a section given beside it
    _same(neuclip(6, 4, 0.1, 0.2, 3), neuclip(6, num_prototypes=4, eps=0.1, lr=0.2, inner_steps=3))
    est = neuclip(6, num_prototypes=4, lr=0.2, fit={"optimizer": {"lr": 0.9}, "inner_steps": 2},
                  restart={"reset_optimizer": "none"}, restart_every=7)
    assert (est.fit.lr, est.fit.inner_steps, est.fit.optimizer_name) == (0.2, 2, "adagrad")
    assert (est._restart.every, est._restart.reset_optimizer) == (7, "none")


def test_a_bad_python_option_is_named():
    with pytest.raises(RecipeError, match=r"amortizer.widht: unknown option of amortizer 'residual_mlp'"):
        AmortizedEstimator(dim=4, amortizer={"name": "residual_mlp", "widht": 1})
    with pytest.raises(RecipeError, match=r"fit.inner_stepz: unknown option"):
        from_preset("amorlip_code", 4, fit={"inner_stepz": 2})
    with pytest.raises(ValueError, match=r"unknown cadence 'globl'; valid: per_epoch, global"):
        NormalizerNetworkEstimator(4, cadence="globl")
    with pytest.raises(TypeError):
        neuclip(4, num_prototypez=3)
