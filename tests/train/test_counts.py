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
    # the estimator's amortizer section is bound once by the estimator; its networks are built
    # for both modalities at construction and at every epoch start (reinit: every_epoch)
    # its parts (normaliser, cadence, re-initialisation, epoch-0 rule, restart) are bound and built once,
    # and its fit's inner-optimiser section is bound once (the optimiser itself is rebuilt per epoch)
    parts = {"normalizer": 1, "cadence": 1, "reinit": 1, "epoch0_previous": 1, "restart": 1}
    assert dict(checked) == {**{k: 1 for k in SECTIONS + CHECKED_ONLY}, "amortizer": 1, "schedule": 1, **parts,
                             "fit.optimizer": 1}
    assert dict(built) == {**{k: 1 for k in SECTIONS}, "amortizer": 2 * 3, "schedule": 1, **parts}
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
