"""The recipe edge as a new user meets it: any registered estimator by name, flags anywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from amortize.cli import main, parse_args

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = str(ROOT / "recipes" / "default.yaml")


def _tiny(tmp_path, *extra: str) -> list[str]:
    return ["model.name=tiny", "data.name=synthetic", "data.batch_size=8", "data.num_samples=16", "precision=fp32",
            "device=cpu", f"save_folder={tmp_path}", "log_to_console=false", "eval.tasks=none", *extra]


def test_in_batch_estimator_by_name_trains_with_the_linearized_objective(tmp_path, capsys):
    """``loss.estimator=in_batch`` takes no ``dim``: the embedding width is offered only to constructors naming it."""
    assert main(["train", DEFAULT, "loss.estimator=in_batch", *_tiny(tmp_path, "max_duration=2ba")]) == 0
    assert (tmp_path / "latest-rank0.pt").exists()
    capsys.readouterr()
    assert main(["train", DEFAULT, "loss.estimator=in_batch", *_tiny(tmp_path / "dry"), "--dry-run"]) == 0
    assert "estimator InBatchEstimator" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flags_may_stand_anywhere_on_the_command_line(where, tmp_path, capsys):
    overrides = _tiny(tmp_path, "max_duration=2ba")
    at = {"first": 0, "middle": len(overrides) // 2, "last": len(overrides)}[where]
    argv = ["train", DEFAULT, *overrides[:at], "--dry-run", *overrides[at:]]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "max_duration: 2ba" in out and "name: tiny" in out
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # a dry run writes nothing


def test_debug_before_the_overrides_still_raises(tmp_path):
    from amortize.train.config import RecipeError

    with pytest.raises(RecipeError, match="optimizer.lrr"):
        main(["train", "--debug", DEFAULT, "optimizer.lrr=1", "--dry-run", *_tiny(tmp_path)])


def test_a_misspelled_flag_is_refused_with_the_usage(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["train", DEFAULT, "max_duration=2ba", "--dryrun"])
    assert e.value.code == 2 and "unrecognized arguments: --dryrun" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["eval", "ck.pt", "extra"])


def test_eval_rebuilds_the_towers_without_the_users_imports(tmp_path, capsys):
    """A run that named its estimator through ``imports:`` is evaluated after the file is gone."""
    import shutil

    src = ROOT / "docs" / "examples" / "custom_components"
    for name in ("recipe.yaml", "my_objective.py", "my_estimator.py"):
        shutil.copy(src / name, tmp_path / name)
    out = tmp_path / "run"
    assert main(["train", str(tmp_path / "recipe.yaml"), f"save_folder={out}", "max_duration=1ba"]) == 0
    (tmp_path / "my_estimator.py").unlink()
    (tmp_path / "my_objective.py").unlink()
    capsys.readouterr()
    assert main(["eval", str(out / "model.pt"), "--tasks", "emoji_heldout", "--device", "cpu", "--json"]) == 0
    assert '"task": "emoji_heldout"' in capsys.readouterr().out


def test_a_users_imports_register_a_dataset_an_optimizer_and_a_scheduler(tmp_path, capsys, monkeypatch):
    """The data, optimizer and scheduler sections are bound against registries a user's file extends."""
    from amortize.data import DATASETS
    from amortize.train.optim import OPTIMIZERS, SCHEDULERS

    for registry in (DATASETS, OPTIMIZERS, SCHEDULERS):  # the user's names leave with this test
        monkeypatch.setattr(registry, "_items", dict(registry._items))
    (tmp_path / "mine.py").write_text(
        "import torch\n"
        "from amortize.data import DATASETS\n"
        "from amortize.data.synthetic import SyntheticPairs\n"
        "from amortize.train.optim import OPTIMIZERS, SCHEDULERS\n"
        "def pairs(tokenizer, image_size, *, seed, size: int = 12):\n"
        "    return SyntheticPairs(size, image_size, tokenizer.context_length, seed=seed)\n"
        "def flat(level: float = 1.0):\n"
        "    from composer.optim import ConstantScheduler\n"
        "    return ConstantScheduler(alpha=level)\n"
        "DATASETS.register('my_pairs', pairs)\n"
        "OPTIMIZERS.register('my_sgd', torch.optim.SGD)\n"
        "SCHEDULERS.register('my_flat', flat)\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("imports: [mine.py]\nmodel: {name: tiny}\ndata: {name: my_pairs, size: 12, batch_size: 4}\n"
                      "optimizer: {name: my_sgd, lr: 0.1, momentum: 0.5}\nscheduler: {name: my_flat, level: 0.5}\n"
                      "eval: {tasks: none}\n")
    common = ["precision=fp32", "device=cpu", f"save_folder={tmp_path / 'run'}", "log_to_console=false"]
    assert main(["train", str(recipe), *common, "--dry-run"]) == 0
    out = capsys.readouterr()
    assert "data: my_pairs, 3 batches of 4" in out.err and "optimizer: SGD" in out.err
    assert "momentum: 0.5" in out.out and "size: 12" in out.out  # the resolved sections
    assert main(["train", str(recipe), *common, "data.shards=x", "--dry-run"]) == 2
    assert "data.shards: unknown option of dataset 'my_pairs'; valid: batch_size, num_workers, drop_last, " \
           "tokenizer, seed, size" in capsys.readouterr().err
