"""The preparation script reproduces the shipped arrays from the Debian packages."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "amortize" / "data" / "shipped"
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")


def _require(module):
    try:
        __import__(module)
    except ImportError:
        pytest.skip(f"python package {module!r} not installed (needed by scripts/prepare_data.py)")


@pytest.mark.skipif(not FASHION.exists() or not FONT.exists(),
                    reason="Debian packages dataset-fashion-mnist and fonts-noto-color-emoji not installed")
def test_prepare_reproduces_shipped(tmp_path):
    _require("emoji")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for name in ("fashion_mnist_train.npz", "fashion_mnist_test.npz", "emoji.npz"):
        with np.load(SHIPPED / name) as a, np.load(tmp_path / name) as b:
            assert sorted(a.files) == sorted(b.files), name
            for k in a.files:
                assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), f"{name}:{k} differs"
    for name in ("fashion_mnist.json", "emoji.json"):
        a = json.loads((SHIPPED / name).read_text())
        b = json.loads((tmp_path / name).read_text())
        assert a == b, f"{name} differs"
