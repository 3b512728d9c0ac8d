"""``amortize train`` and ``amortize eval`` end to end (tiny model, in-process)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from amortize.cli import load_checkpoint, main
from tests.integration.helpers import RECIPES, ROOT


def _tiny_default(tmp_path) -> list[str]:
    return [str(RECIPES / "default.yaml"), "model.name=tiny", "data.batch_size=64", "max_duration=3ba",
            f"save_folder={tmp_path}", "log_to_console=false", "console_log_interval=1ba"]


def test_dry_run_prints_the_resolved_recipe(capsys, tmp_path):
    # a fresh save folder: runs/default may hold a finished `make demo`, which a dry run rightly refuses
    assert main(["train", str(RECIPES / "default.yaml"), "max_duration=20ba", f"save_folder={tmp_path}",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "max_duration: 20ba" in out and "name: cpu-small" in out


def test_bad_recipe_exits_2_with_the_key(capsys):
    assert main(["train", str(RECIPES / "default.yaml"), "optimizer.lrr=1", "--dry-run"]) == 2
    assert "optimizer.lrr" in capsys.readouterr().err


def test_import_amortize_does_not_import_composer():
    code = "import amortize, amortize.losses, amortize.models, amortize.train, amortize.train.config, amortize.cli, " \
           "amortize.train.builders, amortize.train.optim, amortize.data, sys; " \
           "print('composer' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_train_then_eval_from_the_checkpoint(tmp_path, capsys):
    assert main(["train", *_tiny_default(tmp_path)]) == 0
    composer_ckpt = tmp_path / "latest-rank0.pt"
    export = tmp_path / "model.pt"
    assert composer_ckpt.exists() and export.is_file()
    a, b = load_checkpoint(composer_ckpt), load_checkpoint(export)
    assert a["recipe"]["model"]["name"] == "tiny" and a["recipe"] == b["recipe"]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    torch.load(export, weights_only=True)  # the export needs no allowlist at all
    capsys.readouterr()
    assert main(["eval", str(composer_ckpt), "--json", "--tasks", "emoji_heldout", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows and all(set(r) >= {"task", "metric", "value"} for r in rows)
    assert {r["task"] for r in rows} == {"emoji_heldout"}
    assert main(["eval", str(tmp_path), "--tasks", "emoji_heldout"]) == 0
    assert capsys.readouterr().out.startswith("| task | metric | value |")
