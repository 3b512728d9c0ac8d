"""Parameter groups, optimisers by name, and models from open_clip configs."""

from __future__ import annotations

import pytest
import torch

from amortize.models import build_model, model_config
from amortize.options import RecipeError
from amortize.train.optim import OPTIMIZERS, build_optimizer, param_groups


def test_groups_follow_open_clip_and_skip_frozen_parameters():
    m = build_model("tiny")
    frozen = torch.nn.Linear(4, 4).requires_grad_(False)
    holder = torch.nn.ModuleDict({"model": m, "frozen": frozen})
    groups = {g["name"]: g for g in param_groups(holder, weight_decay=0.2, logit_scale_lr=1e-4)}
    ids = {n: {id(p) for p in g["params"]} for n, g in groups.items()}
    assert ids["logit_scale"] == {id(m.logit_scale)} and groups["logit_scale"]["lr"] == 1e-4
    assert groups["logit_scale"]["weight_decay"] == 0.0 and groups["no_decay"]["weight_decay"] == 0.0
    assert groups["decay"]["weight_decay"] == 0.2
    for name, p in m.named_parameters():
        if p.ndim < 2 or "ln" in name or "bias" in name:
            assert id(p) not in ids["decay"], name
    assert not any(id(p) in s for p in frozen.parameters() for s in ids.values())


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_registered_optimizer_steps(name):
    """One step moves every parameter that got a non-zero gradient (the image tower and the logit
    scale) and leaves alone the text tower, which took no part in the loss (its grads stay None)."""
    torch.manual_seed(0)
    m = build_model("tiny")
    opt = build_optimizer(m, {"name": name, "lr": 1e-3})
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    x = m.encode_image(torch.randn(2, 3, 28, 28)).sum() + m.logit_scale
    x.backward()
    opt.step()
    with_grad = {k for k, v in m.named_parameters() if v.grad is not None and bool(v.grad.abs().sum() > 0)}
    without_grad = {k for k, v in m.named_parameters() if v.grad is None}
    assert "clip.logit_scale" in with_grad and any(k.startswith("clip.visual.") for k in with_grad)
    assert any(k.startswith("clip.transformer.") for k in without_grad)
    params = dict(m.named_parameters())
    unmoved = sorted(k for k in with_grad if torch.equal(params[k], before[k]))
    assert not unmoved, f"{name} left parameters with gradients unchanged: {unmoved}"
    moved = sorted(k for k in without_grad if not torch.equal(params[k], before[k]))
    assert not moved, f"{name} changed parameters without gradients: {moved}"


def test_unknown_optimizer_lists_valid_ones():
    with pytest.raises(RecipeError, match="^optimizer: unknown optimizer 'adamx'.*valid: .*adamw.*lamb"):
        build_optimizer(build_model("tiny"), {"name": "adamx"})


def test_an_optimizer_section_takes_its_class_options_with_its_defaults():
    """``momentum`` is an option of sgd, not of adamw; defaults come from the class; ranges are declared once."""
    from amortize.train.sections import bind_section

    sgd = build_optimizer(build_model("tiny"), {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True})
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"] is True
    assert bind_section("optimizer", "adamw").resolved["eps"] == 1e-8  # torch's AdamW default
    with pytest.raises(RecipeError, match=r"^optimizer.momentum: unknown option of optimizer 'adamw'; valid: .*betas"):
        bind_section("optimizer", {"name": "adamw", "momentum": 0.9})
    with pytest.raises(RecipeError, match=r"^optimizer.momentum: must be in \[0, 1\), got 1.5"):
        bind_section("optimizer", {"name": "sgd", "momentum": 1.5})
    with pytest.raises(RecipeError, match=r"^optimizer.logit_scale_lr: must be >= 0"):
        bind_section("optimizer", {"name": "lamb", "logit_scale_lr": -1.0})


def test_a_scheduler_section_takes_its_functions_options():
    from amortize.train.sections import bind_section

    assert bind_section("scheduler", "cosine_with_warmup").resolved == {"name": "cosine_with_warmup", "t_warmup": "0ba",
                                                                        "alpha_f": 0.0}
    with pytest.raises(RecipeError, match=r"^scheduler.t_warmup: unknown option of scheduler 'constant'; valid: \(none\)"):
        bind_section("scheduler", {"name": "constant", "t_warmup": "1ep"})
    with pytest.raises(RecipeError, match=r"^scheduler.t_warmup: 'soon' is not a time string"):
        bind_section("scheduler", {"name": "linear_with_warmup", "t_warmup": "soon"})


@pytest.mark.parametrize("name", ["RN50", "ViT-B-32"])
def test_paper_towers_build_offline(name):
    cfg = model_config(name)
    assert cfg["embed_dim"] in (1024, 512)
    m = build_model(name, image_size=64 if name == "RN50" else 32)
    assert m.encode_text(torch.zeros(1, 77, dtype=torch.long)).shape == (1, cfg["embed_dim"])


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="unknown model 'ViT-Q'"):
        model_config("ViT-Q")


def test_beta2_follows_the_batch_from_its_reference_batch():
    """``beta2_reference_batch``: the section's beta2 is right at that batch; the run's keeps its half-life in samples."""
    from amortize.train.optim import beta2_at_batch, beta2_half_life

    section = {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.98], "beta2_reference_batch": 256}
    opt = build_optimizer(build_model("tiny"), section, batch_size=16)
    b1, b2 = opt.param_groups[0]["betas"]
    assert b1 == 0.9 and b2 == pytest.approx(0.98 ** (16 / 256)) and b2 == pytest.approx(0.998738, abs=1e-6)
    assert beta2_half_life(b2, 16) == pytest.approx(beta2_half_life(0.98, 256))
    assert beta2_at_batch(0.98, 256, 256) == 0.98
    same = build_optimizer(build_model("tiny"), {**section, "beta2_reference_batch": None}, batch_size=16)
    assert tuple(same.param_groups[0]["betas"]) == (0.9, 0.98)  # without the option: betas as written


@pytest.mark.parametrize("section, batch, message", [
    ({"name": "sgd", "lr": 0.1, "beta2_reference_batch": 256}, 16, "optimizer.beta2_reference_batch: .*'sgd' has none"),
    ({"name": "adamw", "beta2_reference_batch": 256}, None, "optimizer.beta2_reference_batch: .*batch size"),
    ({"name": "adamw", "beta2_reference_batch": 0}, 16, "beta2_reference_batch"),
])
def test_beta2_reference_batch_errors_name_the_key(section, batch, message):
    with pytest.raises(RecipeError, match=message):
        build_optimizer(build_model("tiny"), section, batch_size=batch)


def test_the_resolved_betas_are_printed_by_the_dry_run(tmp_path):
    from amortize.train.builders import dry_run
    from amortize.train.config import load_recipe
    from tests.integration.helpers import RECIPES, tiny_overrides

    recipe = load_recipe(RECIPES / "clip-medium.yaml", tiny_overrides(16, 32, tmp_path, "1ba")
                         + ["optimizer.betas=[0.9, 0.98]", "optimizer.beta2_reference_batch=256"])
    line = next(x for x in dry_run(recipe) if x.startswith("optimizer:"))
    assert "betas 0.9 / 0.998738" in line and "half-life 8,783 samples at batch 16" in line, line
