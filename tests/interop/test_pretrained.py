"""`model.pretrained` (open_clip formats and our exports, checked key by key) and LiT locks."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("open_clip")

from amortize.interop.pretrained import PretrainedError, apply_locks, load_pretrained, read_state_dict, tower_groups
from amortize.models import build_model
from amortize.train.builders import build_two_tower
from amortize.train.config import RecipeError, load_recipe_dict
from tests.interop.userdata import write_weights_export


def _reference(seed: int = 1, name: str = "tiny"):
    torch.manual_seed(seed)
    return build_model(name)


def _same(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_every_accepted_format_loads_the_same_weights(tmp_path):
    from safetensors.torch import save_file

    from amortize.cli import main

    ref = _reference().clip.state_dict()
    torch.save(ref, tmp_path / "state_dict.pt")                                       # open_clip state dict
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in ref.items()}},  # open_clip's train checkpoint
               tmp_path / "epoch_3.pt")
    save_file({k: v.contiguous() for k, v in ref.items()}, str(tmp_path / "w.safetensors"))
    run = write_weights_export(tmp_path / "run" / "model.pt")                        # our weights export
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "export")]) == 0    # our open_clip export
    ours = {k[len("clip."):]: v for k, v in torch.load(run, weights_only=True)["model"].items()}
    for path, expected in ((tmp_path / "state_dict.pt", ref), (tmp_path / "epoch_3.pt", ref),
                           (tmp_path / "w.safetensors", ref), (run, ours), (tmp_path / "run", ours),
                           (tmp_path / "export", ours)):
        assert _same(read_state_dict(path), expected), path
        model = build_model("tiny")
        load_pretrained(model, path, "tiny")
        assert _same(model.clip.state_dict(), expected), path


def test_a_mismatched_architecture_names_the_first_key(tmp_path):
    torch.save(_reference(name="cpu-small").clip.state_dict(), tmp_path / "small.pt")
    with pytest.raises(PretrainedError, match=r"does not fit model 'tiny': key 'positional_embedding' has shape "
                                              r"\(32, 128\) in the checkpoint and \(16, 32\) in the model"):
        load_pretrained(build_model("tiny"), tmp_path / "small.pt", "tiny")
    sd = _reference().clip.state_dict()
    missing = dict(sd)
    del missing["visual.proj"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(PretrainedError, match=r"key 'visual.proj' is missing from the checkpoint"):
        load_pretrained(build_model("tiny"), tmp_path / "missing.pt", "tiny")
    torch.save({**sd, "visual.extra": torch.zeros(2)}, tmp_path / "extra.pt")
    with pytest.raises(PretrainedError, match=r"the checkpoint's key 'visual.extra' is not in the model"):
        load_pretrained(build_model("tiny"), tmp_path / "extra.pt", "tiny")


def test_the_logit_bias_may_differ_between_checkpoint_and_model(tmp_path):
    torch.save(_reference().clip.state_dict(), tmp_path / "clip.pt")  # no bias
    siglip = build_model("tiny", init_logit_bias=-10.0)
    load_pretrained(siglip, tmp_path / "clip.pt", "tiny")
    assert siglip.logit_bias.item() == -10.0  # kept its initial value
    torch.save(build_model("tiny", init_logit_bias=-3.0).clip.state_dict(), tmp_path / "siglip.pt")
    load_pretrained(build_model("tiny"), tmp_path / "siglip.pt", "tiny")  # a bias the model has not: ignored


def test_recipe_errors_are_one_line_naming_model_pretrained(tmp_path, capsys):
    from amortize.cli import main

    torch.save(_reference(name="cpu-small").clip.state_dict(), tmp_path / "small.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    for path, expected in ((tmp_path / "nope.pt", "model.pretrained: " + str(tmp_path / "nope.pt") + " does not exist"),
                           (tmp_path / "small.pt", "does not fit model 'tiny': key 'positional_embedding'"),
                           (tmp_path / "junk.pt", "junk.pt is not a readable checkpoint")):
        recipe = load_recipe_dict({"model": {"name": "tiny", "pretrained": str(path)}})
        with pytest.raises(RecipeError, match="model.pretrained"):
            build_two_tower(recipe)
        recipe_file = tmp_path / "r.yaml"
        recipe_file.write_text(f"run_name: r\nmodel: {{name: tiny, pretrained: {path}}}\ndata: {{name: synthetic, "
                               f"batch_size: 4, num_samples: 8}}\nsave_folder: {tmp_path / 'run'}\n")
        assert main(["train", str(recipe_file), "--dry-run"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("amortize train: error: ") and expected in err, err


def _trainable(model) -> set[str]:
    return {n for n, p in model.clip.named_parameters() if p.requires_grad}


def test_locks_follow_open_clips_lit_groups():
    m = build_model("tiny")
    everything = _trainable(m)
    assert tower_groups(m, "image") == 4 and tower_groups(m, "text") == 4  # 2 blocks: stem, block, last+norm, proj
    n = apply_locks(m, {"unlocked_groups": 0})
    assert n == sum(p.numel() for p in m.clip.visual.parameters())
    assert _trainable(m) == {k for k in everything if not k.startswith("visual.")}
    m = build_model("tiny")
    apply_locks(m, {"unlocked_groups": 1})
    assert {k for k in _trainable(m) if k.startswith("visual.")} == {"visual.proj"}
    m = build_model("tiny")
    apply_locks(m, {"unlocked_groups": 2})
    visual = {k for k in _trainable(m) if k.startswith("visual.")}
    assert "visual.ln_post.weight" in visual and "visual.transformer.resblocks.1.mlp.c_fc.weight" in visual
    assert not any(k.startswith("visual.transformer.resblocks.0.") for k in visual)
    m = build_model("tiny")
    apply_locks(m, {"unlocked_groups": 2, "freeze_norm": True})
    visual = {k for k in _trainable(m) if k.startswith("visual.")}
    assert "visual.ln_post.weight" not in visual and "visual.transformer.resblocks.1.ln_1.bias" not in visual
    assert "visual.transformer.resblocks.1.mlp.c_fc.weight" in visual
    m = build_model("tiny")
    apply_locks(m, None, {"unlocked_groups": 1})
    assert {k for k in everything if k.startswith("visual.")} <= _trainable(m)
    assert {k for k in _trainable(m) if not k.startswith("visual.")} == {"text_projection", "logit_scale"}
    with pytest.raises(PretrainedError, match=r"model.lock_image.unlocked_groups: 5 is more than the 4 groups"):
        apply_locks(build_model("tiny"), {"unlocked_groups": 5})


def test_recipe_locks_are_typed_and_checked():
    r = load_recipe_dict({"model": {"name": "tiny", "lock_image": {"unlocked_groups": 1, "freeze_norm": True}}})
    assert r.model.lock_image.unlocked_groups == 1 and r.model.lock_text is None
    with pytest.raises(RecipeError, match=r"model.lock_image.unlocked_groups: must be >= 0"):
        load_recipe_dict({"model": {"lock_image": {"unlocked_groups": -1}}})
    with pytest.raises(RecipeError, match=r"unknown key 'model.lock_text.unlocked_layers'"):
        load_recipe_dict({"model": {"lock_text": {"unlocked_layers": 1}}})
    with pytest.raises(RecipeError, match=r"model.lock_image.unlocked_groups: 9 is more than the 4 groups"):
        build_two_tower(load_recipe_dict({"model": {"name": "tiny", "lock_image": {"unlocked_groups": 9}}}))
