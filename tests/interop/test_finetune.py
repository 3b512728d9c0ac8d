"""recipes/finetune-small-batch.yaml: fine-tuning a generated pretrained checkpoint with a locked image
tower, on one process and on two (Composer's launcher, gloo); locked parameters stay bit-identical,
and the user's files are evaluated at an interval during training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("composer")
pytest.importorskip("open_clip")

from amortize.checkpoints import safe_load
from amortize.train.config import load_recipe
from tests.distributed.dist_harness import free_port
from tests.integration.helpers import RECIPES, tiny_overrides
from tests.interop.userdata import write_caption_csv, write_class_folder, write_weights_export

RECIPE = RECIPES / "finetune-small-batch.yaml"
ESTIMATORS = {  # the recipe's section to switch, as its header says
    "amortized": [],
    "moving_average": ["loss.estimator=moving_average"],
    "in_batch": ["loss.estimator=null"],
    "clip": ["loss.objective=infonce", "loss.estimator=null"],
}


def _pretrained_tower(path: Path) -> dict[str, torch.Tensor]:
    return {k[len("clip."):]: v for k, v in safe_load(path)["model"].items()}


def _overrides(tmp_path: Path, pretrained: Path, duration: str = "4ba") -> list[str]:
    return tiny_overrides(8, 32, tmp_path / "run", duration) + [f"model.pretrained={pretrained}", "seed=0"]


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_finetune_recipe_keeps_locked_parameters_and_evaluates_user_files(tmp_path, estimator):
    from amortize.eval.callback import EvalCallback
    from amortize.train.builders import build_trainer
    from amortize.train.model import unwrap

    pretrained = write_weights_export(tmp_path / "pre" / "model.pt")
    csv = write_caption_csv(tmp_path / "csv")
    classes = write_class_folder(tmp_path / "classes", per_class=1)
    extra = [f"eval.tasks=[{{name: retrieval, path: {csv}}}, {{name: zeroshot, path: {classes}, templates: ['a {{}}']}}]",
             "eval.every_n_batches=2", "eval.every_n_epochs=0", "eval.at_fit_end=true"]
    recipe = load_recipe(RECIPE, _overrides(tmp_path, pretrained) + ESTIMATORS[estimator] + extra)
    assert recipe.model.lock_image.unlocked_groups == 0 and recipe.model.lock_image.freeze_norm
    trainer = build_trainer(recipe)
    model = unwrap(trainer.state.model).model
    start = _pretrained_tower(pretrained)
    locked = {n for n, p in model.clip.named_parameters() if not p.requires_grad}
    assert locked == {n for n, _ in model.clip.named_parameters() if n.startswith("visual.")}
    in_optimizer = {id(p) for g in trainer.state.optimizers[0].param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for n, p in model.clip.named_parameters() if n in locked)
    evals = [c for c in trainer.state.callbacks if isinstance(c, EvalCallback)]
    ran = []
    original = evals[0]._run
    evals[0]._run = lambda state, logger: (ran.append(int(state.timestamp.batch)), original(state, logger))
    trainer.fit()
    after = {k: v.detach().cpu() for k, v in model.clip.state_dict().items()}
    for k in locked:
        assert torch.equal(after[k], start[k]), k  # bit-identical
        assert dict(model.clip.named_parameters())[k].grad is None  # no gradient: nothing to clip or decay
    assert not torch.equal(after["text_projection"], start["text_projection"])  # the text tower trained
    assert ran == [2, 4]
    tasks = {r["task"] for r in evals[0].last_rows}
    assert tasks == {"pairs", "classes"}
    trainer.close()


@pytest.mark.multiprocess
def test_finetune_recipe_on_two_processes_keeps_locked_parameters(tmp_path):
    composer = Path(sys.executable).with_name("composer")
    if not composer.exists():
        pytest.skip("the composer launcher is not installed next to this interpreter")
    pretrained = write_weights_export(tmp_path / "pre" / "model.pt")
    overrides = [o for o in _overrides(tmp_path, pretrained) if not o.startswith("log_to_console")]
    overrides += ["log_to_console=true", "model.lock_text={unlocked_groups: 1}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    cmd = [str(composer), "-n", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "--stdout", str(tmp_path / "rank{rank}.out"), "--stderr", str(tmp_path / "rank{rank}.err"),
           "-m", "amortize.cli", "train", str(RECIPE), *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("rank*.*")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs[-3000:]
    assert "amortize train: locked " in proc.stdout + logs  # the count is printed at start
    start = _pretrained_tower(pretrained)
    after = _pretrained_tower(tmp_path / "run" / "model.pt")
    trainable = {"text_projection", "logit_scale"}  # lock_text leaves its last group (the projection)
    for k, v in start.items():
        if k in trainable:
            assert not torch.equal(after[k], v), k
        else:
            assert torch.equal(after[k], v), k
