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
