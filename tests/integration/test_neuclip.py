"""NeuCLIP through Composer: the small-batch recipe on the shipped data, and two processes equal one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp

from amortize.train.builders import build_trainer
from amortize.train.config import load_recipe
from amortize.train.model import unwrap
from tests.integration.helpers import (
    RECIPES,
    RecordLoss,
    build_for_distributed,
    distributed_worker,
    global_batch,
    one_step,
)


def test_the_small_batch_recipe_trains_on_the_shipped_data(tmp_path):
    recipe = load_recipe(RECIPES / "neuclip-small-batch.yaml", [
        "model.name=tiny", "precision=fp32", "device=cpu", "max_duration=4ba", "scheduler.t_warmup=0ba",
        f"save_folder={tmp_path}", "save_interval=1000ep", "log_to_console=false", "eval.tasks=none",
        "loss.estimator.restart_every=2",
    ])
    rec = RecordLoss()
    trainer = build_trainer(recipe, callbacks=[rec])
    trainer.fit()
    trainer.close()
    assert len(rec.losses) == 4 and all(math.isfinite(v) for v in rec.losses), rec.losses
    model = unwrap(trainer.state.model)
    est = model.loss_fn.estimator
    assert int(est.step) == 4 and est.normalizer == "online"
    assert {"amortizer_fit", "online_rmse", "normalizer_vs_batch"} <= set(model.last_terms)
    assert est._restart.reset_optimizer == "none" and model.loss_fn.temperature == "robust"  # the recipe's choices
    assert float(model.loss_fn.rho_schedule(0, 1)) == 2.0
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    assert "loss_fn.estimator.online.image.prototypes" in ignored
    assert not any(p.requires_grad for p in est.parameters())


@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path):
    method = "neuclip"
    ctx = mp.start_processes(distributed_worker, args=(2, method, str(tmp_path / "init"), str(tmp_path)),
                             nprocs=2, join=True, start_method="spawn")
    assert ctx is None or ctx.join()
    result = torch.load(tmp_path / f"{method}.pt", weights_only=True)
    loss, grads = one_step(build_for_distributed(method, tmp_path / "single"), global_batch())
    assert result["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(result["grads"][name], g, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
