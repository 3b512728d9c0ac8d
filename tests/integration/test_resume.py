"""Exact resume: 2N steps straight equal N steps, a checkpoint, and N more from it (CPU)."""

from __future__ import annotations

import pytest
import torch

from amortize.train.builders import build_trainer
from amortize.train.model import unwrap
from tests.integration.helpers import method_recipe
from tests.reliability.common import assert_same as _assert_same

STEPS = 8  # 2N; 3 batches per epoch, so the checkpoint at N = 4 sits inside epoch 1


def _run(recipe):
    trainer = build_trainer(recipe)
    trainer.fit()
    state = trainer.state
    out = {
        # the top-level extra state is the recipe, whose save_folder and load_path differ by design
        "model": {k: v.clone() if isinstance(v, torch.Tensor) else v
                  for k, v in unwrap(state.model).state_dict().items() if k != "_extra_state"},
        "optimizer": state.optimizers[0].state_dict(),
        "schedulers": [s.state_dict() for s in state.schedulers],
        "batch": int(state.timestamp.batch),
        "epoch": int(state.timestamp.epoch),
        "rho": unwrap(state.model).loss_fn.rho,
    }
    trainer.close()
    return out


@pytest.mark.parametrize("method", ["amorlip-log-l2", "fastclip"])
def test_resume_is_exact(method, tmp_path):
    amortizer = ["loss.estimator.update_every=1", "loss.estimator.ema_every=1",
                 "loss.estimator.beta={name: beta_warmup, final: 0.8, warmup_epochs: 2}"]
    extra = (amortizer if method.startswith("amorlip") else []) + [
             "optimizer.lr=0.002", "scheduler.name=cosine_with_warmup", "scheduler.t_warmup=2ba",
             "deterministic_mode=true"]
    common = dict(batch=8, num_samples=24, duration=f"{STEPS}ba")
    straight = _run(method_recipe(method, tmp_path / "a", extra=extra + ["save_interval=4ba"], **common))
    ckpt = tmp_path / "a" / "ep1-ba4-rank0.pt"
    assert ckpt.is_file()
    resumed = _run(method_recipe(method, tmp_path / "b", extra=extra + [f"load_path={ckpt}"], **common))
    assert straight["batch"] == resumed["batch"] == STEPS and straight["epoch"] == resumed["epoch"] == 2
    _assert_same(straight["model"], resumed["model"], "model")  # encoders, amortizers, EMA, previous, Adam
    _assert_same(straight["optimizer"], resumed["optimizer"], "optimizer")
    _assert_same(straight["schedulers"], resumed["schedulers"], "schedulers")
    assert straight["rho"] == resumed["rho"]
    if method.startswith("amorlip"):
        keys = straight["model"]
        assert bool(keys["loss_fn.estimator.has_previous"]) and int(keys["loss_fn.estimator.epoch"]) == 2
        # the epoch-start re-initialisation happened: previous differs from the online net
        assert not torch.equal(keys["loss_fn.estimator.previous.image.out.bias"],
                               keys["loss_fn.estimator.online.image.out.bias"])
