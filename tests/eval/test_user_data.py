"""`amortize eval --retrieval / --zeroshot` on files a user made, `eval.tasks` sections, DataComp partial roots."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("open_clip")

from amortize.cli import main
from amortize.eval.datacomp import DATACOMP_TASKS, task_dir_name
from amortize.eval.user import (
    ImageFiles,
    read_caption_csv,
    read_caption_folder,
    read_class_folder,
)
from amortize.train.config import RecipeError, load_recipe_dict
from tests.interop.userdata import (
    COLOURS,
    write_caption_csv,
    write_caption_folder,
    write_class_folder,
    write_image,
    write_weights_export,
)


@pytest.fixture()
def ckpt(tmp_path):
    return write_weights_export(tmp_path / "run" / "model.pt")


def _rows(out: str) -> dict:
    return {(r["task"], r["metric"]): r["value"] for r in map(json.loads, out.splitlines())}


def test_readers_group_captions_and_label_classes(tmp_path):
    images, caps = read_caption_csv(write_caption_csv(tmp_path / "csv"))
    assert len(images) == 5 and all(len(c) == 2 for c in caps) and caps[0][1] == "the colour red, noisy"
    images, caps = read_caption_folder(write_caption_folder(tmp_path / "folder"))
    assert [p.stem for p in images] == sorted(COLOURS) and caps[0] == ["a blue square", "a patch of blue"]
    paths, labels, names = read_class_folder(write_class_folder(tmp_path / "classes", per_class=2))
    assert names == sorted(COLOURS) and labels == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    x = ImageFiles(paths, 28)[0:3]
    assert x.shape == (3, 3, 28, 28) and x.dtype == torch.float32


def test_eval_cli_prints_retrieval_and_zeroshot_tables(tmp_path, ckpt, capsys):
    csv = write_caption_csv(tmp_path / "csv", image_column="path", caption_column="text")
    folder = write_caption_folder(tmp_path / "folder")
    classes = write_class_folder(tmp_path / "classes")
    assert main(["eval", str(ckpt), "--retrieval", str(csv), "--image-column", "path", "--caption-column", "text",
                 "--retrieval", str(folder), "--zeroshot", str(classes), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    for line in ("| pairs | image_to_text_R@1 |", "| folder | text_to_image_R@5 |", "| classes | top1 |",
                 "| classes | mean_per_class_recall |"):
        assert line in table
    assert "fashion_mnist_test" not in table  # only the user's tasks unless --tasks names others
    assert main(["eval", str(ckpt), "--zeroshot", str(classes), "--tasks", "emoji_heldout", "--json",
                 "--device", "cpu"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert ("emoji_heldout", "mean_R@1") in rows and 0 <= rows[("classes", "top1")] <= 1
    # 10 captions over 5 images: R@10 text->image covers every image
    assert main(["eval", str(ckpt), "--retrieval", str(folder), "--json", "--device", "cpu"]) == 0
    assert _rows(capsys.readouterr().out)[("folder", "text_to_image_R@10")] == 1.0


def _bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    nocap = tmp_path / "nocap"
    write_image(nocap / "a.png", (1, 2, 3), 0)
    one = tmp_path / "one_class"
    write_image(one / "cat" / "a.png", (1, 2, 3), 0)
    hollow = write_class_folder(tmp_path / "hollow", per_class=1)
    (hollow / "zebra").mkdir()
    csv = write_caption_csv(tmp_path / "csv")
    (tmp_path / "broken.csv").write_text("filepath,title\nimages/missing.png,a cat\n")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    (tmp_path / "junkdir").mkdir()
    (tmp_path / "junkdir" / "junk.png").write_bytes(b"not a png")
    (tmp_path / "junkdir" / "junk.txt").write_text("a caption\n")
    return {
        "missing file": (["--retrieval", str(tmp_path / "nope.csv")], "nope.csv does not exist"),
        "empty folder": (["--retrieval", str(tmp_path / "empty")], "holds no images"),
        "image without caption": (["--retrieval", str(nocap)], "has no caption file a.txt"),
        "csv without the column": (["--retrieval", str(csv), "--caption-column", "caption"],
                                   "no caption column 'caption' (its columns: filepath, title)"),
        "csv naming a missing image": (["--retrieval", str(tmp_path / "broken.csv")], "missing.png does not exist"),
        "unreadable image": (["--retrieval", str(tmp_path / "junkdir")], "cannot read image"),
        "missing zeroshot folder": (["--zeroshot", str(tmp_path / "nope")], "does not exist"),
        "empty zeroshot folder": (["--zeroshot", str(tmp_path / "empty")], "at least two class sub-folders"),
        "one class": (["--zeroshot", str(one)], "found 1"),
        "empty class": (["--zeroshot", str(hollow)], "zebra holds no images"),
        "zeroshot file": (["--zeroshot", str(csv)], "is a file"),
        "template without slot": (["--zeroshot", str(hollow), "--template", "a photo"], "has no '{}'"),
        "template alone": (["--template", "a {}"], "--template applies to --zeroshot"),
    }


@pytest.mark.parametrize("case", [
    "missing file", "empty folder", "image without caption", "csv without the column", "csv naming a missing image",
    "unreadable image", "missing zeroshot folder", "empty zeroshot folder", "one class", "empty class",
    "zeroshot file", "template without slot", "template alone"])
def test_eval_bad_user_data_is_one_line_exit_2(tmp_path, ckpt, capsys, case):
    args, expected = _bad_inputs(tmp_path)[case]
    assert main(["eval", str(ckpt), *args, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("amortize eval: error: ") and "\n" not in err, err
    assert expected in err, err


def test_eval_tasks_sections_are_checked_at_load_and_built_later(tmp_path):
    from amortize.train.builders import build_eval_tasks

    classes = write_class_folder(tmp_path / "classes", per_class=1)
    sections = [{"name": "zeroshot", "path": str(classes), "templates": ["a {}"]},
                {"name": "retrieval", "path": str(tmp_path / "later.csv")}, "default"]
    r = load_recipe_dict({"eval": {"tasks": sections}})
    assert r.eval.tasks[2] == "default"  # a path need not exist when the recipe is read (eval rebuilds it)
    with pytest.raises(RecipeError, match=r"eval.tasks\[1\]: retrieval data .*later.csv does not exist"):
        build_eval_tasks(r, image_size=28)
    r = load_recipe_dict({"eval": {"tasks": [sections[0], "default"]}})
    assert [t.name for t in build_eval_tasks(r, image_size=28)] == ["classes", "fashion_mnist_test", "emoji_heldout"]
    for tasks, match in (
        ([{"name": "retreival", "path": "x"}], r"eval.tasks\[0\]: unknown evaluation task 'retreival' \(did you mean"),
        ([{"name": "zeroshot"}], r"eval.tasks\[0\].*path"),
        ([{"name": "zeroshot", "path": "x", "template": "a {}"}], r"eval.tasks\[0\].template: unknown option"),
        ("everything", r"eval.tasks: 'everything' is not one of default, none"),
        ([], r"eval.tasks: \[\] is not one of default, none"),
    ):
        with pytest.raises(RecipeError, match=match):
            load_recipe_dict({"eval": {"tasks": tasks}})


# ------------------------------------------------------------------ DataComp: partial roots


@pytest.fixture()
def partial_root(tmp_path):
    from tests.eval.test_datacomp import write_task

    root = tmp_path / "datacomp"
    root.mkdir()
    for key in ("cifar10", "vtab/dtd"):
        write_task(root, next(t for t in DATACOMP_TASKS if t.key == key))
    assert sorted(p.name for p in root.iterdir()) == sorted(task_dir_name(k) for k in ("cifar10", "vtab/dtd"))
    return root


def test_partial_datacomp_root_is_refused_unless_allowed(tmp_path, ckpt, partial_root, capsys):
    base = ["eval", str(ckpt), "--tasks", "datacomp", "--datacomp-root", str(partial_root), "--device", "cpu"]
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert "holds 2 of the 38 DataComp tasks" in err and "--allow-partial" in err and "\n" not in err
    assert main(base + ["--allow-partial"]) == 0
    out = capsys.readouterr().out
    assert "| average | Average (2 of 38) |" in out and "| average | VTAB (1 of 13) |" in out
    assert main(base + ["--allow-partial", "--json"]) == 0
    avg = [r for r in map(json.loads, capsys.readouterr().out.splitlines()) if r["metric"] == "Average (38)"]
    assert avg[0]["n_tasks"] == 2 and avg[0]["label"] == "Average (2 of 38)"
    (tmp_path / "none").mkdir()
    assert main(["eval", str(ckpt), "--tasks", "datacomp", "--datacomp-root", str(tmp_path / "none"),
                 "--allow-partial"]) == 2
    assert "holds none of the 38" in capsys.readouterr().err
