"""Issue 30, round two of an adversarial user: the last tracebacks become one-line messages, and
nothing is lost or silently wrong. Numbers in the test names are the issue's items.

Every test goes through the command line (``amortize.cli.main``) or the API a command uses, on the
tiny model and small files, and checks the outcome: exit status 2 with one line naming the file or
option, a run that trains, or a message that says what happened.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip")

from amortize.cli import main
from tests.integration.helpers import RECIPES
from tests.interop.userdata import (
    write_caption_csv,
    write_caption_folder,
    write_class_folder,
    write_image,
    write_weights_export,
)


@pytest.fixture()
def ckpt(tmp_path):
    return write_weights_export(tmp_path / "run" / "model.pt")


def _synthetic(folder, *extra: str) -> list[str]:
    """``amortize train`` arguments of a tiny CPU run on synthetic data into ``folder``; ``extra`` wins."""
    given = {e.split("=", 1)[0] for e in extra}
    base = ["model.name=tiny", "precision=fp32", "device=cpu", "data.num_workers=0", f"save_folder={folder}",
            "log_to_console=false", "progress_bar=false", "eval.tasks=none", "data.name=synthetic",
            "data.batch_size=8", "data.num_samples=16", "max_duration=2ba"]
    return [str(RECIPES / "default.yaml"), *[o for o in base if o.split("=", 1)[0] not in given], *extra]


def _one_line_error(capsys, command: str = "eval") -> str:
    """The captured stderr, checked to be one ``amortize <command>: error:`` line without a traceback."""
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"amortize {command}: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _rows(out: str) -> dict:
    return {(r["task"], r["metric"]): r["value"] for r in map(json.loads, out.splitlines())}


# ------------------------------------------------------------------ 10: files and options that were tracebacks


def test_10_caption_files_that_are_not_utf8_are_one_line_naming_the_file(tmp_path, ckpt, capsys):
    csv = write_caption_csv(tmp_path / "csv")
    csv.write_bytes(csv.read_bytes().replace(b"a red square", b"a rouge caf\xe9"))
    assert main(["eval", str(ckpt), "--retrieval", str(csv), "--device", "cpu"]) == 2
    err = _one_line_error(capsys)
    assert f"caption file {csv} is not UTF-8 text (byte" in err and "line 2" in err
    folder = write_caption_folder(tmp_path / "folder")
    (folder / "blue.txt").write_bytes(b"un carr\xe9 bleu\n")
    assert main(["eval", str(ckpt), "--retrieval", str(folder), "--device", "cpu"]) == 2
    assert f"caption file {folder / 'blue.txt'} is not UTF-8 text" in _one_line_error(capsys)


@pytest.mark.parametrize("template, named", [
    ("{} and {}", "has 2 '{}' fields but there is one class name"),
    ("{x} {}", "names the field {x}"),
    ("a { {} }", "is not a format string"),
    ("{} {0}", "cannot take a class name"),
])
def test_10_templates_that_cannot_take_a_class_name_are_one_line(template, named, tmp_path, ckpt, capsys):
    classes = write_class_folder(tmp_path / "classes", per_class=1)
    assert main(["eval", str(ckpt), "--zeroshot", str(classes), "--template", template, "--device", "cpu"]) == 2
    err = _one_line_error(capsys)
    assert f"--template {template!r}: {named}" in err
    # the same template in an eval.tasks section (the API) is a UserDataError naming it
    from amortize.eval.user import UserDataError, zeroshot_task

    with pytest.raises(UserDataError, match="template"):
        zeroshot_task(classes, image_size=28, templates=[template])


def test_10_a_template_may_repeat_the_class_name_with_0(tmp_path, ckpt, capsys):
    classes = write_class_folder(tmp_path / "classes", per_class=1)
    assert main(["eval", str(ckpt), "--zeroshot", str(classes), "--template", "{0}, a {0}", "--json",
                 "--device", "cpu"]) == 0
    assert ("classes", "top1") in _rows(capsys.readouterr().out)


def test_10_a_separator_of_two_characters_is_one_line_and_backslash_t_is_a_tab(tmp_path, ckpt, capsys):
    csv = write_caption_csv(tmp_path / "csv")
    assert main(["eval", str(ckpt), "--retrieval", str(csv), "--separator", ";;", "--device", "cpu"]) == 2
    assert "--separator ';;': must be one character" in _one_line_error(capsys)
    tsv = csv.with_suffix(".txt")
    tsv.write_text(csv.read_text().replace(",", "\t", 1).replace("png,", "png\t"))
    assert main(["eval", str(ckpt), "--retrieval", str(tsv), "--separator", "\\t", "--json", "--device", "cpu"]) == 0
    assert ("pairs", "mean_R@1") in _rows(capsys.readouterr().out)


# ------------------------------------------------------------------ 11: confusing, now clear


def test_11_a_csv_with_a_byte_order_mark_is_read(tmp_path, ckpt, capsys):
    from amortize.eval.user import read_caption_csv

    csv = write_caption_csv(tmp_path / "csv")
    plain = read_caption_csv(csv)
    csv.write_bytes(b"\xef\xbb\xbf" + csv.read_bytes())  # what spreadsheet programs save as "CSV UTF-8"
    assert read_caption_csv(csv) == plain
    assert main(["eval", str(ckpt), "--retrieval", str(csv), "--json", "--device", "cpu"]) == 0
    assert ("pairs", "mean_R@1") in _rows(capsys.readouterr().out)


def test_11_an_empty_save_folder_is_named_as_the_current_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = _synthetic("x", "max_duration=1ba")
    args = [a if not a.startswith("save_folder=") else 'save_folder=""' for a in args]
    assert main(["train", *args, "--dry-run"]) == 0
    assert f"checkpoints in {tmp_path}/" in capsys.readouterr().err
    assert main(["train", *args]) == 0
    out = capsys.readouterr().out
    assert f"checkpoints in {tmp_path}/ (latest-rank0.pt); weights export {tmp_path}/model.pt" in out
    assert (tmp_path / "latest-rank0.pt").is_file() and (tmp_path / "model.pt").is_file()


def test_11_eval_reads_an_export_folder(tmp_path, ckpt, capsys):
    assert main(["export", str(ckpt), str(tmp_path / "exported")]) == 0
    capsys.readouterr()
    assert main(["eval", str(ckpt), "--json", "--device", "cpu"]) == 0
    direct = _rows(capsys.readouterr().out)
    assert main(["eval", str(tmp_path / "exported"), "--json", "--device", "cpu"]) == 0
    assert _rows(capsys.readouterr().out) == direct  # the same towers, the same numbers
    (tmp_path / "nothing").mkdir()
    assert main(["eval", str(tmp_path / "nothing"), "--device", "cpu"]) == 2
    err = _one_line_error(capsys)
    assert "holds no model.pt, latest-rank0.pt or open_clip_config.json" in err and "amortize export" in err


# ------------------------------------------------------------------ 7: a retention that keeps nothing


def test_7_keeping_no_checkpoint_with_autoresume_is_refused_naming_both_keys(tmp_path, capsys):
    for dry in (["--dry-run"], []):
        args = _synthetic(tmp_path / "run", "save_num_checkpoints_to_keep=0", "autoresume=true")
        assert main(["train", *args, *dry]) == 2
        err = _one_line_error(capsys, "train")
        assert "save_num_checkpoints_to_keep=0 with autoresume=true" in err and "save_num_checkpoints_to_keep=1" in err
        assert not (tmp_path / "run").exists()


def test_7_the_final_message_names_only_files_that_exist(tmp_path, capsys):
    assert main(["train", *_synthetic(tmp_path, "save_num_checkpoints_to_keep=0")]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "latest-rank0.pt").exists()
    assert "latest-rank0.pt" not in out and "no checkpoint kept in" in out and "cannot be resumed" in out
    assert f"weights export {tmp_path}/model.pt" in out and (tmp_path / "model.pt").is_file()


# ------------------------------------------------------------------ 3: 16-bit images


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_3_a_16_bit_png_is_scaled_to_8_bit_not_read_as_white(mode, tmp_path):
    import numpy as np
    from PIL import Image

    from amortize.eval.user import ImageFiles

    ramp = np.tile(np.linspace(0, 65535, 40).round().astype(np.uint16), (30, 1))  # dark to light, 40 x 30
    if mode == "I;16":
        Image.fromarray(ramp).save(tmp_path / "deep.png")
    else:
        Image.fromarray(ramp.astype(np.int32), "I").save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode in ("I;16", "I")  # what Pillow reads a 16-bit greyscale PNG as
    Image.fromarray(np.round(ramp / 257).astype(np.uint8)).save(tmp_path / "eight.png")
    deep, eight = ImageFiles([tmp_path / "deep.png", tmp_path / "eight.png"], 28)[0:2]
    assert torch.allclose(deep, eight, atol=1e-6)  # the same picture, not a white square
    assert deep.std() > 0.5


# ------------------------------------------------------------------ 6: an unreadable evaluation image


def test_6_an_unreadable_eval_image_is_refused_by_dry_run_and_at_the_start_naming_it(tmp_path, capsys):
    classes = write_class_folder(tmp_path / "classes", per_class=1)
    (classes / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    tasks = f"eval.tasks=[{{name: zeroshot, path: {classes}}}]"
    for dry in (["--dry-run"], []):
        assert main(["train", *_synthetic(tmp_path / "run", tasks, "max_duration=1ep"), *dry]) == 2
        err = _one_line_error(capsys, "train")
        assert "eval.tasks[0]: cannot read image" in err and str(classes / "red" / "broken.png") in err
        assert not (tmp_path / "run").exists()  # refused before anything was trained or written
    (classes / "red" / "broken.png").unlink()
    assert main(["train", *_synthetic(tmp_path / "run", tasks, "max_duration=1ep"), "--dry-run"]) == 0
    assert "# eval: classes" in capsys.readouterr().err


# ------------------------------------------------------------------ 5: one run per save folder


def _lock(folder: Path, pid: int, host: str | None = None) -> Path:
    from amortize.train.lock import LOCK_NAME

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01 00:00:00"}))
    return path


def test_5_a_folder_another_live_run_holds_is_refused_naming_its_pid_and_host(tmp_path, capsys):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = _lock(tmp_path / "run", other.pid)
        held = lock.read_bytes()
        for dry in (["--dry-run"], []):
            assert main(["train", *_synthetic(tmp_path / "run"), *dry]) == 2
            err = _one_line_error(capsys, "train")
            assert f"save_folder: {tmp_path / 'run'} is in use by another run (pid {other.pid} on host " \
                   f"{socket.gethostname()}" in err and "still running" in err
            assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [lock.name]
            assert lock.read_bytes() == held  # the other run's lock is left alone
    finally:
        other.kill()
        other.wait()
    # a lock written on another host cannot be checked: refused, with the way out
    _lock(tmp_path / "far", 1, host="elsewhere.example")
    assert main(["train", *_synthetic(tmp_path / "far")]) == 2
    err = _one_line_error(capsys, "train")
    assert "pid 1 on host elsewhere.example" in err and "delete" in err and ".amortize-lock" in err


def test_5_a_stale_lock_is_taken_over_and_a_finished_run_leaves_no_lock(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process
    assert main(["train", *_synthetic(tmp_path, "autoresume=true")]) == 0
    capsys.readouterr()
    lock = _lock(tmp_path, dead.pid)  # as a run killed with SIGKILL leaves it
    assert main(["train", *_synthetic(tmp_path, "max_duration=3ba", "autoresume=true"), "--dry-run"]) == 0
    assert f"lock: taking over the lock of {lock}" in capsys.readouterr().err
    assert main(["train", *_synthetic(tmp_path, "max_duration=3ba", "autoresume=true")]) == 0
    captured = capsys.readouterr()
    assert f"taking over the lock of {lock}: its run (pid {dead.pid} on host" in captured.err
    assert "resuming from" in captured.out and "no longer running" in captured.err
    assert not lock.exists()  # released at the end
    # a run refused after taking the lock releases it too, and leaves no folder it made
    assert main(["train", *_synthetic(tmp_path / "new", "loss.estimator.dim=7")]) == 2
    assert not (tmp_path / "new").exists()


def test_5_a_run_stopped_by_sigterm_releases_its_lock(tmp_path, capsys, monkeypatch):
    import signal

    from amortize.train import algorithms
    from amortize.train.lock import LOCK_NAME

    held = []
    real = algorithms.ClampLogitScale.apply

    def sigterm_once(self, event, state, logger):  # a scheduler's preemption during the first batch
        if not held:
            held.append(json.loads((tmp_path / LOCK_NAME).read_text())["pid"])
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, event, state, logger)

    monkeypatch.setattr(algorithms.ClampLogitScale, "apply", sigterm_once)
    assert main(["train", *_synthetic(tmp_path, "max_duration=4ba")]) == 143
    assert held == [os.getpid()]  # the run held the lock while it trained
    assert not (tmp_path / LOCK_NAME).exists() and (tmp_path / "latest-rank0.pt").is_file()
    assert "resume with:" in capsys.readouterr().err


# ------------------------------------------------------------------ 8: what make demo replaces


def test_8_the_readme_says_make_demo_replaces_runs_default():
    root = Path(__file__).resolve().parents[2]
    assert "save_overwrite=true" in (root / "Makefile").read_text().split("\ndemo:")[1].split("\n\n")[0]
    after = (root / "README.md").read_text().split("<!-- demo-table:end -->")[1].split("\n\n")[1]
    assert "`make demo`" in after and "save_overwrite=true" in after and "replaces" in after
    assert "`runs/default`" in after and "move that folder away first" in after


@pytest.mark.parametrize("recipe_text, overrides, expected", [
    ("run_name: x\nmodel: tiny\n", [], None),  # the string shorthand of a section: its name
    ("run_name: x\n", ["model=tiny"], None),
    ("run_name: x\na: &a\n  b: *a\n", [], "a YAML anchor refers to itself at a.b"),
    ("run_name: x\n", ["divergence=stop"], "divergence: expected a mapping of options (policy, "),
])
def test_9_section_shorthands_and_recursive_anchors_are_one_line(tmp_path, capsys, recipe_text, overrides, expected):
    """Issue 30, item 9: `model: tiny` (a section's name alone) loads; a recursive YAML anchor and a
    string for a section without names are one line naming the key, exit 2."""
    from amortize.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(recipe_text)
    code = main(["train", str(path), *overrides, f"save_folder={tmp_path / 'run'}", "--dry-run"])
    out, err = capsys.readouterr()
    if expected is None:
        assert code == 0 and "model:\n  name: tiny\n" in out, err
    else:
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_11_a_schedule_section_may_say_kind_as_before_0_2(tmp_path):
    """Issue 30, item 11: `kind:` is documented as the pre-0.2 spelling of `name:` in schedule sections."""
    from amortize.train.config import load_recipe
    from amortize.train.sections import bindings

    r = load_recipe(RECIPES / "default.yaml", ["model.name=tiny", "loss.rho={kind: piecewise, values: [6.5, -8.0]}"])
    assert bindings(r).get("loss.rho").name == "piecewise"


def test_2_a_warm_up_longer_than_the_run_is_said_by_dry_run_and_at_start(tmp_path, capsys):
    """Issue 30, item 2: the lr would never reach optimizer.lr; --dry-run and the start of training say so."""
    args = _synthetic(tmp_path / "run", "scheduler={name: cosine_with_warmup, t_warmup: 1ep}", "max_duration=2ba")
    assert main(["train", *args, "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "warning: scheduler.t_warmup=1ep" in err and "max_duration=2ba, 2 batches" in err, err
    assert main(["train", *args]) == 0
    out, err = capsys.readouterr()
    assert "amortize train: warning: scheduler.t_warmup=1ep" in out, out  # beside the start lines; stderr is for errors
    ok = _synthetic(tmp_path / "run2", "scheduler={name: cosine_with_warmup, t_warmup: 1ba}", "max_duration=2ba")
    assert main(["train", *ok, "--dry-run"]) == 0 and "t_warmup" not in capsys.readouterr().err


def test_4_an_unknown_tokenizer_is_refused_naming_the_key(tmp_path, capsys):
    """Issue 30, item 4: `data.tokenizer=nope` trained with the CLIP BPE without a word."""
    assert main(["train", *_synthetic(tmp_path / "run", "data.tokenizer=nope"), "--dry-run"]) == 2
    err = _one_line_error(capsys, "train")
    assert "data.tokenizer: unknown tokenizer 'nope'" in err
    assert main(["train", *_synthetic(tmp_path / "run", "data.tokenizer=ViT-B-32"), "--dry-run"]) == 0
