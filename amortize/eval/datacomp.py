"""The DataComp 38-task evaluation suite (the paper's "Avg-38"), read from a local directory.

Layout (what DataComp's ``download_evalsets.py`` writes; clip_benchmark's webdataset format)::

    ROOT/wds_<name>_test/            <name>: task key without a "retrieval/", "fairness/" or "misc/"
        classnames.txt                 prefix, "/" replaced by "-" (vtab/dtd -> wds_vtab-dtd_test)
        zeroshot_classification_templates.txt
        dataset_type.txt               optional; "retrieval" for image-text retrieval
        test/nshards.txt
        test/0.tar, test/1.tar, ...

Samples in the tars: classification ``KEY.{webp,png,jpg,jpeg}`` + ``KEY.cls`` (the label as text),
with ``KEY.npy`` metadata for WILDS and fairness tasks; retrieval ``KEY.<image>`` + ``KEY.txt``
(one caption per line). WinoGAViL samples (our reading of its shards; check against real data):
candidate images ``KEY.0.<ext>``, ``KEY.1.<ext>`` ..., the cue in ``KEY.txt`` and the associations
as a boolean (or 0/1) vector over the candidates in ``KEY.npy``, or a ``KEY.json`` with ``cue``,
``candidates`` and ``associations``.

Main metrics follow DataComp's ``tasklist.yml``: ``acc1`` unless stated; ``mean_per_class_recall``
(Caltech-101, FGVC Aircraft, Flowers-102, Pets); ``mean_recall@1`` (Flickr, MSCOCO);
``jaccard_score_10-12`` (WinoGAViL); ``F1-macro_all`` (iWildCam); ``acc_worst_region`` (FMoW);
``acc_top5_wg`` (Dollar Street); ``acc_wg`` (GeoDE). FairFace and UTKFace have no main metric and
are not part of the 38. Averages as DataComp's ``aggregate_scores.py``: ImageNet, ImageNet dist.
shifts, VTAB, Retrieval, and the average over all 38.

Flickr30k, MSCOCO and WinoGAViL are Hugging Face datasets in current DataComp downloads
(``nlphuji/flickr_1k_test_image_text_retrieval``, ``nlphuji/mscoco_2014_5k_test_image_text_retrieval``,
``nlphuji/winogavil``). Their repository files are read too: a CSV and a zip of images, in one of::

    ROOT/<repo name>/                                  e.g. ROOT/flickr_1k_test_image_text_retrieval/
    ROOT/nlphuji/<repo name>/                          huggingface-cli download --local-dir
    ROOT/hf_cache/datasets--nlphuji--<repo name>/snapshots/<rev>/    hf_hub_download(cache_dir=ROOT/hf_cache)

Retrieval CSVs have one row per image: ``filename`` (a member of the zip) and ``raw`` (a JSON list
of its captions; a ``caption`` or ``sentences`` column is read the same way). The WinoGAViL CSV has
``cue``, ``candidates`` and ``associations`` (lists, as JSON or Python literals); each candidate's
image is the zip member whose file name, without extension, is the candidate. When both layouts
are present the webdataset one is used. (The ``datasets`` library's own Arrow cache is not read.)

This module needs no clip_benchmark: it reads the tars with ``tarfile``, CSVs with ``csv``, zips
with ``zipfile`` and images with Pillow.
"""

from __future__ import annotations

import io
import math
import os
import tarfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from amortize.eval.features import encode_texts
from amortize.eval.retrieval import flatten_captions, retrieval_metrics
from amortize.eval.zeroshot import build_classifier, mean_per_class_recall, topk_accuracy

IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")
"""Sample keys read as the image of a DataComp webdataset sample, in order of preference."""


@dataclass(frozen=True)
class TaskSpec:
    """One DataComp task: its key in tasklist.yml, display name, kind, main metric and groups."""

    key: str
    name: str
    main_metric: str = "acc1"
    kind: str = "classification"  # classification | retrieval | winogavil
    tags: tuple[str, ...] = field(default=())


def _t(key, name, metric="acc1", kind="classification", tags=()):
    return TaskSpec(key, name, metric, kind, tuple(tags))


# The 38 tasks of DataComp's tasklist.yml (FairFace and UTKFace excluded: no main metric).
DATACOMP_TASKS: tuple[TaskSpec, ...] = (
    _t("vtab/caltech101", "Caltech-101", "mean_per_class_recall", tags=["vtab"]),
    _t("cifar10", "CIFAR-10"),
    _t("vtab/cifar100", "CIFAR-100", tags=["vtab"]),
    _t("vtab/clevr_count_all", "CLEVR Counts", tags=["vtab"]),
    _t("vtab/clevr_closest_object_distance", "CLEVR Distance", tags=["vtab"]),
    _t("country211", "Country211"),
    _t("vtab/dtd", "Describable Textures", tags=["vtab"]),
    _t("vtab/eurosat", "EuroSAT", tags=["vtab"]),
    _t("fgvc_aircraft", "FGVC Aircraft", "mean_per_class_recall"),
    _t("food101", "Food-101"),
    _t("gtsrb", "GTSRB"),
    _t("imagenet1k", "ImageNet 1k", tags=["imagenet"]),
    _t("imagenet_sketch", "ImageNet Sketch", tags=["imagenet_shift"]),
    _t("imagenetv2", "ImageNet v2", tags=["imagenet_shift"]),
    _t("imagenet-a", "ImageNet-A", tags=["imagenet_shift"]),
    _t("imagenet-o", "ImageNet-O", tags=["imagenet_shift"]),
    _t("imagenet-r", "ImageNet-R", tags=["imagenet_shift"]),
    _t("vtab/kitti_closest_vehicle_distance", "KITTI Vehicle Distance", tags=["vtab"]),
    _t("mnist", "MNIST"),
    _t("objectnet", "ObjectNet", tags=["imagenet_shift"]),
    _t("vtab/flowers", "Oxford Flowers-102", "mean_per_class_recall", tags=["vtab"]),
    _t("vtab/pets", "Oxford-IIIT Pet", "mean_per_class_recall", tags=["vtab"]),
    _t("voc2007", "Pascal VOC 2007"),
    _t("vtab/pcam", "PatchCamelyon", tags=["vtab"]),
    _t("renderedsst2", "Rendered SST2"),
    _t("vtab/resisc45", "RESISC45", tags=["vtab"]),
    _t("cars", "Stanford Cars"),
    _t("stl10", "STL-10"),
    _t("sun397", "SUN397", tags=["vtab"]),
    _t("vtab/svhn", "SVHN", tags=["vtab"]),
    _t("retrieval/flickr30k", "Flickr", "mean_recall@1", "retrieval", ["retrieval"]),
    _t("retrieval/mscoco_2014_5k_test_image_text_retrieval", "MSCOCO", "mean_recall@1", "retrieval",
       ["retrieval"]),
    _t("misc/winogavil", "WinoGAViL", "jaccard_score_10-12", "winogavil", ["retrieval"]),
    _t("wilds/iwildcam", "iWildCam", "F1-macro_all"),
    _t("wilds/camelyon17", "Camelyon17"),
    _t("wilds/fmow", "FMoW", "acc_worst_region"),
    _t("fairness/dollar_street", "Dollar Street", "acc_top5_wg"),
    _t("fairness/geode", "GeoDE", "acc_wg"),
)
"""The 38 DataComp evaluation tasks: name, kind and main metric, in DataComp's order."""

# Average name -> tag selecting its tasks (None: all 38).
AVERAGES: dict[str, str | None] = {
    "ImageNet": "imagenet",
    "ImageNet dist. shifts": "imagenet_shift",
    "VTAB": "vtab",
    "Retrieval": "retrieval",
    "Average (38)": None,
}
"""The averages reported over task groups: name -> group (None: all 38 tasks)."""

# Metadata column used for worst-group metrics: (column, values to ignore).
_GROUP_COLUMN = {
    "wilds/fmow": (0, {5}),           # region; FMoW's region 5 is "Other", ignored by DataComp
    "fairness/dollar_street": (0, set()),  # income_ds
    "fairness/geode": (0, set()),     # region
}


def task_by_key(key: str) -> TaskSpec:
    """The [`TaskSpec`][amortize.eval.datacomp.TaskSpec] of a tasklist key or display name.

    Raises:
        KeyError: naming the unknown task and listing the known keys.
    """
    for t in DATACOMP_TASKS:
        if key in (t.key, t.name):
            return t
    raise KeyError(f"unknown DataComp task {key!r}; known: {', '.join(t.key for t in DATACOMP_TASKS)}")


def task_dir_name(key: str) -> str:
    """Directory name DataComp's downloader uses: ``vtab/dtd`` -> ``wds_vtab-dtd_test``."""
    for prefix in ("retrieval/", "fairness/", "misc/"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return f"wds_{key.replace('/', '-')}_test"


HF_REPOS = {
    "retrieval/flickr30k": "flickr_1k_test_image_text_retrieval",
    "retrieval/mscoco_2014_5k_test_image_text_retrieval": "mscoco_2014_5k_test_image_text_retrieval",
    "misc/winogavil": "winogavil",
}
"""Task key -> the ``nlphuji/<name>`` Hugging Face dataset DataComp downloads for it."""


def find_hf_dir(root: str | Path, key: str) -> Path | None:
    """The folder of a task's Hugging Face repository files (a CSV beside a zip), or None."""
    name = HF_REPOS.get(key)
    if name is None:
        return None
    root = Path(root)
    candidates = [root / name, root / "nlphuji" / name]
    for cache in (root / "hf_cache", root):
        candidates += sorted((cache / f"datasets--nlphuji--{name}" / "snapshots").glob("*"))
    for c in candidates:
        if c.is_dir() and any(c.glob("*.csv")):
            return c
    return None


def find_task_dir(root: str | Path, key: str) -> Path:
    """The task's directory under ``root`` (webdataset layout, or Hugging Face files for
    Flickr30k, MSCOCO and WinoGAViL; see :func:`find_hf_dir`).

    Raises:
        FileNotFoundError: naming the task and the path that was expected.
    """
    path = Path(root) / task_dir_name(key)
    if (path / "test").is_dir():
        return path
    hf = find_hf_dir(root, key)
    if hf is not None:
        return hf
    also = f" or nlphuji/{HF_REPOS[key]}'s files under {root}" if key in HF_REPOS else ""
    raise FileNotFoundError(f"task {key}: no data at {path}/test (expected DataComp's layout){also}")


def _parse_list(text: str) -> list[str]:
    """A CSV cell holding a list (JSON or a Python literal) -> list of str; a plain string -> [it]."""
    import ast
    import json

    text = (text or "").strip()
    if not text.startswith("["):
        return [text] if text else []
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = ast.literal_eval(text)  # literals only: no code runs
        except (SyntaxError, ValueError):
            raise ValueError(f"cannot read a list from {text[:60]!r}") from None
    return [str(v) for v in value]


def iter_hf_rows(folder: Path) -> Iterator[tuple[dict, Callable[[str], bytes]]]:
    """Rows of a Hugging Face repository's CSV, each with a function name -> image bytes.

    The CSV is the one whose name contains ``test`` (else the first); images are looked up among
    the members of every zip in ``folder`` and the image files under it, by file name or by file
    name without extension.

    Raises:
        FileNotFoundError: if an image named by a row is in none of them.
    """
    import csv

    csvs = sorted(folder.glob("*.csv"))
    table = next((c for c in csvs if "test" in c.name), csvs[0])
    index: dict[str, Callable[[], bytes]] = {}
    zips = [zipfile.ZipFile(z) for z in sorted(folder.glob("*.zip"))]
    for z in zips:
        for member in z.namelist():
            base = os.path.basename(member)
            if base and base.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                read = (lambda z=z, m=member: z.read(m))
                index.setdefault(base, read)
                index.setdefault(base.rsplit(".", 1)[0], read)
    for f in folder.rglob("*"):
        if f.suffix.lower().lstrip(".") in IMAGE_EXTS and f.is_file():
            index.setdefault(f.name, f.read_bytes)
            index.setdefault(f.stem, f.read_bytes)

    def image(name: str) -> bytes:
        base = os.path.basename(name.strip())
        if base not in index:
            raise FileNotFoundError(f"image {name!r} named by {table} is in no zip or folder under {folder}")
        return index[base]()

    try:
        with open(table, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                yield row, image
    finally:
        for z in zips:
            z.close()


def _is_hf(task_dir: Path) -> bool:
    return not (task_dir / "test").is_dir() and any(task_dir.glob("*.csv"))


# ----------------------------------------------------------------------------- reading


def _read_lines(path: Path) -> list[str] | None:
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()] \
        if path.is_file() else None


def iter_wds_samples(task_dir: Path, split: str = "test") -> Iterator[dict]:
    """Raw samples (``{"__key__": str, ext: bytes}``) of a clip_benchmark-style webdataset split.

    Raises:
        FileNotFoundError: if ``nshards.txt`` or a listed shard is missing.
    """
    nshards_file = task_dir / split / "nshards.txt"
    if not nshards_file.is_file():
        raise FileNotFoundError(f"{nshards_file} is missing")
    for i in range(int(nshards_file.read_text().strip())):
        shard = task_dir / split / f"{i}.tar"
        if not shard.is_file():
            raise FileNotFoundError(f"shard {shard} listed by nshards.txt is missing")
        sample: dict | None = None
        with tarfile.open(shard, "r") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                key, _, ext = base.partition(".")
                if sample is None or sample["__key__"] != key:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key}
                sample[ext.lower()] = tar.extractfile(m).read()
        if sample is not None:
            yield sample


def decode_image(data: bytes):
    """Bytes -> RGB PIL image."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def _image_of(sample: dict, prefix: str = "") -> bytes:
    for ext in IMAGE_EXTS:
        if prefix + ext in sample:
            return sample[prefix + ext]
    raise ValueError(f"sample {sample['__key__']} has no image ({', '.join(IMAGE_EXTS)})")


@torch.no_grad()
def _encode_pil(model, transform, images: list, device, batch_size: int) -> torch.Tensor:
    out = []
    for a in range(0, len(images), batch_size):
        x = torch.stack([transform(im) for im in images[a:a + batch_size]]).to(device)
        out.append(F.normalize(model.encode_image(x).float(), dim=-1).cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------- metrics


def macro_f1(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Macro F1 over the classes present in ``labels`` (N,) given predictions (N,)."""
    scores = []
    for c in labels.unique():
        tp = ((preds == c) & (labels == c)).sum().item()
        fp = ((preds == c) & (labels != c)).sum().item()
        fn = ((preds != c) & (labels == c)).sum().item()
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def worst_group_accuracy(correct: torch.Tensor, groups: torch.Tensor, ignore: set[int] = frozenset()) -> float:
    """Lowest accuracy over the non-empty groups not in ``ignore``.

    Args:
        correct: bool (N,).
        groups: int (N,) group id of each sample.
    """
    accs = [correct[groups == g].float().mean().item() for g in groups.unique().tolist() if g not in ignore]
    if not accs:
        raise ValueError("no group to evaluate")
    return min(accs)


def jaccard(pred: np.ndarray, true: np.ndarray) -> float:
    """|pred & true| / |pred | true| of two boolean vectors (1 when both are empty)."""
    union = np.logical_or(pred, true).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, true).sum() / union)


# ----------------------------------------------------------------------------- task runners


def run_classification(spec: TaskSpec, task_dir: Path, model, tokenizer, transform, *,
                       batch_size: int, device) -> dict[str, float]:
    """Zero-shot classification metrics of one task, including its main metric."""
    classnames = _read_lines(task_dir / "classnames.txt")
    templates = _read_lines(task_dir / "zeroshot_classification_templates.txt")
    if not classnames or not templates:
        raise FileNotFoundError(f"task {spec.key}: classnames.txt or zeroshot_classification_templates.txt "
                                f"missing or empty in {task_dir}")
    images, labels, meta = [], [], []
    for s in iter_wds_samples(task_dir):
        images.append(decode_image(_image_of(s)))
        labels.append(int(s["cls"].decode().strip()))
        if "npy" in s:
            meta.append(np.load(io.BytesIO(s["npy"]), allow_pickle=False))
    if not images:
        raise ValueError(f"task {spec.key}: no samples in {task_dir}/test")
    head = build_classifier(model, tokenizer, classnames, templates, batch_size=batch_size, device=device)
    logits = _encode_pil(model, transform, images, device, batch_size) @ head
    y = torch.tensor(labels)
    m = {f"acc{k}": v for k, v in ((k[3:], v) for k, v in topk_accuracy(logits, y, (1, 5)).items())}
    pred = logits.argmax(1)
    m["mean_per_class_recall"] = mean_per_class_recall(pred, y, len(classnames))
    if spec.main_metric == "F1-macro_all":
        m["F1-macro_all"] = macro_f1(pred, y)
    elif spec.key in _GROUP_COLUMN:
        if len(meta) != len(labels):
            raise ValueError(f"task {spec.key}: needs .npy metadata for every sample")
        col, ignore = _GROUP_COLUMN[spec.key]
        groups = torch.tensor(np.stack(meta)[:, col].astype(np.int64))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct = (top[:, :5] == y[:, None]).any(1) if spec.main_metric == "acc_top5_wg" else pred == y
        m[spec.main_metric] = worst_group_accuracy(correct, groups, ignore)
    return m


def run_retrieval(spec: TaskSpec, task_dir: Path, model, tokenizer, transform, *,
                  batch_size: int, device) -> dict[str, float]:
    """Image-text retrieval metrics; ``mean_recall@1`` is the average of the two R@1."""
    images, captions = [], []
    if _is_hf(task_dir):
        for row, image in iter_hf_rows(task_dir):
            text = next((row[c] for c in ("raw", "caption", "captions", "sentences") if row.get(c)), "")
            images.append(decode_image(image(row["filename"])))
            captions.append([c for c in _parse_list(text) if c.strip()])
    else:
        for s in iter_wds_samples(task_dir):
            images.append(decode_image(_image_of(s)))
            captions.append([c for c in s["txt"].decode("utf-8").splitlines() if c.strip()])
    if not images:
        raise ValueError(f"task {spec.key}: no samples in {task_dir}")
    texts, owner = flatten_captions(captions)
    img = _encode_pil(model, transform, images, device, batch_size)
    txt = encode_texts(model, tokenizer, texts, batch_size=batch_size, device=device)
    m = retrieval_metrics(img, txt, owner, (1, 5, 10))
    m["mean_recall@1"] = m.pop("mean_R@1")
    return m


def winogavil_prompt(cue: str) -> str:
    """DataComp's prompt for a WinoGAViL cue: ``"A cue"`` / ``"An cue"`` by its first letter."""
    cue = cue.strip().lower()
    return ("An " if cue[:1] in "aeiou" and cue else "A ") + cue


def run_winogavil(spec: TaskSpec, task_dir: Path, model, tokenizer, transform, *,
                  batch_size: int, device) -> dict[str, float]:
    """Jaccard index of the top-k images (k = number of associations) against the associations."""
    scores, sizes = [], []
    for cue, truth, imgs in _winogavil_items(task_dir):
        _score_winogavil(model, tokenizer, transform, cue, truth, imgs, scores, sizes, spec, batch_size, device)
    if not scores:
        raise ValueError(f"task {spec.key}: no samples in {task_dir}")
    scores_a, sizes_a = np.array(scores), np.array(sizes)
    big = scores_a[sizes_a >= 10]
    return {"avg_jaccard_score": float(scores_a.mean()),
            "jaccard_score_5-6": float(scores_a[sizes_a <= 6].mean()) if (sizes_a <= 6).any() else math.nan,
            "jaccard_score_10-12": float(big.mean()) if big.size else math.nan}


def _winogavil_items(task_dir: Path) -> Iterator[tuple[str, np.ndarray, list]]:
    """(cue, boolean associations over the candidates, candidate PIL images) per instance."""
    import json

    if _is_hf(task_dir):
        for row, image in iter_hf_rows(task_dir):
            candidates = _parse_list(row["candidates"])
            truth = np.isin(candidates, _parse_list(row["associations"]))
            yield row["cue"], truth, [decode_image(image(c)) for c in candidates]
        return
    for s in iter_wds_samples(task_dir):
        cand_exts = sorted({k.split(".")[0] for k in s if "." in k and k.split(".")[0].isdigit()}, key=int)
        if "json" in s:
            info = json.loads(s["json"])
            cue = info["cue"]
            truth = np.isin(info["candidates"], info["associations"]) if "candidates" in info \
                else np.asarray(info["associations"], dtype=bool)
        else:
            cue = s["txt"].decode("utf-8")
            truth = np.load(io.BytesIO(s["npy"])).astype(bool)
        if len(cand_exts) != len(truth):
            raise ValueError(f"sample {s['__key__']} has {len(cand_exts)} images but {len(truth)} labels")
        yield cue, truth, [decode_image(_image_of(s, f"{c}.")) for c in cand_exts]


def _score_winogavil(model, tokenizer, transform, cue: str, truth: np.ndarray, imgs: list, scores: list,
                     sizes: list, spec: TaskSpec, batch_size: int, device) -> None:
    if len(imgs) != len(truth):
        raise ValueError(f"task {spec.key}: an instance has {len(imgs)} images but {len(truth)} labels")
    img = _encode_pil(model, transform, imgs, device, batch_size)
    txt = encode_texts(model, tokenizer, [winogavil_prompt(cue)], device=device)
    sim = (txt @ img.T)[0].numpy()
    k = int(truth.sum())
    pred = np.zeros(len(sim), dtype=bool)
    pred[np.argsort(-sim, kind="stable")[:k]] = True
    scores.append(jaccard(pred, truth))
    sizes.append(len(sim))


_RUNNERS = {"classification": run_classification, "retrieval": run_retrieval, "winogavil": run_winogavil}


def averages(main: dict[str, float | None]) -> list[dict]:
    """DataComp's aggregate rows from ``{task key: main metric value or None}``.

    Each average is over the tasks that ran; rows carry ``n_tasks`` and ``n_expected``, and a
    partial average's ``label`` (what the markdown table prints) says so: ``Average (2 of 38)``,
    ``VTAB (3 of 11)``.

    Returns:
        Rows ``{"task": "average", "metric": name, "label", "value", "n_tasks", "n_expected"}``.
    """
    rows = []
    for name, tag in AVERAGES.items():
        keys = [t.key for t in DATACOMP_TASKS if tag is None or tag in t.tags]
        vals = [main[k] for k in keys if main.get(k) is not None and not math.isnan(main[k])]
        base = name.split(" (")[0]
        label = name if len(vals) == len(keys) else f"{base} ({len(vals)} of {len(keys)})"
        rows.append({"task": "average", "metric": name, "label": label,
                     "value": float(np.mean(vals)) if vals else None,
                     "n_tasks": len(vals), "n_expected": len(keys)})
    return rows


def missing_tasks(root: str | Path, tasks: Sequence[str] | None = None) -> list[str]:
    """Keys of the tasks (default: all 38) with no data under ``root`` (see :func:`find_task_dir`).

    Raises:
        FileNotFoundError: if ``root`` is not a folder.
    """
    if not Path(root).is_dir():
        raise FileNotFoundError(f"DataComp root {root} is not a folder")
    specs = [task_by_key(k) for k in tasks] if tasks is not None else list(DATACOMP_TASKS)
    out = []
    for spec in specs:
        try:
            find_task_dir(root, spec.key)
        except FileNotFoundError:
            out.append(spec.key)
    return out


def run_datacomp(model, tokenizer: Callable[[Sequence[str]], torch.Tensor], transform: Callable,
                 root: str | Path, *, tasks: Sequence[str] | None = None, batch_size: int = 64,
                 device: str | torch.device = "cpu", all_metrics: bool = False,
                 log: Callable[[str], None] | None = print) -> list[dict]:
    """Run the DataComp suite from ``root``; a missing or broken task is reported and skipped.

    Args:
        model: open_clip-style module (``encode_image``, ``encode_text``).
        tokenizer: captions -> LongTensor (N, L).
        transform: PIL image -> float (3, S, S) (open_clip's ``preprocess_val``).
        root: directory holding the ``wds_*_test`` task directories.
        tasks: task keys or names to run (default: all 38).
        batch_size: images per forward pass.
        device: where the model runs.
        all_metrics: also emit every secondary metric (top-5, per-direction recalls ...).
        log: called with a message for each task that could not run (``None``: silent).

    Returns:
        One row per task ``{"task": key, "metric": main metric, "value": float or None, "name"}``
        (with ``"error"`` when it could not run), then the average rows.
    """
    specs = [task_by_key(k) for k in tasks] if tasks is not None else list(DATACOMP_TASKS)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    rows, extra, main = [], [], {}
    try:
        for spec in specs:
            try:
                d = find_task_dir(root, spec.key)
                metrics = _RUNNERS[spec.kind](spec, d, model, tokenizer, transform,
                                              batch_size=batch_size, device=device)
                main[spec.key] = metrics[spec.main_metric]
                rows.append({"task": spec.key, "metric": spec.main_metric, "value": main[spec.key],
                             "name": spec.name})
                if all_metrics:
                    extra += [{"task": spec.key, "metric": k, "value": v, "name": spec.name}
                              for k, v in metrics.items() if k != spec.main_metric]
            except (OSError, ValueError, KeyError, tarfile.TarError, zipfile.BadZipFile) as exc:
                main[spec.key] = None
                rows.append({"task": spec.key, "metric": spec.main_metric, "value": None,
                             "name": spec.name, "error": f"{type(exc).__name__}: {exc}"})
                if log is not None:
                    log(f"datacomp: skipping task {spec.key} ({spec.name}): {exc}")
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return rows + extra + averages(main)
