"""The recipe schema: typed keys, named errors, overrides, safe YAML; every shipped recipe loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from amortize.train.config import (
    Recipe,
    RecipeError,
    apply_overrides,
    load_recipe,
    load_recipe_dict,
    recipe_to_dict,
    recipe_to_yaml,
)

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def test_defaults_and_round_trip():
    r = load_recipe_dict(None)
    assert isinstance(r, Recipe) and r.loss.objective == {"name": "linearized", "pos_weight": 1.0}  # stored resolved
    import yaml

    assert load_recipe_dict(yaml.safe_load(recipe_to_yaml(r))) == r


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_loads(path):
    r = load_recipe(path)
    assert r.run_name == path.stem
    assert r.device_train_microbatch_size is None


def test_recipes_cover_every_method_at_both_scales():
    names = {p.stem for p in RECIPES}
    for method in ("clip", "siglip", "sogclr", "fastclip", "amorlip-log-l2", "amorlip-fdiv"):
        assert {f"{method}-medium", f"{method}-large"} <= names
    assert "default" in names


def test_unknown_key_names_itself_and_the_valid_ones():
    with pytest.raises(RecipeError, match=r"loss.estimator.lrr: unknown option of estimator 'amortized' \(did you mean 'lr'\?\); valid: .*inner_steps"):
        load_recipe_dict({"loss": {"estimator": {"name": "amortized", "lrr": 1}}})
    with pytest.raises(RecipeError, match=r"'loss.amortizer' moved in 0.2: use loss.estimator"):
        load_recipe_dict({"loss": {"amortizer": {"lr": 1}}})
    with pytest.raises(RecipeError, match="unknown key 'epochs'.*max_duration"):
        load_recipe_dict({"epochs": 3})


def test_mistyped_value_names_key_and_type():
    with pytest.raises(RecipeError, match=r"optimizer.lr: expected float, got str 'fast'"):
        load_recipe_dict({"optimizer": {"lr": "fast"}})
    with pytest.raises(RecipeError, match=r"data.batch_size: expected int"):
        load_recipe_dict({"data": {"batch_size": 1.5}})
    with pytest.raises(RecipeError, match=r"loss.objective: unknown objective 'clip'; valid: dcl, infonce, linearized, sigmoid"):
        load_recipe_dict({"loss": {"objective": "clip"}})
    with pytest.raises(RecipeError, match=r"optimizer.betas\[1\]: expected float"):
        load_recipe_dict({"optimizer": {"betas": [0.9, "x"]}})


def _build_loss(data: dict):
    """Load (the binding step) and build the loss once, as the run and ``--dry-run`` do."""
    from amortize.train.builders import build_loss

    return build_loss(load_recipe_dict(data), embed_dim=8, num_samples=16)


def test_inconsistent_estimator_is_refused_when_the_loss_is_built():
    recipe = {"loss": {"objective": "infonce", "estimator": "amortized"}}
    load_recipe_dict(recipe)  # each section is fine on its own; nothing is built at load
    with pytest.raises(RecipeError, match="^loss: .*needs an objective that takes normalisers"):
        _build_loss(recipe)


def test_overrides_parse_values_as_yaml():
    data = apply_overrides({"optimizer": {"lr": 0.1}}, ["max_duration=20ba", "optimizer.lr=2e-3",
                                                        "loss.rho={name: piecewise, values: [1, -1]}",
                                                        "save_folder=null"])
    r = load_recipe_dict(data)
    assert r.max_duration == "20ba" and r.optimizer.lr == 0.002 and r.save_folder is None
    assert r.loss.rho == {"name": "piecewise", "values": [1, -1]}
    with pytest.raises(RecipeError, match="key.sub=value"):
        apply_overrides({}, ["max_duration"])


def test_yaml_is_read_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(p)


def test_recipe_is_plain_python():
    d = recipe_to_dict(load_recipe_dict({}))
    stack = [d]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        else:
            assert v is None or isinstance(v, (str, int, float, bool))


def test_repeated_override_key_is_refused_with_the_shell_hint(capsys):
    """An unquoted brace pattern expands to many overrides of one key; the last would silently win."""
    from amortize.train.config import check_unique_overrides

    with pytest.raises(RecipeError, match=r"override key 'data.shards' is given twice.*quote it"):
        check_unique_overrides(["data.shards=/d/00000.tar", "max_duration=2ba", "data.shards=/d/00001.tar"])
    check_unique_overrides(["data.shards='/d/{00000..00002}.tar'", "max_duration=2ba"])
    # the command line refuses it too, before anything is built
    from amortize.cli import main

    recipe = str(RECIPES[0].parent / "default.yaml")
    assert main(["train", recipe, "data.shards=/d/0.tar", "data.shards=/d/1.tar", "--dry-run"]) == 2
    assert "given twice" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.rho={name: piecewize}", r"loss.rho: .*unknown schedule 'piecewize'"),
        ("loss.estimator={name: moving_average, gamma: [1, 2]}",
         r"loss.estimator.gamma: expected float or mapping or .*, got list \[1, 2\]"),
        ("loss.estimator={name: amortized, normalizer: blend}",
         r"loss.estimator.normalizer: 'blend' is not one of previous_blend, ema_target, ema_ramp"),
        ("loss.estimator={name: amortized, inner_steps: 2.5}", r"loss.estimator.inner_steps: expected int, got float"),
        ("loss.estimator={name: amortized, beta: {name: beta_warmup, final_value: 0.8}}",
         r"^loss.estimator.beta.final_value: unknown option of schedule 'beta_warmup'"),
        ("loss.objective={name: linearized, pos_weight: high}", r"loss.objective.pos_weight: expected float"),
        ("eval.tasks=datacmop", r"eval.tasks: 'datacmop' is not one of default, none"),
        ("data={name: webdataset, sampling: random}", r"data.sampling: 'random' is not one of split, resampled"),
        ("data.shards=/d/0.tar", r"^data.shards: unknown option of dataset 'shipped'; valid: batch_size, num_workers, "
                                 r"drop_last, tokenizer$"),
        ("data.name=imagenet", r"^data.name: unknown dataset 'imagenet'; valid: shipped, synthetic, webdataset$"),
        ("divergence.policy=ignore", r"^divergence.policy: 'ignore' is not one of skip, stop, none$"),
        ("model.lock_image={unlocked_groups: -1}", r"^model.lock_image.unlocked_groups: must be >= 0"),
        ("loss.chunk_size=0", r"loss.chunk_size: must be >= 1, got 0"),
    ],
)
def test_names_types_and_choices_of_sections_are_checked_at_load(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe_dict(apply_overrides({}, [override]))


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.estimator.amortizer={name: residual_mlp, width_factor: 0}", r"^loss.estimator.* width_factor must be > 0"),
        ("loss.objective={name: linearized, pos_weight: -1}", r"^loss.objective: "),
        ("loss.layout=ring_of_fire", r"^loss.layout: unknown layout 'ring_of_fire'"),
    ],
)
def test_values_inside_nested_sections_are_checked_when_built_once(override, message):
    """What only the constructor can judge (a value's range) fails when the loss is built, once, under
    the section's key: at ``--dry-run`` at the latest, never by a trial build at load (a nested
    section's names and types are checked at load)."""
    with pytest.raises(RecipeError, match=message):
        _build_loss(apply_overrides({"loss": {"estimator": "amortized"}}, [override]))


def test_resampled_webdataset_needs_an_epoch_length():
    with pytest.raises(RecipeError, match="needs data.num_samples"):
        load_recipe_dict(apply_overrides({}, ["data.name=webdataset", "data.sampling=resampled"]))
