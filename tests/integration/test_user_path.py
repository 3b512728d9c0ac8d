"""A user's path through ``amortize train`` / ``amortize eval``: own shards, mistakes, interrupts.

Every test runs the command line (``amortize.cli.main``, or a subprocess for Ctrl-C) and checks
the outcome: refused with the named problem and exit status 2, trained, or files unchanged.
Numbers in the test names refer to the items of issue 12.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amortize.cli import load_checkpoint, main
from amortize.train.config import RecipeError
from tests.data.wds_fixtures import write_shard
from tests.integration.helpers import METHODS, RECIPES, ROOT

SHARDS_PER_SET, PER_SHARD = 3, 12  # 36 samples: 3 batches of 12 per epoch


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """Three img2dataset-style shards; the middle one has no _stats.json (its count is scanned and cached)."""
    folder = tmp_path_factory.mktemp("shards")
    for s in range(SHARDS_PER_SET):
        write_shard(folder / f"{s:05d}.tar", s * PER_SHARD, PER_SHARD, stats=s != 1)
    return str(folder / "{00000..00002}.tar")


def _quiet(tmp_path, *extra: str) -> list[str]:
    """Tiny CPU overrides; a key given in ``extra`` replaces the default one (the CLI refuses repeats)."""
    given = {e.split("=", 1)[0] for e in extra}
    base = ["model.name=tiny", "precision=fp32", "device=cpu", "data.num_workers=0", f"save_folder={tmp_path}",
            "log_to_console=false", "progress_bar=false", "eval.tasks=none"]
    return [o for o in base if o.split("=", 1)[0] not in given] + list(extra)


def _synthetic(tmp_path, *extra: str) -> list[str]:
    given = {e.split("=", 1)[0] for e in extra}
    base = [o for o in ("data.name=synthetic", "data.batch_size=8", "data.num_samples=16") if o.split("=")[0] not in given]
    return [str(RECIPES / "default.yaml"), *_quiet(tmp_path, *base, *extra)]


def _on_shards(method: str, shards: str, tmp_path, *extra: str) -> list[str]:
    given = {e.split("=", 1)[0] for e in extra}
    base = [o for o in (f"data.shards={shards}", "data.num_samples=null", "data.batch_size=12")
            if o.split("=", 1)[0] not in given]
    return [str(RECIPES / f"{method}-medium.yaml"), *_quiet(tmp_path, *base, *extra)]


def _snapshot(folder: Path) -> dict[str, tuple]:
    return {p.name: (os.readlink(p) if p.is_symlink() else p.read_bytes()) for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------ 1, 7: values checked before the run


@pytest.mark.parametrize("override, named", [
    ("grad_clip_norm=-1", "grad_clip_norm: must be > 0"),
    ("loss.estimator.clip_norm=-1", "clip_norm must be > 0"),
    ("loss.estimator.amortizer.width_factor=0", "width_factor must be > 0"),
    ("optimizer.lr=-1", "optimizer.lr: must be > 0"),
    ("optimizer.betas=[0.9]", "optimizer.betas: expected 2 values"),
    ("max_duration=banana", "max_duration: 'banana' is not a time string"),
    ("max_duration=0ba", "max_duration: must be > 0"),
    ("max_duration=-5ep", "max_duration: must be > 0"),
    ("optimizer.name=torch.optim.SGD", "optimizer: unknown optimizer 'torch.optim.SGD'"),
    ("data={name: webdataset, max_skip_fraction: 2}", "data.max_skip_fraction: must be in [0, 1]"),
    ("data.shards=/d/0.tar", "data.shards: unknown option of dataset 'synthetic'"),  # an option of webdataset only
    ("optimizer.momentum=0.9", "optimizer.momentum: unknown option of optimizer 'adamw'"),  # an option of sgd
    ("precision=amp_bf16", "precision: amp_bf16 needs a GPU"),
    ("data.name=imagenet", "data.name: unknown dataset 'imagenet'; valid: shipped, synthetic, webdataset"),
    ("load_mode=everything", "load_mode: 'everything' is not one of full, weights"),
])
def test_1_7_out_of_range_values_are_refused_by_dry_run(override, named, tmp_path, capsys):
    assert main(["train", *_synthetic(tmp_path, override), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("amortize train: error:") and named in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_7_unknown_model_is_refused_by_dry_run_and_debug_shows_the_traceback(tmp_path, capsys):
    args = [str(RECIPES / "default.yaml"), "model.name=nope", "data.name=synthetic", f"save_folder={tmp_path}"]
    assert main(["train", *args, "--dry-run"]) == 2
    assert "model: unknown model 'nope'" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="unknown model"):
        main(["train", *args, "--dry-run", "--debug"])


def test_dry_run_builds_the_run_and_says_how_it_starts(shards, tmp_path, capsys):
    assert main(["train", *_on_shards("sogclr", shards, tmp_path, "max_duration=2ep"), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "3 batches of 12 per process and epoch" in err and "MovingAverageEstimator" in err
    assert "start: starting fresh" in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_2_empty_recipe_is_an_error(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert main(["train", str(empty), "--dry-run"]) == 2
    assert "is empty" in capsys.readouterr().err


# ------------------------------------------------------------------ 2, 3, 7: never lose or mix a run


def test_2_smoke_run_does_not_replace_a_trained_run(tmp_path, capsys):
    assert main(["train", *_synthetic(tmp_path, "max_duration=4ba")]) == 0
    before = _snapshot(tmp_path)
    assert "model.pt" in before
    capsys.readouterr()
    assert main(["train", *_synthetic(tmp_path, "max_duration=2ba")]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "max_duration: '4ba' -> '2ba'" in err
    assert all(way in err for way in ("autoresume=true", "run_name=", "save_folder=", "save_overwrite=true"))
    assert _snapshot(tmp_path) == before  # nothing touched
    # the explicit way out replaces it, and autoresume then finds the new run, not the old one
    assert main(["train", *_synthetic(tmp_path, "max_duration=2ba", "save_overwrite=true")]) == 0
    assert not (tmp_path / "ep2-ba4-rank0.pt").exists() and "-ba2-" in os.readlink(tmp_path / "latest-rank0.pt")


def test_7_rerunning_a_finished_run_names_the_way_out(tmp_path, capsys):
    assert main(["train", *_synthetic(tmp_path, "max_duration=2ba", "autoresume=true")]) == 0
    capsys.readouterr()
    assert main(["train", *_synthetic(tmp_path, "max_duration=2ba", "autoresume=true")]) == 2
    assert "already finished" in capsys.readouterr().err
    assert main(["train", *_synthetic(tmp_path, "max_duration=3ba", "autoresume=true")]) == 0
    assert "resuming from" in capsys.readouterr().out and "-ba3-" in os.readlink(tmp_path / "latest-rank0.pt")


def test_7_a_changed_model_in_an_old_save_folder_is_refused(tmp_path, capsys):
    assert main(["train", *_synthetic(tmp_path, "max_duration=2ba", "autoresume=true")]) == 0
    capsys.readouterr()
    changed = _synthetic(tmp_path, "max_duration=4ba", "autoresume=true", "model.context_length=12")
    assert main(["train", *changed]) == 2
    err = capsys.readouterr().err
    assert "another recipe" in err and "model.context_length: None -> 12" in err and "size mismatch" not in err


def test_3_load_path_of_another_method_is_refused_unless_weights_only(tmp_path, capsys):
    sogclr = [str(RECIPES / "sogclr-medium.yaml"), *_quiet(tmp_path / "sogclr",
                                                           "data={name: synthetic, batch_size: 8, num_samples: 16}",
                                                           "max_duration=2ba")]
    assert main(["train", *sogclr]) == 0
    ckpt = tmp_path / "sogclr" / "latest-rank0.pt"
    amorlip = _synthetic(tmp_path / "amorlip", f"load_path={ckpt}", "max_duration=1ba", "optimizer.lr=1e-12",
                         "optimizer.weight_decay=0", "optimizer.logit_scale_lr=0")
    capsys.readouterr()
    assert main(["train", *amorlip]) == 2
    err = capsys.readouterr().err
    assert "loss.estimator.name: 'moving_average' -> 'amortized'" in err and "load_mode=weights" in err
    assert not (tmp_path / "amorlip").exists()
    export = _synthetic(tmp_path / "amorlip", f"load_path={tmp_path / 'sogclr' / 'model.pt'}", "max_duration=1ba")
    assert main(["train", *export, "load_mode=weights"]) == 2
    assert "is a weights export (model.pt)" in capsys.readouterr().err
    assert main(["train", *amorlip, "load_mode=weights"]) == 0
    assert "encoder weights" in capsys.readouterr().out
    a, b = load_checkpoint(ckpt), load_checkpoint(tmp_path / "amorlip")
    assert b["recipe"]["method"] == "amorlip-log-l2"  # the new run keeps its own recipe
    # one step at lr 1e-12: the encoders are the loaded ones
    assert all(torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6) for k in a["model"])


# ------------------------------------------------------------------ 4, 5, 6, 7: own shards


def test_4_all_shards_missing_is_refused_before_training(tmp_path, capsys):
    missing = str(tmp_path / "nowhere" / "{00000..00003}.tar")
    assert main(["train", *_on_shards("clip", missing, tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "data.shards: no training data: 4 of the 4 shards do not exist" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", METHODS)
def test_5_every_method_trains_on_shards_with_an_epoch_schedule(method, shards, tmp_path, capsys):
    args = _on_shards(method, shards, tmp_path, "max_duration=2ep", "scheduler.t_warmup=1ep", "save_interval=1ep")
    assert main(["train", *args]) == 0
    assert "-ba6-" in os.readlink(tmp_path / "latest-rank0.pt") and (tmp_path / "model.pt").is_file()
    assert "dataloader_len" not in capsys.readouterr().err


def test_5_resampled_shards_with_a_constant_schedule(shards, tmp_path):
    args = _on_shards("clip", shards, tmp_path, "max_duration=1ep", "data.sampling=resampled", "data.num_samples=24",
                      "scheduler=constant")
    assert main(["train", *args]) == 0
    assert "-ba2-" in os.readlink(tmp_path / "latest-rank0.pt")


def test_5_shard_counts_are_cached_beside_the_shards(shards):
    from amortize.data.webdataset import COUNT_CACHE, expand_shards, shard_sizes

    urls = expand_shards(shards)
    assert sum(shard_sizes(urls).values()) == SHARDS_PER_SET * PER_SHARD
    cache = Path(urls[0]).parent / COUNT_CACHE
    assert cache.is_file() and "00001.tar" in cache.read_text() and "00000.tar" not in cache.read_text()


def test_6_sogclr_estimator_is_sized_by_the_shards(shards, tmp_path, capsys):
    # data.num_samples smaller than the shards: the epoch is shorter, the table still holds every index
    assert main(["train", *_on_shards("sogclr", shards, tmp_path / "a", "max_duration=2ep", "data.num_samples=24")]) == 0
    ck = load_checkpoint(tmp_path / "a" / "latest-rank0.pt")
    assert ck["recipe"]["method"] == "sogclr"
    assert main(["train", *_on_shards("sogclr", shards, tmp_path / "b", "loss.estimator.num_samples=10")]) == 2
    assert "loss.estimator.num_samples=10 is smaller than the dataset (36 samples" in capsys.readouterr().err


def test_7_unreadable_shards_over_the_threshold_end_in_one_message(tmp_path, capsys):
    for s in range(2):
        write_shard(tmp_path / f"{s:05d}.tar", s * 12, 12, bad={i: "image" for i in range(0, 12, 2)})
    for workers in (0, 1):  # in a DataLoader worker too: the worker's traceback is not printed
        args = _on_shards("clip", str(tmp_path / "{00000..00001}.tar"), tmp_path / "run", "max_duration=1ep",
                          "data.max_skip_fraction=0.1", "data.skip_min_seen=4", "data.batch_size=4",
                          f"data.num_workers={workers}", "save_overwrite=true")
        assert main(["train", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("amortize train: error: skipped") and "undecodable_image" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_7_eval_of_a_text_file_or_batch_size_0_is_a_message(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    assert main(["eval", str(text)]) == 2
    assert "not a torch checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(text), "--batch-size", "0"])
    assert exc.value.code == 2 and "--batch-size: must be >= 1" in capsys.readouterr().err


# ------------------------------------------------------------------ 8: Ctrl-C


def test_8_ctrl_c_saves_a_checkpoint_and_the_export_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    args = _synthetic(run, "max_duration=100000ba", "console_log_interval=1ba", "log_to_console=true",
                      "save_interval=1000ep")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "amortize.cli", "train", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in proc.stderr:  # Composer's console log: wait for the second batch, then press Ctrl-C
            seen.append(line)
            if "[batch=2/" in line:
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        err = "".join(seen) + err
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "amortize train: interrupted at epoch" in err and "resume with: amortize train" in err
    assert "autoresume=true" in err.splitlines()[-1]
    assert (run / "model.pt").is_file() and (run / "latest-rank0.pt").is_file()
    batch = load_checkpoint(run / "latest-rank0.pt")
    assert batch["recipe"]["method"] == "amorlip-log-l2"
    assert main(["eval", str(run), "--tasks", "emoji_heldout", "--device", "cpu"]) == 0
    done = int(os.readlink(run / "latest-rank0.pt").split("-ba")[1].split("-")[0])
    interrupted = os.path.realpath(run / "latest-rank0.pt")
    resumed = subprocess.run([sys.executable, "-m", "amortize.cli", "train",
                              *_synthetic(run, f"max_duration={done + 1}ba", "autoresume=true")],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {interrupted} (epoch " in resumed.stdout


# ------------------------------------------------------------------ issue 19: nothing lost, nothing silent


def test_19_2_autoresume_into_a_folder_holding_only_an_export_is_refused(tmp_path, capsys):
    assert main(["train", *_synthetic(tmp_path / "other", "max_duration=2ba")]) == 0
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_bytes((tmp_path / "other" / "model.pt").read_bytes())
    before = _snapshot(tmp_path / "run")
    capsys.readouterr()
    assert main(["train", *_synthetic(tmp_path / "run", "max_duration=2ba", "autoresume=true")]) == 2
    err = capsys.readouterr().err
    assert "holds no checkpoint to resume from" in err and "model.pt" in err and "save_overwrite=true" in err
    assert _snapshot(tmp_path / "run") == before  # the export is not replaced
    # without autoresume: refused too, and the message does not offer autoresume (there is nothing to resume)
    assert main(["train", *_synthetic(tmp_path / "run", "max_duration=2ba")]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "autoresume=true" not in err and "save_overwrite=true" in err
    assert _snapshot(tmp_path / "run") == before


def test_19_3_a_shard_without_captions_leaves_no_untrained_checkpoint(tmp_path, capsys):
    write_shard(tmp_path / "00000.tar", 0, 12, bad={i: "caption" for i in range(12)})
    args = _on_shards("clip", str(tmp_path / "00000.tar"), tmp_path / "run", "max_duration=2ep", "data.batch_size=4")
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "epoch 0 yielded no batch" in err and "empty_caption=12" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists() or not any(p.suffix == ".pt" for p in (tmp_path / "run").iterdir())


@pytest.mark.parametrize("override, named", [
    ("optimizer.lr=.inf", "optimizer.lr: must be a finite number, got inf"),
    ("loss.estimator.lr=.nan", "loss.estimator.lr: must be a finite number, got nan"),
    ("optimizer.betas=[0.9, -.inf]", "optimizer.betas[1]: must be a finite number, got -inf"),
    ("loss.rho={name: piecewise, values: []}", "loss.rho: values: a piecewise schedule needs at least one"),
    ("loss.estimator.dim=7", "loss.estimator.dim: 7 is not the model's embedding dimension 32"),
    ("seed=1099511627776", "seed: must be in [0, 4294967295]"),
    ("model.image_size=0", "model.image_size: must be a multiple of the patch size 7"),
    ("model.context_length=1", "model.context_length: must be >= 2"),
    ("save_filename=ck-{foo}.pt", "save_filename: unknown field {foo}"),
    ("loss.rho={a: 1, a: 2}", "key 'a' is given twice"),
])
def test_19_4_values_a_dry_run_can_see_are_one_line_exit_2(override, named, tmp_path, capsys):
    for dry in (["--dry-run"], []):
        assert main(["train", *_synthetic(tmp_path, override, "max_duration=1ba"), *dry]) == 2
        err = capsys.readouterr().err
        assert err.startswith("amortize train: error:") and named in err and len(err.strip().splitlines()) == 1, err
        assert not any(tmp_path.iterdir())


def test_19_4_a_run_ending_with_non_finite_weights_exits_2_and_does_not_export(tmp_path, capsys, monkeypatch):
    from amortize.train import algorithms

    def poison(self, event, state, logger):  # the weights turn NaN after the last step (the guard saw finite ones)
        with torch.no_grad():
            algorithms.unwrap(state.model).model.logit_scale.fill_(float("nan"))

    monkeypatch.setattr(algorithms.ClampLogitScale, "apply", poison)
    assert main(["train", *_synthetic(tmp_path, "max_duration=2ba")]) == 2
    err = capsys.readouterr().err
    assert "the weights are not finite" in err and "logit_scale" in err and "refusing to write" in err
    assert not (tmp_path / "model.pt").exists()
    # and `amortize eval` refuses the checkpoint the run left, instead of printing a table
    assert main(["eval", str(tmp_path / "latest-rank0.pt"), "--device", "cpu"]) == 2
    assert "not finite" in capsys.readouterr().err


@pytest.mark.parametrize("override, saved", [("optimizer.lr=0.05", "optimizer.lr: 0.002 -> 0.05"),
                                             ("seed=5", "seed: 0 -> 5")])
def test_19_5_a_change_on_resume_is_refused_when_the_checkpoint_would_override_it(override, saved, tmp_path, capsys):
    assert main(["train", *_synthetic(tmp_path, "max_duration=2ba", "autoresume=true", "optimizer.lr=0.002")]) == 0
    before = _snapshot(tmp_path)
    capsys.readouterr()
    given = [override] if override.startswith("optimizer") else ["optimizer.lr=0.002", override]
    assert main(["train", *_synthetic(tmp_path, "max_duration=4ba", "autoresume=true", *given)]) == 2
    err = capsys.readouterr().err
    assert saved in err and "stored but not applied" in err and len(err.strip().splitlines()) == 1, err
    assert _snapshot(tmp_path) == before


def test_19_5_a_change_on_resume_that_applies_is_applied_and_said(tmp_path, capsys):
    assert main(["train", *_synthetic(tmp_path, "max_duration=2ba", "autoresume=true")]) == 0
    capsys.readouterr()
    assert main(["train", *_synthetic(tmp_path, "max_duration=3ba", "autoresume=true", "grad_clip_norm=0.5")]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "applying the changed" in out and "grad_clip_norm: 1.0 -> 0.5" in out
    assert "max_duration: '2ba' -> '3ba'" in out
    assert load_checkpoint(tmp_path)["recipe"]["grad_clip_norm"] == 0.5


def test_19_6_a_duplicate_key_in_a_recipe_file_is_refused_naming_it_and_its_lines(tmp_path, capsys):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text((RECIPES / "default.yaml").read_text() + "\noptimizer:\n  lr: 0.5\n")
    assert main(["train", str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "key 'optimizer' is given twice (line" in err and str(recipe) in err


@pytest.mark.parametrize("content, named", [
    (b"run_name: caf\xe9\n", "is not UTF-8 text (byte 13, line 1"),
    (b"- model\n- loss\n", "a recipe must be a mapping of keys"),
])
def test_19_files_that_are_not_recipes_are_one_line(content, named, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_bytes(content)
    assert main(["train", str(recipe), "seed=1", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert named in err and str(recipe) in err and len(err.strip().splitlines()) == 1


def test_19_read_only_save_folder_is_refused_by_dry_run(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == ro else real(p, mode, **k))
    assert main(["train", *_synthetic(ro / "run"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"save_folder: {ro / 'run'} cannot be written ({ro} is read-only" in err


def test_19_disk_full_while_writing_a_checkpoint_is_one_line_and_latest_stays_whole(tmp_path, capsys, monkeypatch):
    import errno

    from amortize.checkpoints import is_complete

    real, calls = torch.save, [0]

    def full(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] >= 3:  # the second checkpoint (each save writes a checkpoint, then model.pt at epoch ends)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    assert main(["train", *_synthetic(tmp_path, "max_duration=4ba", "save_interval=1ba")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("amortize train: error: could not write") and "No space left on device" in err
    assert len(err.strip().splitlines()) == 1
    assert is_complete(tmp_path / "latest-rank0.pt")
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_19_7_a_truncated_shard_is_read_once_per_epoch(tmp_path, caplog):
    for s in range(3):
        write_shard(tmp_path / f"{s:05d}.tar", s * 12, 12)
    whole = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(whole[: len(whole) // 2])
    args = _on_shards("clip", str(tmp_path / "{00000..00002}.tar"), tmp_path / "run", "max_duration=1ep",
                      "data.batch_size=4", "data.max_skip_fraction=1", "log_to_console=true",
                      "console_log_interval=1ba")
    assert main(["train", *args]) == 0
    err = caplog.text
    kept = int(err.split("data: kept=")[1].split()[0])
    assert 24 <= kept < 36, err  # two whole shards and part of the third: every sample at most once
    assert "corrupt_shard=1" in err


def test_19_8_drop_last_false_never_yields_a_one_sample_batch():
    from amortize.data.webdataset import make_pipeline
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        write_shard(Path(d) / "00000.tar", 0, 9)
        pipe = make_pipeline(str(Path(d) / "00000.tar"), transform=lambda im: torch.zeros(3, 4, 4),
                             tokenizer=lambda c: torch.zeros(len(c), 4, dtype=torch.long), batch_size=4,
                             shuffle_buffer=0, drop_last=False, epoch_batches=10)
        assert [b["image"].shape[0] for b in pipe] == [4, 5]  # 9 = 4 + 4 + 1: the single sample joins the last batch
        write_shard(Path(d) / "00000.tar", 0, 10)
        assert [b["image"].shape[0] for b in pipe] == [4, 4, 2]


def test_19_8_num_samples_with_split_sampling_gives_full_epochs(shards, tmp_path):
    # 3 shards, 4 DataLoader workers: one worker has no shard; the other three share the epoch
    args = _on_shards("clip", shards, tmp_path, "max_duration=2ep", "data.num_samples=24", "data.batch_size=4",
                      "data.num_workers=4")
    assert main(["train", *args]) == 0
    assert "-ba12-" in os.readlink(tmp_path / "latest-rank0.pt")  # 2 epochs of 24 // 4 = 6 batches


def test_19_eval_of_weights_another_model_size_and_bad_devices_are_one_line(tmp_path, capsys):
    from amortize.checkpoints import atomic_save
    from amortize.weights_export import load_weights_export

    assert main(["train", *_synthetic(tmp_path, "max_duration=1ba")]) == 0
    export = load_weights_export(tmp_path / "model.pt")
    export["recipe"]["model"]["name"] = "cpu-small"
    atomic_save(export, tmp_path / "other.pt")
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "other.pt"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "its weights do not fit the model its recipe names (model.name='cpu-small'" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["eval", str(tmp_path), "--device", "banana"]) == 2
    assert "--device: 'banana' is not a device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["eval", str(tmp_path), "--device", "cuda"]) == 2
        assert "--device cuda: no GPU is available" in capsys.readouterr().err


def test_19_microbatching_a_batchnorm_model_is_refused_by_dry_run(tmp_path, capsys):
    assert main(["train", *_synthetic(tmp_path, "model.name=RN50", "device_train_microbatch_size=4"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("amortize train: error: device_train_microbatch_size: model 'RN50'") and "BatchNorm" in err
    assert len(err.strip().splitlines()) == 1


def test_19_10_a_missing_shard_named_in_data_shards_is_refused_by_dry_run(shards, tmp_path, capsys):
    folder = Path(shards).parent
    partial = str(tmp_path / "{00000..00002}.tar")
    (tmp_path / "00000.tar").write_bytes((folder / "00000.tar").read_bytes())  # 00001 and 00002 are missing
    assert main(["train", *_on_shards("clip", partial, tmp_path / "run", "max_duration=3ep"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "data.shards: 2 of the 3 shards do not exist (first: " in err and "00001.tar" in err
    assert not (tmp_path / "run").exists()


def test_19_11_the_resume_command_pastes_into_a_shell_as_printed():
    import shlex

    from amortize.cli import resume_command

    line = resume_command("r.yaml", ["data.shards=my-shards/{00000..00002}.tar", "run_name=my run",
                                     "autoresume=false", "optimizer.lr=$LR"])
    assert line == ("amortize train r.yaml 'data.shards=my-shards/{00000..00002}.tar' 'run_name=my run' "
                    "'optimizer.lr=$LR' autoresume=true")
    assert shlex.split(line)[2:] == ["r.yaml", "data.shards=my-shards/{00000..00002}.tar", "run_name=my run",
                                     "optimizer.lr=$LR", "autoresume=true"]


def test_19_8_map_style_drop_last_false_never_makes_a_one_sample_batch(tmp_path, capsys):
    # 17 samples in batches of 8 would end each epoch with a batch of one: refused at the dry run, named
    assert main(["train", *_synthetic(tmp_path, "data.num_samples=17", "data.drop_last=false"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "data.drop_last=false would end every epoch with a one-sample batch" in err
    # 18 samples leave a final batch of two: a contrastive batch, accepted
    assert main(["train", *_synthetic(tmp_path, "data.num_samples=18", "data.drop_last=false"), "--dry-run"]) == 0
