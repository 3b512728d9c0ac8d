"""The estimator monitor in training: on by default for a stateful estimator, one console line per
warning, off by a named option, absent for in-batch losses (amortize.train.callbacks.EstimatorMonitorCallback)."""

from __future__ import annotations

from amortize.cli import main
from amortize.train.callbacks import EstimatorMonitorCallback
from amortize.train.builders import build_trainer
from tests.integration.helpers import RECIPES, method_recipe, tiny_overrides

# SogCLR's moving averages started from u = 0 with a tiny gamma: the normaliser sits about
# log(1 / 0.01) = 4.6 nats below the in-batch sums, a bias the monitor must report
BAD = ["loss.estimator.init=zero", "loss.estimator.gamma=0.01"]


def _train(tmp_path, *extra: str) -> list[str]:
    # one epoch of 40 batches: the monitor's default min_steps
    return ["train", str(RECIPES / "sogclr-medium.yaml"),
            *tiny_overrides(8, 320, tmp_path, "40ba"), *BAD, *extra]


def test_a_biased_estimator_prints_one_warning_line_by_default(tmp_path, capsys):
    assert main(_train(tmp_path)) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("EstimatorWarning:")]
    assert len(lines) == 1, lines
    assert "epoch 0" in lines[0] and "nats on average" in lines[0]


def test_policy_none_prints_nothing(tmp_path, capsys):
    assert main(_train(tmp_path, "callbacks=[{name: estimator_monitor, policy: none}]")) == 0
    out = capsys.readouterr()
    assert "EstimatorWarning" not in out.err + out.out


def test_the_recipe_entry_replaces_the_default_sets_its_options_and_logs_per_epoch(tmp_path):
    from composer.loggers import InMemoryLogger

    recipe = method_recipe("sogclr", tmp_path, duration="3ep",
                           extra=["callbacks=[{name: estimator_monitor, max_bias: 0.5}]"])
    logger = InMemoryLogger()
    trainer = build_trainer(recipe, loggers=[logger])
    monitors = [c for c in trainer.state.callbacks if isinstance(c, EstimatorMonitorCallback)]
    assert len(monitors) == 1 and monitors[0].monitor.max_bias == 0.5
    trainer.fit()
    for key in ("estimator/r2_first", "estimator/r2_last", "estimator/r_mean"):
        assert len(logger.data[key]) == 3  # one per epoch


def test_in_batch_losses_get_no_monitor(tmp_path):
    trainer = build_trainer(method_recipe("clip", tmp_path))
    assert not any(isinstance(c, EstimatorMonitorCallback) for c in trainer.state.callbacks)
