"""The small-batch benchmark's data builder and one training step of every method (default suite)."""

import math

import pytest
import torch

from studies import small_batch as sb


@pytest.fixture(scope="module")
def data():
    return sb.build_data(0, train_composites=300, eval_composites=60)


def test_composites_are_deterministic_in_the_seed(data):
    again = sb.build_data(0, train_composites=300, eval_composites=60)
    other = sb.build_data(1, train_composites=300, eval_composites=60)
    for name in ("train", "val", "test"):
        assert torch.equal(data.splits[name].tiles, again.splits[name].tiles)
        assert data.splits[name].captions == again.splits[name].captions
        assert torch.equal(data.splits[name].tokens, again.splits[name].tokens)
    assert data.splits["train"].captions != other.splits["train"].captions


def test_captions_are_unique_and_splits_disjoint(data):
    caps = {k: s.captions for k, s in data.splits.items()}
    everything = caps["train"] + caps["val"] + caps["test"]
    assert len(set(everything)) == len(everything)  # no caption repeats, within or across splits
    tiles = {k: set(s.tiles[s.tiles >= 0].tolist()) for k, s in data.splits.items()}
    assert not tiles["train"] & tiles["val"] and not tiles["train"] & tiles["test"] and not tiles["val"] & tiles["test"]
    for name, s in data.splits.items():
        n = (s.tiles >= 0).sum(1)
        assert n.min() == 1 and n.max() == sb.MAX_TILES, name  # single emoji and composites of up to 4
        assert (n > 1).sum() == (300 if name == "train" else 60)
        # the first tile of every row is an emoji (< number of emoji), at least one per composite
        assert bool((s.tiles[:, 0] >= 0).all())
    assert "side by side" in caps["test"][-1]


@pytest.mark.parametrize("method", sb.METHODS)
def test_one_training_step_of_every_method(data, method):
    row = sb.train_run(sb.RunConfig(method, 16, 0, epochs=1, split="val", max_steps=1), data)
    assert row["steps"] == 1
    assert 0.0 <= row["mean_R@1"] <= 1.0
    assert math.isfinite(row["wall_s"]) and row["lr"] == pytest.approx(sb.encoder_lr(16))
    if method in ("sogclr", "fastclip", "amorlip"):
        assert math.isfinite(row["estimator_rmse"]) and math.isfinite(row["in_batch_rmse"])


def test_variance_blend_variant_steps(data):
    row = sb.train_run(sb.RunConfig("amorlip", 16, 0, epochs=1, split="val", max_steps=2,
                                    amorlip={"estimator": "variance_blend"}), data)
    assert 0.0 <= row["blend_weight"] <= 1.0


def test_in_batch_log_variance_by_hand():
    # one row, negatives with scores log 1 and log 3 (s = 1, features chosen to give them):
    # e = (1, 3): mean 2, mean square 5, relative variance 5/4 - 1 = 1/4, over n = 2 -> 1/8
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 0.0], [math.log(3.0), 0.0]])
    vx, _ = sb.in_batch_log_rel_var(x, y, scale=1.0)
    assert vx[0].item() == pytest.approx(1 / 8, rel=1e-5)
    # equal scores: no variance
    vx, vy = sb.in_batch_log_rel_var(torch.ones(4, 2), torch.ones(4, 2), scale=5.0)
    assert torch.allclose(vx, torch.zeros(4), atol=1e-6) and torch.allclose(vy, torch.zeros(4), atol=1e-6)


def test_gap_recovered_worked_by_hand():
    rows = [{"tag": t, "batch": b, "seed": s, "mean_R@1": v} for t, b, s, v in [
        ("clip", 16, 0, 0.20), ("clip", 256, 0, 0.30), ("clip", 16, 1, 0.22), ("clip", 256, 1, 0.30),
        ("amorlip", 16, 0, 0.25), ("amorlip", 16, 1, 0.26)]]
    cell = next(c for c in sb.summarise(rows)["cells"] if c["tag"] == "amorlip")
    # seed 0: (0.25 - 0.20) / (0.30 - 0.20) = 0.5; seed 1: (0.26 - 0.22) / (0.30 - 0.22) = 0.5
    assert cell["gap_recovered"] == pytest.approx(0.5) and cell["gap_recovered_sd"] == pytest.approx(0.0, abs=1e-12)
    assert cell["minus_clip"] == pytest.approx(0.045)


def test_the_keys_of_the_recorded_runs_are_derived_again():
    """A run's key is what finds its row (resume): every row of the study's results re-derives it."""
    import json

    n = 0
    for path in sorted(sb.OUT.glob("*.runs.jsonl")):
        if not path.name.startswith(("small_batch", "amorlip_study")):
            continue
        for line in path.read_text().splitlines():
            row = json.loads(line)
            tag, method, batch, seed, epochs, split, lr, amorlip, data_seed = json.loads(row["key"])
            cfg = sb.RunConfig(method, batch, seed, epochs=epochs, split=split, lr=lr, amorlip=amorlip,
                               data_seed=data_seed, tag="" if tag == method else tag)
            assert sb._key(cfg) == row["key"], path.name
            n += 1
    assert n > 50
