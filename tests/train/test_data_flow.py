"""Issue 28's bounces and double checks stay out: each value flows down once, checked once."""

from __future__ import annotations

import copy
import math

import pytest

from amortize.options import RecipeError
from amortize.train.config import load_recipe_dict
from amortize.train.schema import Recipe
from amortize.train.sections import bind_sections, bindings, build_schema

CLIP = math.log(1 / 0.07)


def _checked(data: dict) -> Recipe:
    return build_schema(Recipe, data)


def test_binding_does_not_write_into_the_recipe_it_reads():
    recipe = _checked({"model": "tiny", "loss": {"objective": "sigmoid"}})
    before = copy.deepcopy(recipe.__dict__)
    out = bind_sections(recipe)
    assert recipe.__dict__ == before and out is not recipe
    # the resolved recipe, made once from the bound sections, which it carries
    assert out.model["name"] == "tiny" and out.model["init_logit_scale"] == math.log(10.0)
    assert out.model["init_logit_bias"] == -10.0 and out.loss["objective"] == "sigmoid"
    b = bindings(out)
    assert b.get("model").resolved == dict(out.model) and b.get("model").source == dict(out.model)
    assert b.get("loss.layout") is not None  # the sections inside loss, read from its resolved options


@pytest.mark.parametrize("model, scale, bias", [
    ({}, CLIP, None),  # infonce: CLIP's
    ({"init_logit_scale": 1.5}, 1.5, None),  # the recipe's own value wins
    ({"init_logit_scale": None, "init_logit_bias": None}, CLIP, None),  # null: the preference
])
def test_the_model_takes_the_objectives_preference_where_it_leaves_it_unset(model, scale, bias):
    r = load_recipe_dict({"model": {"name": "tiny", **model}})
    assert r.model.init_logit_scale == scale and r.model.init_logit_bias == bias
    s = load_recipe_dict({"model": {"name": "tiny", **model}, "loss": {"objective": "sigmoid"}})
    assert s.model.init_logit_bias == -10.0
    assert s.model.init_logit_scale == (1.5 if model.get("init_logit_scale") else math.log(10.0))


def test_the_initial_logit_scale_has_one_default():
    # the towers' (build_model's); an objective states a preference only where it differs (sigmoid)
    import inspect

    from amortize.models import CLIP_INIT_LOGIT_SCALE, build_model
    from amortize.objectives import OBJECTIVES

    assert inspect.signature(build_model).parameters["init_logit_scale"].default == CLIP_INIT_LOGIT_SCALE == CLIP
    assert float(build_model("tiny").logit_scale) == pytest.approx(CLIP)
    assert not hasattr(OBJECTIVES.get("infonce"), "init_logit_scale")
    assert OBJECTIVES.get("sigmoid").init_logit_scale == math.log(10.0)


def test_a_bad_model_section_is_still_named():
    with pytest.raises(RecipeError, match=r"^model.init_logit_scale: expected float"):
        load_recipe_dict({"model": {"name": "tiny", "init_logit_scale": "big"}})
    with pytest.raises(RecipeError, match=r"^model: expected"):
        load_recipe_dict({"model": 5})


def test_max_scale_has_one_default_and_one_check():
    import inspect

    from amortize.train.algorithms import ClampLogitScale

    assert load_recipe_dict({}).max_scale == 100.0
    with pytest.raises(RecipeError, match=r"^max_scale: must be > 0"):
        load_recipe_dict({"max_scale": 0})
    assert inspect.signature(ClampLogitScale).parameters["max_scale"].default is inspect.Parameter.empty


def test_the_microbatch_size_is_passed_down_not_read_back():
    from amortize.gradcache import GradientCachePasses
    from amortize.train.gradcache import GradientCache, microbatch_trainer_kwargs

    on = microbatch_trainer_kwargs(GradientCachePasses(4), 16)
    assert [type(a) for a in on["algorithms"]] == [GradientCache] and on["device_train_microbatch_size"] == 16
    assert microbatch_trainer_kwargs(None, 16) == {"algorithms": [], "device_train_microbatch_size": 16}


def test_the_microbatch_size_is_checked_once_on_its_way(monkeypatch):
    # a recipe's device_train_microbatch_size: typed at load, range-checked once, by the object that
    # holds it, when the run is built, under the recipe's key; the batches it splits are not checked
    # again. The functional face checks its own argument (a caller without a recipe).
    import torch
    from torch import nn

    from amortize.gradcache import microbatch_sizes, split_batch
    from amortize.options import Range
    from amortize.train.gradcache import build_gradient_cache

    seen = []
    check = Range.check
    monkeypatch.setattr(Range, "check", lambda self, value, key: (seen.append(key), check(self, value, key))[1])
    recipe = load_recipe_dict({"device_train_microbatch_size": 4})
    passes = build_gradient_cache(recipe, nn.Linear(3, 2), 16)
    for _ in range(3):
        passes.encode(lambda b: (b * 2,), torch.randn(10, 3))
        passes._pending = None
    assert [k for k in seen if "microbatch" in k] == ["microbatch_size"]
    with pytest.raises(RecipeError, match=r"^device_train_microbatch_size: must be >= 1, got 0$"):
        build_gradient_cache(load_recipe_dict({"device_train_microbatch_size": 0}), nn.Linear(3, 2), 16)
    assert build_gradient_cache(load_recipe_dict({"device_train_microbatch_size": 16}), nn.Linear(3, 2), 16) is None
    with pytest.raises(ValueError, match=r"^microbatch_size: must be >= 1, got 0$"):
        microbatch_sizes(4, 0)
    with pytest.raises(ValueError, match=r"^microbatch_size: must be >= 1, got -1$"):
        split_batch(torch.zeros(4, 1), -1)


def test_the_stage1_penalty_is_looked_up_once_per_fit(monkeypatch):
    import torch
    from torch import nn

    from amortize.estimators.normalizer.fit import Fit
    from amortize.objectives import stage1

    fit = Fit(objective="kl", inner_steps=3)
    calls = []
    real = stage1.AMORTIZATION_OBJECTIVES.get
    monkeypatch.setattr(stage1.AMORTIZATION_OBJECTIVES, "get", lambda name: calls.append(name) or real(name))
    nets = nn.ModuleDict({"image": nn.Linear(2, 1), "text": nn.Linear(2, 1)})
    params = list(nets.parameters())
    x = torch.randn(4, 2)
    batch = {m: torch.randn(4) for m in ("image", "text")}
    fit.run(nets, params, fit.new_optimizer(params, 1), lambda n: {m: n[m](x).squeeze(1) for m in n}, batch, batch)
    assert calls == []
    # the same loss as the lookup by name
    pred, target = torch.randn(5), torch.randn(5)
    assert torch.equal(stage1.amortization_loss(pred, target, real("kl")), stage1.amortization_loss(pred, target, "kl"))
