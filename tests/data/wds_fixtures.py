"""Helpers that write small img2dataset-style shards for the tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(seed: int, size: int = 16) -> bytes:
    """A small random RGB JPEG."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, start: int, n: int, *, bad: dict[int, str] | None = None,
                stats: bool = True) -> None:
    """Write n samples with keys start..start+n-1; ``bad`` maps ordinal -> 'image'|'caption'|'noimage'."""
    bad = bad or {}
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            key = f"{start + i:09d}"
            kind = bad.get(i)
            if kind != "noimage":
                add_file(tar, key + ".jpg", b"not a jpeg" if kind == "image" else jpeg_bytes(start + i))
            add_file(tar, key + ".txt", b"   " if kind == "caption" else f"caption number {start + i}".encode())
            add_file(tar, key + ".json", json.dumps({"key": key}).encode())
    if stats:
        path.with_name(path.stem + "_stats.json").write_text(json.dumps({"successes": n}))
