"""Every section of recipes/default.yaml is checked once and every component constructed once.

The counts are taken while the recipe loads and a short run trains (through the command line), by
wrapping the binding step (:func:`amortize.registry.bind`, the one place a section is checked),
:meth:`amortize.registry.Bound.build` (the one place a section's component is constructed) and
the constructors of the components themselves (so that a construction outside the binding step,
such as a trial build, is counted too). Any count above the expected one fails.
"""

from __future__ import annotations

import collections
import functools
from pathlib import Path

import pytest

from amortize import registry
from amortize.cli import main
from amortize.comm import Gather
from amortize.estimators import AmortizedEstimator
from amortize.losses import ContrastiveLoss
from amortize.models import TwoTowerModel
from amortize.objectives import Objective
from amortize.train import sections
from amortize.eval.callback import EvalCallback
from composer.callbacks import LRMonitor, SpeedMonitor

DEFAULT = str(Path(__file__).resolve().parents[2] / "recipes" / "default.yaml")

# the default recipe's component sections, each checked once and built once
SECTIONS = ("model", "loss", "loss.objective", "loss.estimator", "loss.layout", "loss.rho", "data", "optimizer", "scheduler",
            "divergence", "callbacks[0]", "callbacks[1]")
# checked once, built by a run that evaluates (eval.tasks none: no callback)
CHECKED_ONLY = ("eval",)


@pytest.fixture()
def counts(monkeypatch):
    checked: collections.Counter = collections.Counter()
    built: collections.Counter = collections.Counter()
    constructed: collections.Counter = collections.Counter()
    guarded: collections.Counter = collections.Counter()
    bind, build = registry.bind, registry.Bound.build

    def counting_bind(ctor, options, key, **kw):
        checked[key] += 1
        return bind(ctor, options, key, **kw)

    def counting_build(self, *args, **kwargs):
        built[self.key] += 1
        return build(self, *args, **kwargs)

    monkeypatch.setattr(registry, "bind", counting_bind)
    monkeypatch.setattr(sections, "bind", counting_bind)
    monkeypatch.setattr(registry.Bound, "build", counting_build)
    for cls in (TwoTowerModel, ContrastiveLoss, AmortizedEstimator, Gather, LRMonitor, SpeedMonitor, EvalCallback):
        init = cls.__init__

        @functools.wraps(init)  # the binding step reads the constructor's signature through it
        def counting_init(self, *args, _init=init, _name=cls.__name__, **kwargs):
            if type(self).__name__ == _name:
                constructed[_name] += 1
            _init(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counting_init)
    check_parts = Objective.check_parts.__func__

    def counting_check_parts(cls, *args, **kwargs):
        guarded["objective x layout x estimator"] += 1
        return check_parts(cls, *args, **kwargs)

    monkeypatch.setattr(Objective, "check_parts", classmethod(counting_check_parts))
    return checked, built, constructed, guarded


def _run(tmp_path, *extra: str) -> list[str]:
    return ["train", DEFAULT, "model.name=tiny", "data.name=synthetic", "data.batch_size=8", "data.num_samples=16",
            "precision=fp32", "device=cpu", f"save_folder={tmp_path}", "log_to_console=false", "eval.tasks=none",
            *extra]


def test_default_recipe_sections_are_checked_once_and_built_once_in_a_short_run(counts, tmp_path):
    checked, built, constructed, guarded = counts
    assert main(_run(tmp_path, "max_duration=3ba")) == 0  # two epochs of two batches: two re-initialisations
    # the estimator's nested sections (its amortizer, beta schedule and normaliser) are bound with it,
    # at load, under their dotted keys, and nothing is bound when the run starts; the amortizer's
    # networks are built for both modalities at construction and at every epoch start (reinit:
    # every_epoch), the inner optimiser at construction and at every epoch start; the preset's own
    # parts (its fit and restart) were bound when the preset was defined, and are built once
    nested = ("loss.estimator.amortizer", "loss.estimator.beta", "loss.estimator.normalizer")
    assert dict(checked) == {k: 1 for k in SECTIONS + CHECKED_ONLY + nested}
    assert dict(built) == {**{k: 1 for k in SECTIONS}, "loss.estimator.amortizer": 2 * 3, "loss.estimator.beta": 1,
                           "loss.estimator.normalizer": 1, "fit": 1, "fit.optimizer": 3, "restart": 1}
    assert dict(constructed) == {"TwoTowerModel": 1, "ContrastiveLoss": 1, "AmortizedEstimator": 1, "Gather": 1,
                                 "LRMonitor": 1, "SpeedMonitor": 1}
    assert dict(guarded) == {"objective x layout x estimator": 1}  # when the loss is joined, not per step


def test_dry_run_binds_what_the_run_binds_once(counts, tmp_path):
    checked, built, constructed, _ = counts
    assert main(_run(tmp_path, "--dry-run")) == 0
    assert all(checked[k] == 1 for k in SECTIONS + CHECKED_ONLY) and max(checked.values()) == 1
    assert all(built[k] == 1 for k in SECTIONS)
    assert constructed["TwoTowerModel"] == 1 and constructed["AmortizedEstimator"] == 1


def test_eval_binds_the_model_section_only(counts, tmp_path, capsys):
    checked, built, constructed, _ = counts
    assert main(_run(tmp_path, "max_duration=1ba")) == 0
    checked.clear(), built.clear(), constructed.clear()
    assert main(["eval", str(tmp_path / "model.pt"), "--tasks", "emoji_heldout", "--device", "cpu"]) == 0
    assert dict(checked) == {"model": 1} and dict(built) == {"model": 1}
    assert constructed == {"TwoTowerModel": 1}


def test_an_evaluating_run_builds_its_callback_once_from_the_bound_eval_section(counts, tmp_path, monkeypatch):
    checked, built, constructed, _ = counts
    made = []
    init = EvalCallback.__init__

    @functools.wraps(init)  # the binding step reads the callback's signature through it
    def keeping(self, *args, **kwargs):
        made.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(EvalCallback, "__init__", keeping)
    args = [a if a != "eval.tasks=none" else "eval.tasks=default" for a in _run(tmp_path, "max_duration=1ba")]
    assert main(args) == 0
    assert checked["eval"] == 1 and built["eval"] == 1 and constructed["EvalCallback"] == 1
    (cb,) = made  # the timing left unset: the callback's own defaults
    assert (cb.every_n_epochs, cb.every_n_batches, cb.at_fit_end, cb.batch_size, cb.print_table) == (1, 0, True, 256, True)
    assert [t.name for t in cb.tasks] == ["fashion_mnist_test", "emoji_heldout"]


@pytest.mark.parametrize("estimator, key", [
    ("{name: normalizer_network, cadence: globl}", "loss.estimator.cadence: 'globl' is not one of per_epoch, global"),
    ("{name: normalizer_network, fit: {inner_stepz: 3}}",
     r"loss.estimator.fit.inner_stepz: unknown option of loss.estimator.fit \(did you mean 'inner_steps'\?\)"),
    ("{name: normalizer_network, fit: {optimizer: {name: adam, betaz: [0.9, 0.99]}}}",
     r"loss.estimator.fit.optimizer.betaz: unknown option of inner optimizer 'adam' \(did you mean 'betas'\?\)"),
    ("{name: normalizer_network, fit: {objective: log_l3}}", r"loss.estimator.fit.objective: unknown .*'log_l3'"),
    ("{name: normalizer_network, network: {name: residual_mlp, widht_factor: 1}}",
     r"loss.estimator.network.widht_factor: unknown option of amortizer 'residual_mlp' \(did you mean 'width_factor'\?\)"),
    ("{name: normalizer_network, network: resnet}", r"loss.estimator.network: unknown amortizer 'resnet'"),
    ("{name: normalizer_network, restart: {name: batch_embeddings, evry: 5}}",
     r"loss.estimator.restart.evry: unknown option of restart 'batch_embeddings'"),
    ("{name: normalizer_network, beta: {name: beta_warmup, final_value: 0.8}}",
     r"loss.estimator.beta.final_value: unknown option of schedule 'beta_warmup'"),
    ("{name: amorlip_code, fit: {inner_stepz: 3}}", r"loss.estimator.fit.inner_stepz: unknown option"),
    ("{name: amorlip_paper, network: {widht_factor: 1}}", r"loss.estimator.network.widht_factor: unknown option"),
    ("{name: neuclip, restart: {reset_optimiser: all}}", r"loss.estimator.restart.reset_optimiser: unknown option"),
    ("{name: neuclip, num_prototypez: 8}", r"loss.estimator.num_prototypez: unknown option of estimator 'neuclip'"),
    ("{name: amortized, amortizer: {name: residual_mlp, widht_factor: 1}}",
     r"loss.estimator.amortizer.widht_factor: unknown option of amortizer 'residual_mlp'"),
    ("{name: amortized, reinit: sometimes}", r"loss.estimator.reinit: 'sometimes' is not one of every_epoch, never"),
    ("{name: amortized, lr_scaling: world}", r"loss.estimator.lr_scaling: 'world' is not one of none, world_size"),
    ("{name: exact_positive, inner: {name: amortized, amortizer: {name: residual_mlp, widht_factor: 1}}}",
     r"loss.estimator.inner.amortizer.widht_factor: unknown option of amortizer 'residual_mlp'"),
    ("{name: moving_average, gamma: {name: cosine_decay, strat: 1}}", r"loss.estimator.gamma.strat: unknown option"),
])
def test_a_typo_in_a_nested_section_fails_at_load_naming_its_dotted_key(estimator, key):
    """Every nested section of an estimator (its network, fit, fit optimiser, normaliser, restart,
    schedule, inner estimator) is bound with it when the recipe loads: a typo fails there, by key."""
    from amortize.options import RecipeError
    from amortize.train.config import load_recipe

    with pytest.raises(RecipeError, match=key):
        load_recipe(DEFAULT, [f"loss.estimator={estimator}", "loss.objective={name: linearized}"])


def test_a_nested_section_is_bound_at_load_and_nothing_is_bound_when_built(counts, tmp_path):
    """The estimator's nested sections are bound once, at load; building the loss binds nothing more."""
    from amortize.train.builders import build_loss
    from amortize.train.config import load_recipe

    checked, built, _, _ = counts
    recipe = load_recipe(DEFAULT, ["loss.estimator={name: amorlip_code, fit: {inner_steps: 2}}"])
    assert {k for k in checked if k.startswith("loss.estimator")} == {
        "loss.estimator", "loss.estimator.network", "loss.estimator.fit", "loss.estimator.fit.optimizer",
        "loss.estimator.normalizer", "loss.estimator.restart", "loss.estimator.beta"}
    before = dict(checked)
    est = build_loss(recipe, embed_dim=8).estimator
    assert dict(checked) == before
    assert est.fit.inner_steps == 2 and est.fit.lr_scaling == "world_size"  # merged into the preset's fit
