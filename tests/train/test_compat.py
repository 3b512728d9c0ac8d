"""The private APIs amortize.train.compat relies on are still there, shaped as assumed.

If the pinned Composer or torch changes underneath the workarounds, these fail by name instead of
letting checkpoints become non-atomic or DDP broadcast the estimator's tables silently.
"""

from __future__ import annotations

import inspect

import composer
import torch
from composer.utils import checkpoint as ck
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from amortize.checkpoints import safe_load
from amortize.train import compat


def test_composer_is_the_pinned_release():
    assert composer.__version__ == compat.PINNED_COMPOSER, (
        f"Composer {composer.__version__} is installed but amortize.train.compat was written against "
        f"{compat.PINNED_COMPOSER}: re-check its workarounds before changing the pin"
    )


def test_composer_checkpoint_writer_has_the_wrapped_signature():
    params = list(inspect.signature(ck._write_checkpoint_file).parameters)
    assert params[:2] == ["state_dict", "filename"], params


def test_atomic_checkpoint_writes_are_installed_once_and_write_whole_files(tmp_path):
    compat.install_atomic_checkpoint_writes()
    first = ck._write_checkpoint_file
    compat.install_atomic_checkpoint_writes()
    assert ck._write_checkpoint_file is first and getattr(first, "_amortize_atomic", False)
    target = tmp_path / "ep0-ba1-rank0.pt"
    ck._write_checkpoint_file({"state": {"x": torch.ones(2)}}, str(target))
    assert torch.equal(safe_load(target)["state"]["x"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temporary left


def test_ddp_reads_the_ignore_attribute():
    """torch's DDP still takes the list of names to leave alone from the wrapped module."""
    src = inspect.getsource(DistributedDataParallel)
    assert "_ddp_params_and_buffers_to_ignore" in src
    m = nn.Linear(2, 2)
    m.register_buffer("table", torch.zeros(3))
    compat.ddp_ignore(m, ["table"])
    assert m._ddp_params_and_buffers_to_ignore == ["table"]
