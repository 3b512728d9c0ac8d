"""Loggers, callbacks and algorithms from a recipe's ``loggers:``, ``callbacks:``, ``algorithms:`` (through the CLI)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from amortize.cli import main
from amortize.train.config import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = str(ROOT / "recipes" / "default.yaml")


def _tiny(tmp_path, *extra: str) -> list[str]:
    return ["model.name=tiny", "data.name=synthetic", "data.batch_size=8", "data.num_samples=16", "precision=fp32",
            "device=cpu", f"save_folder={tmp_path / 'run'}", "log_to_console=false", "eval.tasks=none", *extra]


def test_a_file_logger_records_the_learning_rate_and_throughput_of_a_short_run(tmp_path):
    log = tmp_path / "log.txt"
    assert main(["train", DEFAULT, *_tiny(tmp_path, "max_duration=3ba", f"loggers=[{{name: file, filename: {log}}}]",
                                      "callbacks=[lr_monitor, {name: speed_monitor, window_size: 2}]")]) == 0
    text = log.read_text()
    lrs = [line for line in text.splitlines() if "lr-AdamW/group0" in line]
    assert [line.split("]")[1] for line in lrs] == ["[batch=1", "[batch=2", "[batch=3"]
    assert "throughput/samples_per_sec" in text


def test_the_default_recipe_logs_learning_rate_and_throughput():
    r = load_recipe(DEFAULT)
    names = [c if isinstance(c, str) else c["name"] for c in r.callbacks]
    assert {"lr_monitor", "speed_monitor"} <= set(names)


def test_an_algorithm_from_the_recipe_joins_the_run(tmp_path, capsys):
    assert main(["train", DEFAULT, *_tiny(tmp_path, "algorithms=[{name: ema, half_life: 2ba}]"), "--dry-run"]) == 0
    assert "algorithms: EMA" in capsys.readouterr().err
    assert main(["train", DEFAULT, *_tiny(tmp_path, "max_duration=2ba", "algorithms=[{name: ema, half_life: 2ba}]")]) == 0


@pytest.mark.parametrize("override, message", [
    ("callbacks=[lr_monitr]", r"callbacks\[0\]: unknown callback 'lr_monitr' \(did you mean 'lr_monitor'\?\)"),
    ("callbacks=[{name: speed_monitor, window: 3}]", r"callbacks\[0\].window: unknown option of callback 'speed_monitor'"),
    ("loggers=[{name: file, buffer_size: many}]", r"loggers\[0\].buffer_size: expected int, got str 'many'"),
    ("algorithms=[{name: ema, half_life: 2ba}, sma]", r"algorithms\[1\]: unknown algorithm 'sma'"),
])
def test_bad_entries_are_refused_at_load_with_their_key(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(DEFAULT, [override])


def test_a_logger_whose_package_is_missing_is_refused_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(RecipeError, match=r"loggers\[0\]: logger 'tensorboard' needs the package 'tensorboard', "
                                          r"which is not installed: pip install 'amortize\[tensorboard\]'"):
        load_recipe(DEFAULT, ["loggers=[tensorboard]"])


def test_tensorboard_logger_writes_events_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    logdir = tmp_path / "tb"
    assert main(["train", DEFAULT, *_tiny(tmp_path, "max_duration=2ba", f"loggers=[{{name: tensorboard, log_dir: {logdir}}}]")]) == 0
    assert any(p.name.startswith("events.out.tfevents") for p in logdir.rglob("*"))


def test_a_users_callback_from_imports(tmp_path):
    (tmp_path / "my_callback.py").write_text(
        "from composer.core import Callback\n"
        "from amortize.train.integrations import CALLBACKS\n"
        "class CountBatches(Callback):\n"
        "    def __init__(self, path: str):\n"
        "        self.path, self.n = path, 0\n"
        "    def batch_end(self, state, logger):\n"
        "        self.n += 1\n"
        "        open(self.path, 'w').write(str(self.n))\n"
        "CALLBACKS.register('count_batches', CountBatches)\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(Path(DEFAULT).read_text() + "imports: [my_callback.py]\n")
    out = tmp_path / "n.txt"
    assert main(["train", str(recipe), *_tiny(tmp_path, "max_duration=3ba", f"callbacks=[{{name: count_batches, path: {out}}}]")]) == 0
    assert out.read_text() == "3"
