"""The weights export's one module: what is written is what every reader recognises and reads."""

import pytest
import torch

from amortize.checkpoints import CorruptCheckpointError, atomic_save
from amortize.weights_export import EXPORT_FORMAT, export_payload, is_weights_export, load_weights_export


def test_a_payload_round_trips_through_the_safe_loader(tmp_path):
    model = torch.nn.Linear(2, 3)
    loss_state = {"u": torch.full((4,), -float("inf")), "_extra_state": {"recipe": {}}}  # non-tensors are left out
    payload = export_payload({"method": "m"}, model.state_dict(), loss_state, epoch=2, batch=40)
    assert list(payload) == ["format", "recipe", "model", "loss_fn", "timestamp"]
    assert payload["format"] == EXPORT_FORMAT and payload["timestamp"] == {"epoch": 2, "batch": 40}
    assert list(payload["loss_fn"]) == ["u"]
    atomic_save(payload, tmp_path / "export.pt")
    back = load_weights_export(tmp_path / "export.pt")
    assert is_weights_export(back) and back["recipe"] == {"method": "m"}
    assert torch.equal(back["model"]["weight"], model.weight.detach())


def test_other_files_are_not_exports(tmp_path):
    assert is_weights_export({"format": "amortize-weights/2"})  # a later version of the same family
    for other in ({"state": {"model": {}}}, {"format": "open_clip"}, {"format": None}, [EXPORT_FORMAT], None):
        assert not is_weights_export(other)
    atomic_save({"state": {"model": {}}}, tmp_path / "composer.pt")
    with pytest.raises(CorruptCheckpointError, match="composer.pt is not an amortize weights export"):
        load_weights_export(tmp_path / "composer.pt")
