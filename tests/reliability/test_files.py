"""(5) Files: checkpoints load with weights_only semantics, crafted pickles are refused before
they run, recipes are safe YAML and can only name registered components."""

from __future__ import annotations

import os
import pickle

import re

import pytest
import torch

from amortize.checkpoints import (
    CorruptCheckpointError,
    UnsafeCheckpointError,
    atomic_save,
    is_complete,
    recover_latest,
    safe_load,
)
from amortize.train.config import RecipeError, load_recipe
from tests.reliability.common import DEFAULT_RECIPE


class _Payload:
    """Unpickling this calls ``os.system`` (what a malicious checkpoint would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def evil(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"state": {"model": {"w": torch.ones(2)}}, "x": _Payload(marker)}, path)
    return path, marker


def test_crafted_pickle_is_refused_and_nothing_runs(evil):
    path, marker = evil
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*evil\.pt.*system.*could run code"):
        safe_load(path)
    assert not marker.exists()
    assert isinstance(UnsafeCheckpointError("x"), pickle.UnpicklingError)


def test_eval_loader_refuses_crafted_pickle(evil):
    from amortize.cli import load_checkpoint

    path, marker = evil
    with pytest.raises(pickle.UnpicklingError, match="system"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_checkpoint_is_named_corrupt(tmp_path):
    path = tmp_path / "a.pt"
    atomic_save({"w": torch.arange(10_000.0)}, path)
    assert is_complete(path)
    path.write_bytes(path.read_bytes()[:-3000])
    assert not is_complete(path)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        safe_load(path)


def test_atomic_save_interrupted_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    atomic_save({"v": torch.tensor(1.0)}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the writer dies in the middle

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"v": torch.tensor(2.0)}, path)
    monkeypatch.undo()
    assert safe_load(path)["v"] == 1.0
    assert os.listdir(tmp_path) == ["model.pt"]  # no temporary left behind


def test_recover_latest_repoints_a_missing_or_partial_link(tmp_path):
    for b in (2, 4):
        atomic_save({"b": b}, tmp_path / f"ep0-ba{b}-rank0.pt")
    (tmp_path / "ep0-ba6-rank0.pt").write_bytes(b"PK\x03\x04 cut short")  # a pre-atomic partial write
    (tmp_path / ".tmp-99-ep0-ba8-rank0.pt").write_bytes(b"junk")
    os.symlink("ep0-ba6-rank0.pt", tmp_path / "latest-rank0.pt")
    newest = recover_latest(tmp_path)
    assert newest.name == "ep0-ba4-rank0.pt"
    assert os.readlink(tmp_path / "latest-rank0.pt") == "ep0-ba4-rank0.pt"
    assert (tmp_path / "ep0-ba6-rank0.pt.partial").exists() and (tmp_path / ".tmp-99-ep0-ba8-rank0.pt.partial").exists()
    os.remove(tmp_path / "latest-rank0.pt")  # killed between Composer's remove and symlink
    assert recover_latest(tmp_path).name == "ep0-ba4-rank0.pt" and (tmp_path / "latest-rank0.pt").is_symlink()


@pytest.mark.parametrize("tag", [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/new:subprocess.Popen [['touch', '{marker}']]",
    "!!python/name:os.system",
])
def test_recipe_yaml_cannot_construct_python_objects(tmp_path, tag):
    marker = tmp_path / "PWNED"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"run_name: {tag.format(marker=marker)}\n")
    with pytest.raises(RecipeError, match="invalid YAML.*python"):
        load_recipe(recipe)
    with pytest.raises(RecipeError, match="cannot parse the value"):
        load_recipe(DEFAULT_RECIPE, [f"run_name={tag.format(marker=marker)}"])
    assert not marker.exists()


def test_recipe_names_only_registered_components(tmp_path):
    from amortize.train.builders import build_composer_model

    with pytest.raises(RecipeError, match=r"optimizer: unknown optimizer 'torch\.optim\.SGD'.*adamw"):
        load_recipe(DEFAULT_RECIPE, ["model.name=tiny", "optimizer.name=torch.optim.SGD"])
    from amortize.estimators import ESTIMATORS

    builtin = ("amorlip_code", "amorlip_paper", "amortized", "exact_positive", "in_batch", "moving_average", "neuclip",
               "normalizer_network", "scent")
    assert set(builtin) <= set(ESTIMATORS.names())  # others a test registered may follow: the message lists all
    with pytest.raises(RecipeError, match="loss.estimator: unknown estimator 'os.system'; valid: "
                       + re.escape(", ".join(ESTIMATORS.names()))):
        load_recipe(DEFAULT_RECIPE, ["loss.estimator=os.system"])
    with pytest.raises(RecipeError, match=r"loss._target_: unknown option of loss; valid: objective, estimator, layout, rho, temperature, chunk_size$"):
        load_recipe(DEFAULT_RECIPE, ["loss._target_=builtins.eval"])
    with pytest.raises(RecipeError, match="data.name: unknown dataset 'pathlib.Path'; valid: shipped, synthetic"):
        load_recipe(DEFAULT_RECIPE, ["model.name=tiny", "data.name=pathlib.Path"])
    r = load_recipe(DEFAULT_RECIPE, ["model.name=os.system"])
    with pytest.raises(ValueError, match="os.system"):
        build_composer_model(r, num_samples=8)
