"""``device_train_microbatch_size`` in a recipe: the exact gradient cache inside Composer's training step.

A run with microbatches ends with the weights and estimator state of the run without them; the
gradient cache really runs (each tower is called twice per microbatch); one or two processes; the
Composer internals it relies on are those of the pinned Composer.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger

from amortize.weights_export import load_weights_export
from amortize.cli import main
from amortize.train.builders import build_trainer
from amortize.train.model import unwrap
from tests.integration.helpers import RECIPES, method_recipe, tiny_overrides


def _train_default(tmp_path, extra: list[str]) -> dict:
    args = [str(RECIPES / "default.yaml"), "max_duration=2ba", f"save_folder={tmp_path}", "save_interval=1000ep",
            "log_to_console=false", "progress_bar=false", *extra]
    assert main(["train", *args]) == 0
    return load_weights_export(tmp_path / "model.pt")


def _assert_same_export(got: dict, ref: dict, tol: float) -> None:
    assert got["model"].keys() == ref["model"].keys()
    for name, v in ref["model"].items():
        torch.testing.assert_close(got["model"][name], v, rtol=0, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
    for name, v in ref["loss_fn"].items():
        # amortizer weights follow their own Adam, which turns rounding-level differences of
        # near-zero gradients into lr-sized steps (see tests/properties/test_gradcache.py)
        t = 5e-3 if (".online." in name or ".target." in name) else tol
        torch.testing.assert_close(got["loss_fn"][name].float(), v.float(), rtol=0, atol=t,
                                   msg=lambda m, n=name: f"loss_fn {n}: {m}")


def test_default_recipe_with_microbatches_equals_the_whole_batch(tmp_path):
    # the default recipe shrunk to the tiny model (batch 64, microbatch 24: not a divisor) and a
    # learning rate from the first step, so that a wrong gradient would move the weights
    small = ["model.name=tiny", "data.batch_size=64", "scheduler=constant"]
    ref = _train_default(tmp_path / "whole", small)
    got = _train_default(tmp_path / "micro", small + ["device_train_microbatch_size=24"])
    _assert_same_export(got, ref, 1e-5)


@pytest.mark.slow
def test_default_recipe_command_with_microbatches(tmp_path):
    # amortize train recipes/default.yaml device_train_microbatch_size=64 max_duration=2ba
    ref = _train_default(tmp_path / "whole", [])
    got = _train_default(tmp_path / "micro", ["device_train_microbatch_size=64"])
    _assert_same_export(got, ref, 1e-5)


class _KeepGrads(Callback):
    """The towers' gradients as the optimiser will see them (AFTER_TRAIN_BATCH)."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.AFTER_TRAIN_BATCH:
            self.grads = {n: p.grad.clone() for n, p in unwrap(state.model).model.named_parameters() if p.grad is not None}


class _CountCalls:
    def __init__(self, module: torch.nn.Module):
        self.calls: list[int] = []
        module.register_forward_hook(lambda m, args, out: self.calls.append(int(args[0].shape[0])))


@pytest.mark.parametrize("method", ["clip", "siglip", "fastclip", "amorlip-log-l2"])
def test_gradient_cache_runs_and_matches_one_step(method, tmp_path):
    trainers, grads = {}, {}
    for name, extra in (("whole", []), ("micro", ["device_train_microbatch_size=3"])):
        recipe = method_recipe(method, tmp_path / name, batch=8, num_samples=8, duration="1ba",
                               extra=extra + ["grad_clip_norm=null"])
        grads[name] = _KeepGrads()
        trainer = build_trainer(recipe, callbacks=[grads[name]])
        counter = _CountCalls(unwrap(trainer.state.model).model.clip.visual)
        trainer.fit()
        trainers[name] = (trainer, counter)
    (whole, whole_calls), (micro, micro_calls) = trainers["whole"], trainers["micro"]
    assert whole_calls.calls == [8]
    assert micro_calls.calls == [3, 3, 2, 3, 3, 2]  # first pass without a graph, second with one
    grads = {k: v.grads for k, v in grads.items()}
    assert grads["whole"].keys() == grads["micro"].keys() and len(grads["whole"]) > 10
    for n, g in grads["whole"].items():
        torch.testing.assert_close(grads["micro"][n], g, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{method} {n}: {m}")
    assert float(micro.state.loss) == pytest.approx(float(whole.state.loss), rel=1e-5)
    for trainer, _ in trainers.values():
        trainer.close()


def test_batchnorm_towers_are_refused(tmp_path):
    # the one check of the towers, where the microbatch size is decided (the run's and
    # --dry-run's path: tests/integration/test_user_path.py builds RN50 towers through the CLI)
    from amortize.options import RecipeError
    from amortize.train.builders import build_two_tower
    from amortize.train.gradcache import build_gradient_cache

    recipe = method_recipe("clip", tmp_path, batch=8, num_samples=8, duration="1ba",
                           extra=["device_train_microbatch_size=4"])
    towers = build_two_tower(recipe)
    assert build_gradient_cache(recipe, towers, 8).microbatch_size == 4
    assert build_gradient_cache(recipe, towers, 4) is None  # not smaller than the batch: no cache
    towers.clip.visual.extra_norm = torch.nn.BatchNorm1d(4)  # any BatchNorm in training mode
    with pytest.raises(RecipeError, match="^device_train_microbatch_size: .*BatchNorm"):
        build_gradient_cache(recipe, towers, 8)


def test_missing_second_pass_is_an_error(tmp_path):
    from tests.integration.helpers import build_for_distributed, global_batch

    from amortize.gradcache import GradientCachePasses

    model = build_for_distributed("clip", tmp_path)
    model.gradient_cache = GradientCachePasses(3)
    batch = global_batch()
    model.loss(model(batch), batch).backward()
    with pytest.raises(RuntimeError, match="second pass"):
        model(batch)
    assert model.backward_cached() is True  # the pending second pass is still there
    assert all(p.grad is not None for p in model.model.parameters())
    model(batch)  # and the next batch may start


def test_composer_contract():
    """Fails loudly when the installed Composer's training step no longer has the order the gradient cache relies on."""
    import composer
    from composer.distributed import dist_strategy
    from composer.trainer.trainer import Trainer

    from amortize.train.gradcache import COMPOSER_CONTRACT, COMPOSER_VERSION

    assert composer.__version__ == COMPOSER_VERSION, (
        f"Composer {composer.__version__} is installed; the gradient cache was checked against {COMPOSER_VERSION}. "
        f"Re-check amortize.train.gradcache.COMPOSER_CONTRACT ({COMPOSER_CONTRACT}) and update COMPOSER_VERSION."
    )
    src = inspect.getsource(Trainer._train_microbatch)
    order = ["with sync_context:", "self.state.outputs = self.state.model(self.state.batch)",
             "self._original_model.loss(self.state.outputs, self.state.batch)",
             "microbatch_loss.mul_(microbatch_size / current_batch_size)", "microbatch_loss.backward(",
             "self.engine.run_event(Event.AFTER_BACKWARD)"]
    at = [src.find(s) for s in order]
    assert all(i >= 0 for i in at) and at == sorted(at), f"Trainer._train_microbatch changed: {dict(zip(order, at))}"
    sync = inspect.getsource(dist_strategy.ddp_sync_context)
    forced = sync[sync.find("FORCED_SYNC:"):]
    assert "no_sync_context()" in forced and "finally:" in forced and "dist.all_reduce(p.grad)" in forced, (
        "ddp_sync_context's FORCED_SYNC no longer all-reduces after the microbatch")
    outer = inspect.getsource(Trainer._train_microbatches)
    assert outer.find("_train_microbatch(") < outer.find("Event.AFTER_TRAIN_BATCH")


@pytest.mark.slow  # two launches of two processes: about a minute
@pytest.mark.multiprocess
def test_two_processes_with_gradient_cache_equal_without(tmp_path):
    composer = os.path.join(os.path.dirname(sys.executable), "composer")
    if not os.path.exists(composer):
        pytest.skip("the composer launcher is not installed next to this interpreter")
    from tests.integration.test_launcher import _free_port

    exports = {}
    for name, extra in (("whole", []), ("micro", ["device_train_microbatch_size=3"])):
        run = tmp_path / name
        overrides = [o for o in tiny_overrides(16, 32, run, "2ba") if not o.startswith("save_interval")]
        # SGD: its step is linear in the gradient. (Adam turns the rounding noise of gradients that are
        # zero in exact arithmetic, such as the attention key biases', into lr-sized steps.)
        overrides += ["save_interval=1000ep", "optimizer.name=sgd", "optimizer.lr=0.5", *extra]
        cmd = [composer, "-n", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "--stdout", str(tmp_path / f"{name}{{rank}}.out"), "--stderr", str(tmp_path / f"{name}{{rank}}.err"),
               "-m", "amortize.cli", "train", str(RECIPES / "fastclip-medium.yaml"), *overrides]
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob(f"{name}*.*")))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + logs[-3000:]
        exports[name] = load_weights_export(run / "model.pt")
    _assert_same_export(exports["micro"], exports["whole"], 1e-5)
