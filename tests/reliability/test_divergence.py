"""(3) Divergence: a non-finite loss or gradient is caught; ``skip`` leaves the state alone, ``stop``
saves the last good state and names the batch."""

from __future__ import annotations

import logging

import pytest
import torch

from amortize.checkpoints import safe_load
from amortize.train.builders import build_trainer
from amortize.train.config import RecipeError
from amortize.train.algorithms import DivergenceError, DivergenceGuard
from tests.reliability.common import PoisonBatch, RecordStates, assert_same, tiny_recipe

BAD = 3  # the poisoned batch (1-based)


def _fit(recipe, *callbacks):
    rec = RecordStates()
    trainer = build_trainer(recipe, callbacks=[rec, *callbacks])
    try:
        trainer.fit()
    finally:
        guard = next(a for a in trainer.state.algorithms if isinstance(a, DivergenceGuard))
        trainer.close()
    return rec.states, guard


@pytest.mark.parametrize("what", ["features", "grads"])
def test_skip_leaves_parameters_optimizer_and_estimator_untouched(what, tmp_path, caplog):
    """AmorLIP + AdamW with weight decay: the skipped step changes nothing (zero grads would)."""
    with caplog.at_level(logging.WARNING, logger="amortize.train.algorithms"):
        states, guard = _fit(tiny_recipe(tmp_path, ["divergence.policy=skip"]), PoisonBatch(BAD, what))
    assert guard.skipped == [BAD]
    assert_same(states[BAD - 1], states[BAD], f"state across the skipped batch {BAD}")
    # the steps around it really train: the guard does not freeze the run
    assert any(not torch.equal(v, states[BAD + 1]["model"][k]) for k, v in states[BAD]["model"].items())
    assert all(torch.isfinite(v).all() for v in states[max(states)]["model"].values() if v.is_floating_point())
    expected = "loss (nan)" if what == "features" else "gradient norm (inf)"
    assert any(f"batch {BAD} has a non-finite" in r.getMessage() and expected in r.getMessage()
               and "step skipped" in r.getMessage() for r in caplog.records), caplog.text


def test_stop_saves_last_good_state_and_names_the_batch(tmp_path):
    rec = RecordStates()
    trainer = build_trainer(tiny_recipe(tmp_path, ["divergence.policy=stop"]),
                            callbacks=[rec, PoisonBatch(BAD, "features")])
    with pytest.raises(DivergenceError, match=rf"diverged at batch {BAD} .*non-finite loss \(nan\).*policy 'stop'") as ei:
        trainer.fit()
    trainer.close()
    err = ei.value
    assert err.batch == BAD and err.checkpoint is not None and err.checkpoint.endswith(f"ba{BAD - 1}-rank0.pt")
    ck = safe_load(err.checkpoint)
    saved = ck["state"]["model"]
    good = rec.states[BAD - 1]
    for k, v in good["model"].items():
        assert torch.equal(saved[f"model.{k}"], v), k
    for k, v in good["loss_fn"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(saved[f"loss_fn.{k}"], v), k
    assert BAD not in rec.states  # the bad batch never finished


def test_consecutive_skips_escalate_to_stop(tmp_path):
    class AlwaysNaN(PoisonBatch):
        def run_event(self, event, state, logger):
            self.at = int(state.timestamp.batch) + 1
            super().run_event(event, state, logger)

    trainer = build_trainer(tiny_recipe(tmp_path, ["divergence.max_consecutive_skips=2"]), callbacks=[AlwaysNaN(0)])
    with pytest.raises(DivergenceError, match=r"batch 2 .*2 non-finite steps in a row"):
        trainer.fit()
    trainer.close()


def test_policy_is_a_checked_recipe_key(tmp_path):
    assert tiny_recipe(tmp_path).divergence.policy == "skip"  # the default
    assert tiny_recipe(tmp_path, ["divergence.policy=stop"]).divergence.policy == "stop"
    with pytest.raises(RecipeError, match="divergence.policy: 'ignore' is not one of skip, stop, none"):
        tiny_recipe(tmp_path, ["divergence.policy=ignore"])


def test_none_lets_the_loss_checks_raise(tmp_path):
    """Without the guard, the objective's own value check names the NaN features."""
    trainer = build_trainer(tiny_recipe(tmp_path, ["divergence.policy=none"]), callbacks=[PoisonBatch(2)])
    with pytest.raises(ValueError, match="contains NaN"):
        trainer.fit()
    trainer.close()
