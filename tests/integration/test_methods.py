"""Every method of the paper's Table 1 trains with Composer's Trainer on the CPU."""

from __future__ import annotations

import math

import pytest
import torch

from amortize.train.builders import build_trainer
from amortize.train.model import unwrap
from tests.integration.helpers import METHODS, RecordLoss, method_recipe


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_and_loss_decreases_on_a_fixed_batch(method, tmp_path):
    # 16 samples and batch 16: every step sees the same batch (and starts a new epoch, which
    # exercises AmorLIP's per-epoch re-initialisation and previous networks).
    recipe = method_recipe(method, tmp_path, duration="10ba",
                           extra=["optimizer.lr=0.002", "optimizer.weight_decay=0.0"])
    rec = RecordLoss()
    trainer = build_trainer(recipe, callbacks=[rec])
    trainer.fit()
    trainer.close()
    losses = rec.losses
    assert len(losses) == 10
    assert all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-3:]) / 3 < losses[0], losses
    model = unwrap(trainer.state.model)
    assert model.model.logit_scale.exp().item() <= 100.0 + 1e-4
    if method == "siglip":
        assert model.model.logit_bias is not None
    terms = model.last_terms
    assert "loss" in terms and all(torch.isfinite(v).all() for v in terms.values())
    if method.startswith("amorlip"):
        est = model.loss_fn.estimator
        assert int(est.epoch) == 9 and bool(est.has_previous)
        assert "amortizer_rmse" in terms


def test_amortizer_parameters_are_not_in_the_encoder_optimizer(tmp_path):
    recipe = method_recipe("amorlip-log-l2", tmp_path, duration="1ba")
    trainer = build_trainer(recipe)
    model = unwrap(trainer.state.model)
    in_opt = {id(p) for g in trainer.state.optimizers[0].param_groups for p in g["params"]}
    amortizer = list(model.loss_fn.parameters())
    assert amortizer and not any(id(p) in in_opt for p in amortizer)
    assert all(id(p) in in_opt for p in model.model.parameters())
    groups = {g["name"]: g for g in trainer.state.optimizers[0].param_groups}
    assert groups["logit_scale"]["lr"] == pytest.approx(1e-4) and groups["logit_scale"]["weight_decay"] == 0.0
    trainer.close()


def test_recipe_microbatching_turns_the_gradient_cache_on(tmp_path):
    from amortize.train.gradcache import GradientCache

    recipe = method_recipe("clip", tmp_path, extra=["device_train_microbatch_size=4"])
    trainer = build_trainer(recipe)
    assert [type(a) for a in trainer.state.algorithms if isinstance(a, GradientCache)] == [GradientCache]
    assert unwrap(trainer.state.model).gradient_cache.microbatch_size == 4  # the one place it is held
    assert trainer.state.device_train_microbatch_size == 16  # Composer itself never splits the batch
    trainer.close()


def test_composer_microbatching_is_refused_at_run_time(tmp_path):
    # a Trainer assembled by hand that lets Composer split the batch: the guard stops the first batch
    from composer import Trainer

    from amortize.train.gradcache import FullBatchGuard
    from amortize.train.builders import build_composer_model, build_dataloader
    from amortize.train.builders import build_tokenizer

    recipe = method_recipe("clip", tmp_path)
    model = build_composer_model(recipe)
    loader, _ = build_dataloader(recipe, build_tokenizer(recipe, model.model.context_length), model.model.image_size)
    trainer = Trainer(model=model, train_dataloader=loader, max_duration="1ba", algorithms=[FullBatchGuard()],
                      optimizers=torch.optim.SGD(model.model.parameters(), lr=0.1),
                      device_train_microbatch_size=4, device="cpu", progress_bar=False)
    with pytest.raises(ValueError, match="shrinks the negatives"):
        trainer.fit()
    trainer.close()


def test_scent_trains_by_name_on_the_default_recipe(tmp_path):
    """``loss.estimator=scent`` on the shipped data: its tables fill at the dataset indices trained."""
    from amortize.train.config import load_recipe
    from tests.integration.helpers import RECIPES

    recipe = load_recipe(RECIPES / "default.yaml", [
        "loss.estimator=scent", "model.name=tiny", "data.batch_size=32", "max_duration=4ba", "device=cpu",
        "precision=fp32", f"save_folder={tmp_path}", "save_interval=1000ep", "log_to_console=false",
        "progress_bar=false", "scheduler=constant"])
    rec = RecordLoss()
    trainer = build_trainer(recipe, callbacks=[rec])
    trainer.fit()
    est = unwrap(trainer.state.model).loss_fn.estimator
    trainer.close()
    assert type(est).__name__ == "ScentEstimator" and est.alpha == 10.0 and est.reference_frame == "positive"
    assert len(rec.losses) == 4 and all(math.isfinite(v) for v in rec.losses)
    assert int(torch.isfinite(est.log_u_x).sum()) == 4 * 32 == int(torch.isfinite(est.log_u_y).sum())
