"""Issue 28's recipe edge: the stored recipe is written once, from the bound sections, every option
resolved, nested sections included, so a resume sees a changed default."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import torch

from amortize.estimators.amortized import AmortizedEstimator
from amortize.options import RecipeError
from amortize.textfiles import read_yaml
from amortize.train import plan
from amortize.train.config import load_recipe, load_recipe_dict, recipe_to_dict
from amortize.train.sections import bindings

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
ALIASES = ("num_prototypes", "eps", "lr", "inner_steps", "restart_every")
DIM, NUM_SAMPLES = 16, 64
WRITTEN = ("optimizer_options", "network")
"""An estimator's records of its sections as written (a stored recipe writes their defaults too):
compared as what is built from them (the networks' modules, the inner optimiser)."""


def _stored(recipe) -> dict:
    """What a checkpoint stores of ``recipe``."""
    return recipe_to_dict(recipe)


def _written(path: Path) -> dict:
    """The recipe's stored dict as a checkpoint written before this change held it: each section
    inside ``loss`` as the recipe wrote it (or left out), the rest resolved."""
    old = _stored(load_recipe(path))
    loss = (read_yaml(path.read_text()) or {}).get("loss") or {}
    for sub in ("objective", "estimator", "rho", "layout"):
        if sub in loss:
            old["loss"][sub] = copy.deepcopy(loss[sub])
    return old


def test_the_stored_estimator_of_the_default_recipe_holds_every_option():
    r = load_recipe(ROOT / "recipes" / "default.yaml")
    stored = _stored(r)["loss"]["estimator"]
    assert len(stored) == 17 and list(stored)[0] == "name"
    for option in ("cadence", "clip_norm", "epoch0_previous", "log_l2_weight", "lr_scaling", "seed"):
        assert option in stored
    assert stored == bindings(r).get("loss.estimator").resolved
    # a part inside it: resolved too (the amortizer's constructor defaults included)
    assert stored["amortizer"] == bindings(r).get("loss.estimator").parts["amortizer"].resolved


def test_a_part_of_a_part_is_stored_resolved():
    r = load_recipe_dict({"loss": {"estimator": {"name": "amorlip_code", "fit": {"inner_steps": 5}}}})
    fit = _stored(r)["loss"]["estimator"]["fit"]
    assert fit["inner_steps"] == 5 and fit["lr_scaling"] == "world_size"  # the preset's, kept
    assert fit["optimizer"]["name"] == "adam" and fit["optimizer"]["lr"] == 1e-3
    assert "betas" in fit["optimizer"]  # the optimiser's own default, stored


def test_the_binding_step_does_not_write_into_the_section_it_reads():
    section = {"name": "neuclip", "num_prototypes": 32, "network": {"eps": 0.1}}
    data = {"loss": {"estimator": section}}
    before = copy.deepcopy(data)
    load_recipe_dict(data)
    assert data == before


def test_neuclips_stored_options_have_one_spelling():
    stored = _stored(load_recipe(ROOT / "recipes" / "neuclip-small-batch.yaml"))["loss"]["estimator"]
    assert not set(ALIASES) & set(stored)
    assert stored["network"]["num_prototypes"] == 256 and stored["network"]["eps"] == 0.0
    assert stored["fit"]["optimizer"]["lr"] == 0.2 and stored["fit"]["inner_steps"] == 10
    assert stored["restart"]["every"] == 500 and stored["restart"]["reset_optimizer"] == "none"


def test_an_alias_wins_over_its_path_in_the_stored_recipe_as_at_build():
    r = load_recipe_dict({"loss": {"estimator": {"name": "neuclip", "num_prototypes": 32,
                                                 "network": {"num_prototypes": 64}}}})
    stored = _stored(r)["loss"]["estimator"]
    assert stored["network"]["num_prototypes"] == 32 and "num_prototypes" not in stored


def test_an_alias_whose_part_lacks_its_path_is_refused_at_load_naming_it():
    with pytest.raises(RecipeError, match=r"loss\.estimator\.restart_every: stands for restart\.every"):
        load_recipe_dict({"loss": {"estimator": {"name": "neuclip", "restart": "none", "restart_every": 3}}})


def test_amortized_keeps_its_flat_names_the_only_spelling_it_offers():
    stored = _stored(load_recipe_dict({"loss": {"estimator": {"name": "amortized", "lr": 0.01}}}))["loss"]["estimator"]
    assert stored["lr"] == 0.01 and "fit" not in stored and "network" not in stored
    assert isinstance(stored["amortizer"], dict) and stored["amortizer"]["name"] == "residual_mlp"


def _hyper(obj, seen=None, depth=0):
    """The plain values an object holds, recursively (tensors as lists), to compare two builds."""
    seen = set() if seen is None else seen
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), obj.detach().flatten().tolist()[:64])
    if id(obj) in seen or depth > 8:
        return "..."
    seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        return [_hyper(v, seen, depth + 1) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _hyper(v, seen, depth + 1) for k, v in obj.items()}
    if hasattr(obj, "resolved") and hasattr(obj, "ctor"):  # a bound part the estimator rebuilds
        return ("bound", obj.name, dict(obj.resolved))
    if inspect.isroutine(obj) or inspect.isclass(obj):
        return getattr(obj, "__qualname__", type(obj).__name__)
    if hasattr(obj, "__dict__"):  # a module's hooks are numbered process-wide: not the estimator's
        return (type(obj).__qualname__, _hyper({k: v for k, v in vars(obj).items()
                                                if "hook" not in k and k not in WRITTEN}, seen, depth + 1))
    return type(obj).__qualname__


def _build(recipe):
    torch.manual_seed(0)
    return bindings(recipe).get("loss.estimator").build(dim=DIM, num_samples=NUM_SAMPLES)


def _assert_same_estimator(recipe):
    stored = _stored(recipe)
    again = load_recipe_dict(copy.deepcopy(stored))
    assert _stored(again) == stored  # the stored recipe is a fixed point
    a, b = _build(recipe), _build(again)
    assert type(a) is type(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else _hyper(sa[k]) == _hyper(sb[k])
               for k in sa)
    assert _hyper(a) == _hyper(b)
    fits = [getattr(e, "fit", None) for e in (a, b)]
    if all(hasattr(f, "new_optimizer") for f in fits):
        groups = [f.new_optimizer([torch.zeros(1, requires_grad=True)], 1).param_groups[0] for f in fits]
        assert {k: v for k, v in groups[0].items() if k != "params"} == \
            {k: v for k, v in groups[1].items() if k != "params"}


@pytest.mark.parametrize("path", [p for p in RECIPES if ((read_yaml(p.read_text()) or {}).get("loss") or {}).get("estimator")],
                         ids=lambda p: p.stem)
def test_the_stored_recipe_rebuilds_the_same_estimator(path):
    _assert_same_estimator(load_recipe(path))


@pytest.mark.parametrize("section", [
    {"name": "neuclip"}, {"name": "amortized"}, {"name": "amorlip_code"}, {"name": "amorlip_paper"},
    {"name": "neuclip", "num_prototypes": 32, "eps": 0.1, "lr": 0.3, "inner_steps": 2, "restart_every": 7,
     "network": {"num_prototypes": 8}, "fit": {"clip_norm": 2.0}},
    {"name": "amortized", "amortizer": {"name": "residual_mlp", "width_factor": 0.25}, "objective": "kl",
     "lr": 0.02, "inner_steps": 2, "clip_norm": None, "lr_scaling": "world_size", "normalizer": "ema_target"},
    {"name": "amorlip_paper", "fit": {"inner_steps": 5, "optimizer": {"name": "adagrad", "lr": 0.1}}, "beta": 0.5},
], ids=lambda s: "-".join(f"{k}" for k in s))
def test_a_presets_stored_options_rebuild_the_same_estimator(section):
    _assert_same_estimator(load_recipe_dict({"loss": {"estimator": section}}))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_its_stored_recipe_round_trips(path):
    stored = _stored(load_recipe(path))
    assert _stored(load_recipe_dict(copy.deepcopy(stored))) == stored


def test_a_changed_constructor_default_under_the_estimator_shows_on_resume(monkeypatch):
    old = _stored(load_recipe(ROOT / "recipes" / "default.yaml"))
    sig = AmortizedEstimator.__init__.__signature__
    changed = sig.replace(parameters=[p.replace(default=0.5) if p.name == "clip_norm" else p
                                      for p in sig.parameters.values()])
    monkeypatch.setattr(AmortizedEstimator.__init__, "__signature__", changed)
    new = _stored(load_recipe(ROOT / "recipes" / "default.yaml"))
    assert plan.recipe_differences(old, new) == ["loss.estimator.clip_norm: 1.0 -> 0.5"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_a_checkpoint_stored_before_resolves_to_todays_and_resumes(path):
    old, new = _written(path), _stored(load_recipe(path))
    resolved, ok = plan.stored_recipe(old)
    assert ok and resolved == new
    assert plan.recipe_differences(resolved, new) == []
    assert plan.recipe_differences(old, new, resolved=False) == []  # the fallback skips what it lacks


def test_the_old_stored_recipe_compared_as_written_would_differ():
    old, new = _written(ROOT / "recipes" / "default.yaml"), _stored(load_recipe(ROOT / "recipes" / "default.yaml"))
    assert any(d.startswith("loss.estimator.cadence") for d in plan.recipe_differences(old, new))


@pytest.mark.parametrize("recipe, overrides, line", [
    ("default", ["loss.estimator.lr=0.01"], "loss.estimator.lr: 0.005 -> 0.01"),
    ("neuclip-small-batch", ["loss.estimator.inner_steps=5"], "loss.estimator.fit.inner_steps: 10 -> 5"),
    ("neuclip-small-batch", ["loss.estimator.fit.clip_norm=2.0"], "loss.estimator.fit.clip_norm: None -> 2.0"),
    ("neuclip-small-batch", ["loss.estimator.lr=0.3"], "loss.estimator.fit.optimizer.lr: 0.2 -> 0.3"),
])
def test_a_real_change_of_a_nested_option_is_reported_against_an_old_checkpoint(recipe, overrides, line):
    path = ROOT / "recipes" / f"{recipe}.yaml"
    old, ok = plan.stored_recipe(_written(path))
    assert ok
    assert plan.recipe_differences(old, _stored(load_recipe(path, overrides))) == [line]


def test_a_changed_option_of_a_part_of_a_part_is_reported_against_an_old_checkpoint():
    old = plan.stored_recipe({"loss": {"estimator": {"name": "amorlip_code"}}})[0]
    new = _stored(load_recipe_dict({"loss": {"estimator": {"name": "amorlip_code", "fit": {"inner_steps": 5}}}}))
    assert plan.recipe_differences(old, new) == ["loss.estimator.fit.inner_steps: 3 -> 5"]
    new = _stored(load_recipe_dict({"loss": {"estimator": {"name": "amorlip_code",
                                                           "fit": {"optimizer": {"betas": [0.5, 0.9]}}}}}))
    assert plan.recipe_differences(old, new) == ["loss.estimator.fit.optimizer.betas: [0.9, 0.999] -> [0.5, 0.9]"]


def test_an_old_recipe_that_no_longer_loads_is_compared_as_written():
    old = _written(ROOT / "recipes" / "default.yaml")
    old["loss"]["estimator"] = {"name": "gone", "lr": 0.005}
    found, ok = plan.stored_recipe(old)
    assert not ok and found == old
    new = _stored(load_recipe(ROOT / "recipes" / "default.yaml"))
    assert plan.recipe_differences(found, new, resolved=False) == ["loss.estimator.name: 'gone' -> 'amortized'"]


def _resume(tmp_path, monkeypatch, old: dict, *overrides: str):
    recipe = load_recipe(ROOT / "recipes" / "default.yaml",
                         [f"save_folder={tmp_path}", "autoresume=true", "max_duration=10ep", *overrides])
    monkeypatch.setattr(plan, "_latest", lambda r: str(tmp_path / "latest-rank0.pt"))
    monkeypatch.setattr(plan, "_read", lambda p: (copy.deepcopy(old), {"epoch": 1, "batch": 4, "sample": 32}))
    return plan.decide_start(recipe)


def test_autoresume_of_a_checkpoint_stored_before_this_change(tmp_path, monkeypatch):
    stored = _stored(load_recipe(ROOT / "recipes" / "default.yaml",
                                 [f"save_folder={tmp_path}", "autoresume=true", "max_duration=10ep"]))
    old = copy.deepcopy(stored)
    old["loss"] = _written(ROOT / "recipes" / "default.yaml")["loss"]
    start = _resume(tmp_path, monkeypatch, old)
    assert start.mode == "autoresume" and start.changed == []
    with pytest.raises(RecipeError, match=r"loss\.estimator\.lr: 0\.005 -> 0\.01"):
        _resume(tmp_path, monkeypatch, old, "loss.estimator.lr=0.01")
