"""`amortize export`: open_clip alone (a fresh process, no amortize import) loads the towers and
computes the features `amortize eval` computes; clip_benchmark's zero-shot evaluation agrees."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("open_clip")
pytest.importorskip("safetensors")

from amortize.cli import main, model_from_checkpoint
from amortize.eval.features import encode_images, encode_texts
from amortize.eval.user import retrieval_task
from amortize.train.builders import build_tokenizer
from tests.interop.userdata import write_caption_folder, write_class_folder, write_weights_export

# run in a fresh interpreter: open_clip (and clip_benchmark) only; fails if amortize gets imported
OPEN_CLIP_SIDE = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import torch
    import open_clip
    export, images, out = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    cfg = json.loads((export / "open_clip_config.json").read_text())
    name = cfg["amortize"]["model_name"]
    open_clip.add_model_config(export / f"{name}.json")  # the name resolves in open_clip
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=str(export / "open_clip_model.safetensors"))
    model.eval()
    local, _, preprocess_local = open_clip.create_model_and_transforms(f"local-dir:{export}")
    local.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    from PIL import Image
    files = sorted(p for p in images.iterdir() if p.suffix == ".png")
    texts = [ln for p in files for ln in p.with_suffix(".txt").read_text().splitlines() if ln.strip()]
    with torch.no_grad():
        x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in files])
        res = {"image": model.encode_image(x, normalize=True), "text": model.encode_text(tokenizer(texts), normalize=True),
               "image_local": local.encode_image(torch.stack([preprocess_local(Image.open(p).convert("RGB"))
                                                              for p in files]), normalize=True)}
    assert not any(m == "amortize" or m.startswith("amortize.") for m in sys.modules), "amortize was imported"
    torch.save(res, out)
''')

CLIP_BENCHMARK_SIDE = textwrap.dedent('''
    import json, sys
    import torch
    import open_clip
    from torchvision.datasets import ImageFolder
    from clip_benchmark.metrics import zeroshot_classification
    export, folder, out = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    model.eval()
    ds = ImageFolder(folder, transform=preprocess)
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    metrics = zeroshot_classification.evaluate(model, loader, open_clip.get_tokenizer(f"local-dir:{export}"),
                                               ds.classes, ["a photo of a {c}."], device="cpu", amp=False)
    assert not any(m == "amortize" or m.startswith("amortize.") for m in sys.modules), "amortize was imported"
    json.dump({k: float(v) for k, v in metrics.items()}, open(out, "w"))
''')


def _fresh(script: str, *args, cwd) -> None:
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # no PYTHONPATH
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("objective", ["linearized", "sigmoid"])  # sigmoid: the export carries the logit bias
def test_open_clip_alone_reproduces_amortize_eval_features(tmp_path, objective, capsys):
    ckpt = write_weights_export(tmp_path / "run" / "model.pt", objective=objective)
    images = write_caption_folder(tmp_path / "pairs")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "export")]) == 0
    assert "local-dir:" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "export" / "open_clip_config.json").read_text())
    assert cfg["preprocess_cfg"]["size"] == 28 and cfg["tokenizer"] == {"name": "simple", "context_length": 16}
    assert ("init_logit_bias" in cfg["model_cfg"]) == (objective == "sigmoid")

    # what amortize eval --retrieval computes on the same files
    model, recipe = model_from_checkpoint(ckpt)
    task = retrieval_task(images, image_size=model.image_size)
    ours_img = encode_images(model, task.images, batch_size=3)
    texts = [c for caps in task.captions for c in caps]
    ours_txt = encode_texts(model, build_tokenizer(recipe, model.context_length), texts, batch_size=4)

    _fresh(OPEN_CLIP_SIDE, tmp_path / "export", images, tmp_path / "theirs.pt", cwd=tmp_path)
    theirs = torch.load(tmp_path / "theirs.pt", weights_only=True)
    assert (ours_img - theirs["image"]).abs().max().item() <= 1e-6
    assert (ours_img - theirs["image_local"]).abs().max().item() <= 1e-6
    assert (ours_txt - theirs["text"]).abs().max().item() <= 1e-6


def test_export_holds_towers_only_and_hf_adds_a_model_card(tmp_path):
    write_weights_export(tmp_path / "run" / "model.pt")
    assert main(["export", str(tmp_path / "run" / "model.pt"), str(tmp_path / "hf"), "--format", "hf"]) == 0
    names = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert names == ["README.md", "open_clip_config.json", "open_clip_model.safetensors", "tiny.json"]
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "hf" / "open_clip_model.safetensors"))
    import open_clip

    from amortize.models import model_config

    ref = open_clip.model.CLIP(**model_config("tiny")).state_dict()
    assert sorted(sd) == sorted(ref)  # no amortizer, estimator or optimiser entries, no "clip." prefix
    assert "library_name: open_clip" in (tmp_path / "hf" / "README.md").read_text()


def test_registered_configs_resolve_in_open_clip():
    import open_clip

    from amortize.models import build_model, register_open_clip_configs

    assert set(register_open_clip_configs()) >= {"tiny", "cpu-small"}
    for name in ("tiny", "cpu-small"):
        ours = build_model(name).clip.state_dict()
        theirs = open_clip.create_model(name).state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_clip_benchmark_zero_shot_agrees_with_amortize_eval(tmp_path, capsys):
    pytest.importorskip("clip_benchmark")
    pytest.importorskip("torchvision")
    write_weights_export(tmp_path / "run" / "model.pt", seed=3)
    folder = write_class_folder(tmp_path / "colours")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "export")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--zeroshot", str(folder), "--template", "a photo of a {}.",
                 "--json", "--device", "cpu"]) == 0
    ours = {r["metric"]: r["value"] for r in map(json.loads, capsys.readouterr().out.splitlines())}
    _fresh(CLIP_BENCHMARK_SIDE, tmp_path / "export", folder, tmp_path / "cb.json", cwd=tmp_path)
    theirs = json.loads((tmp_path / "cb.json").read_text())
    assert theirs["acc1"] == pytest.approx(ours["top1"], abs=1e-6)  # float32 means of 15 samples: the same count
    assert theirs["acc5"] == pytest.approx(ours["top5"], abs=1e-6)  # float32 means of 15 samples: the same count
    assert theirs["mean_per_class_recall"] == pytest.approx(ours["mean_per_class_recall"], abs=1e-6)  # float32 means of 15 samples: the same count


@pytest.mark.parametrize("case", ["missing", "not_empty", "not_a_checkpoint"])
def test_export_bad_input_is_one_line_exit_2(tmp_path, capsys, case):
    write_weights_export(tmp_path / "run" / "model.pt")
    args = {"missing": [str(tmp_path / "nope"), str(tmp_path / "out")],
            "not_empty": [str(tmp_path / "run"), str(tmp_path / "run")],
            "not_a_checkpoint": [str(tmp_path / "junk.pt"), str(tmp_path / "out")]}[case]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["export", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("amortize export: error: ") and "\n" not in err
    assert {"missing": "does not exist", "not_empty": "not empty", "not_a_checkpoint": "junk.pt"}[case] in err
