"""The DataComp runner on tiny datasets written in DataComp's download layout."""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from amortize.data.tokenizer import Tokenizer
from amortize.eval.datacomp import (
    AVERAGES,
    DATACOMP_TASKS,
    run_datacomp,
    task_by_key,
    task_dir_name,
)
from amortize.eval.report import format_jsonl, format_markdown

from tests.eval.fakes import TinyClip, pil_transform

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def _png(color, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color)[None, None] + rng.integers(-20, 20, (8, 8, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(a))
    return buf.getvalue()


def _write_tar(path: Path, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, s in enumerate(samples):
            for ext, data in s.items():
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_task(root: Path, spec) -> None:
    d = root / task_dir_name(spec.key)
    (d / "test").mkdir(parents=True)
    (d / "test" / "nshards.txt").write_text("1\n")
    if spec.kind == "retrieval":
        (d / "dataset_type.txt").write_text("retrieval\n")
        samples = [{"jpg" if i % 2 else "png": _png(COLORS[i % 3], i),
                    "txt": f"a {['red', 'green', 'blue'][i % 3]} square\nsquare number {i}".encode()}
                   for i in range(6)]
    elif spec.kind == "winogavil":
        samples = []
        for i, n in enumerate([5, 10, 12]):
            s = {f"{j}.png": _png(COLORS[j % 3], j) for j in range(n)}
            s["txt"] = b"apple"
            s["npy"] = _npy(np.arange(n) < 2)
            samples.append(s)
    else:
        (d / "classnames.txt").write_text("red\ngreen\nblue\n")
        (d / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c} thing.\n")
        samples = []
        for i in range(9):
            s = {"webp" if i == 0 else "png": _png(COLORS[i % 3], i), "cls": f"{i % 3}\n".encode()}
            if spec.key.startswith(("wilds/", "fairness/")):
                s["npy"] = _npy([i % 2, 2017, i % 3])
            samples.append(s)
        if spec.key == "vtab/caltech101":
            buf = io.BytesIO()
            Image.new("RGB", (8, 8)).save(buf, format="WEBP")
            samples[0]["webp"] = buf.getvalue()
    _write_tar(d / "test" / "0.tar", samples)


@pytest.fixture(scope="module")
def datacomp_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datacomp")
    for spec in DATACOMP_TASKS:
        write_task(root, spec)
    return root


def test_task_list_is_datacomps_38():
    assert len(DATACOMP_TASKS) == 38 and len({t.key for t in DATACOMP_TASKS}) == 38
    assert task_dir_name("vtab/dtd") == "wds_vtab-dtd_test"
    assert task_dir_name("retrieval/flickr30k") == "wds_flickr30k_test"
    assert task_dir_name("fairness/geode") == "wds_geode_test"
    assert task_by_key("FMoW").main_metric == "acc_worst_region"
    with pytest.raises(KeyError, match="unknown DataComp task 'nope'"):
        task_by_key("nope")


def test_runner_produces_38_rows_and_averages(datacomp_root):
    rows = run_datacomp(TinyClip(), Tokenizer(16), pil_transform(8), datacomp_root, batch_size=4, log=None)
    task_rows = [r for r in rows if r["task"] != "average"]
    assert [r["task"] for r in task_rows] == [t.key for t in DATACOMP_TASKS]
    assert all(r["value"] is not None and 0.0 <= r["value"] <= 1.0 for r in task_rows), \
        [r for r in task_rows if r.get("error")]
    avg = {r["metric"]: r for r in rows if r["task"] == "average"}
    assert list(avg) == list(AVERAGES)
    assert avg["Average (38)"]["n_tasks"] == 38
    assert avg["Average (38)"]["value"] == pytest.approx(np.mean([r["value"] for r in task_rows]))
    assert avg["ImageNet dist. shifts"]["n_expected"] == 6 and avg["VTAB"]["n_expected"] == 13
    assert avg["Retrieval"]["n_expected"] == 3
    assert "| average | Average (38) |" in format_markdown(rows)
    assert format_jsonl(rows).count("\n") == len(rows)


def test_missing_task_is_reported_and_run_continues(datacomp_root, tmp_path):
    root = tmp_path / "partial"
    root.mkdir()
    keep = ["cifar10", "imagenet1k", "retrieval/flickr30k", "wilds/fmow"]
    for spec in DATACOMP_TASKS:
        if spec.key in keep:
            (root / task_dir_name(spec.key)).symlink_to(datacomp_root / task_dir_name(spec.key))
    messages = []
    rows = run_datacomp(TinyClip(), Tokenizer(16), pil_transform(8), root, batch_size=4, log=messages.append)
    by_task = {r["task"]: r for r in rows if r["task"] != "average"}
    assert len(by_task) == 38
    assert by_task["mnist"]["value"] is None and "wds_mnist_test" in by_task["mnist"]["error"]
    assert any("mnist" in m for m in messages) and len(messages) == 34
    assert all(by_task[k]["value"] is not None for k in keep)
    avg = {r["metric"]: r for r in rows if r["task"] == "average"}
    assert avg["Average (38)"]["n_tasks"] == 4 and avg["ImageNet"]["n_tasks"] == 1
    assert avg["VTAB"]["value"] is None


# ------------------------------------------------------------------ Hugging Face repository files


def _write_hf_files(folder: Path, key: str) -> None:
    """What ``huggingface-cli download nlphuji/<name>`` leaves: a CSV and a zip of images."""
    import json
    import zipfile

    folder.mkdir(parents=True)
    names = ["red", "green", "blue"]
    if key == "misc/winogavil":
        rows = []
        with zipfile.ZipFile(folder / "winogavil_images.zip", "w") as z:
            for j in range(12):
                z.writestr(f"winogavil_images/cand{j}.jpg", _png(COLORS[j % 3], j))
        for i, n in enumerate([5, 10, 12]):
            cands = [f"cand{j}" for j in range(n)]
            # Python-literal lists in one row, JSON in the others: both occur in exported CSVs
            fmt = repr if i == 0 else json.dumps
            rows.append({"cue": "apple", "candidates": fmt(cands), "associations": fmt(cands[:2])})
        header = ["cue", "candidates", "associations"]
        table = "winogavil_dataset.csv"
    else:
        rows = []
        with zipfile.ZipFile(folder / "images_test.zip", "w") as z:
            for i in range(6):
                z.writestr(f"images/{1000 + i}.jpg", _png(COLORS[i % 3], i))
                rows.append({"filename": f"{1000 + i}.jpg",
                             "raw": json.dumps([f"a {names[i % 3]} square", f"square number {i}"])})
        header = ["filename", "raw"]
        table = "test_1k.csv"
    import csv

    with open(folder / table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)


@pytest.mark.parametrize("layout", ["local_dir", "hub_cache"])
def test_hugging_face_formats_of_flickr_mscoco_winogavil(datacomp_root, tmp_path, layout):
    from amortize.eval.datacomp import HF_REPOS, find_task_dir

    hf_root, wds_root = tmp_path / "hf", tmp_path / "wds"
    hf_root.mkdir()
    wds_root.mkdir()
    for key, name in HF_REPOS.items():
        folder = (hf_root / "nlphuji" / name if layout == "local_dir"
                  else hf_root / "hf_cache" / f"datasets--nlphuji--{name}" / "snapshots" / "c4a4cdc")
        _write_hf_files(folder, key)
        (wds_root / task_dir_name(key)).symlink_to(datacomp_root / task_dir_name(key))
        assert find_task_dir(hf_root, key) == folder
    keys = list(HF_REPOS)
    hf = run_datacomp(TinyClip(), Tokenizer(16), pil_transform(8), hf_root, tasks=keys, batch_size=4, log=None)
    wds = run_datacomp(TinyClip(), Tokenizer(16), pil_transform(8), wds_root, tasks=keys, batch_size=4, log=None)
    hf_rows = {r["task"]: r for r in hf if r["task"] != "average"}
    wds_rows = {r["task"]: r for r in wds if r["task"] != "average"}
    assert all(r.get("error") is None for r in hf_rows.values()), hf_rows
    # the same images and captions in the two formats give the same metrics
    for key in keys:
        assert hf_rows[key]["value"] == pytest.approx(wds_rows[key]["value"]), key


def test_hugging_face_files_with_a_missing_image_are_reported(tmp_path):
    from amortize.eval.datacomp import HF_REPOS

    folder = tmp_path / HF_REPOS["retrieval/flickr30k"]
    _write_hf_files(folder, "retrieval/flickr30k")
    with open(folder / "test_1k.csv", "a") as f:
        f.write('9999.jpg,"[""a lost square""]"\n')
    rows = run_datacomp(TinyClip(), Tokenizer(16), pil_transform(8), tmp_path, tasks=["retrieval/flickr30k"],
                        batch_size=4, log=None)
    assert rows[0]["value"] is None and "9999.jpg" in rows[0]["error"]
