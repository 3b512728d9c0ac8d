"""Safe checkpoint files: loading that never runs code, writes that never leave a partial file.

* :func:`safe_load` reads a checkpoint with ``torch.load(..., weights_only=True)`` and a short,
  explicit list of extra data types (:func:`checkpoint_safe_globals`). A pickle that names any
  other callable (``os.system``, ``builtins.exec``, a ``__reduce__`` payload) is refused with
  :class:`UnsafeCheckpointError` *before* anything is called.
* :func:`atomic_save` writes to a temporary file in the target's folder, flushes it to disk and
  renames it over the target (``os.replace``), so a process killed mid-write leaves the old file
  or the new one, never a truncated one. :func:`atomic_symlink` does the same for links.
* :func:`is_complete` tells a whole checkpoint from a truncated one without unpickling it, and
  :func:`recover_latest` repairs a run folder after a crash: it points the ``latest`` link at the
  newest complete checkpoint and moves partial files aside.

This module imports neither Composer nor open_clip.

>>> import tempfile, os, torch
>>> d = tempfile.mkdtemp()
>>> atomic_save({"w": torch.ones(2)}, os.path.join(d, "a.pt"))
>>> safe_load(os.path.join(d, "a.pt"))["w"]
tensor([1., 1.])
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

__all__ = [
    "UnsafeCheckpointError",
    "CorruptCheckpointError",
    "CheckpointWriteError",
    "checkpoint_safe_globals",
    "safe_load",
    "atomic_path",
    "atomic_save",
    "atomic_symlink",
    "is_complete",
    "recover_latest",
    "filename_regex",
]

PathLike = Union[str, os.PathLike]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint asks to import or call something outside the allowed data types.

    Subclasses :class:`pickle.UnpicklingError`, so code that catches torch's own refusal keeps working.
    """


class CheckpointWriteError(OSError):
    """Writing a checkpoint or export failed (disk full, read-only or vanished folder); the
    message names the file and says that the previous file, if any, is unchanged."""


def _write_failure(e: BaseException) -> Optional[BaseException]:
    """The exception that says why a write failed, or None when ``e`` is not a write failure.

    An ``OSError`` or torch's ``RuntimeError: ... file write failed`` is one; so is a ``RuntimeError``
    raised while handling an ``OSError``: on a real full disk ``torch.save``'s zip writer hits ``OSError:
    [Errno 28] No space left on device`` and its ``__exit__`` then raises ``RuntimeError: [enforce
    fail at inline_container.cc:...] unexpected pos ...``, which names neither the disk nor a write.
    The ``OSError`` of the chain (``__cause__`` / ``__context__``) is returned then.
    """
    seen: set[int] = set()
    chain: list[BaseException] = []
    cur: Optional[BaseException] = e
    while cur is not None and id(cur) not in seen and len(chain) < 16:
        seen.add(id(cur))
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    if isinstance(e, CheckpointWriteError) or not isinstance(e, (OSError, RuntimeError)):
        return None
    for x in chain:
        if isinstance(x, OSError) and not isinstance(x, CheckpointWriteError):
            return x
    if isinstance(e, RuntimeError) and "write" in str(e).lower():
        return e
    return None


class CorruptCheckpointError(ValueError):
    """A checkpoint file is truncated or is not a torch checkpoint at all."""


def checkpoint_safe_globals() -> list:
    """The data types a Composer checkpoint holds beyond tensors and plain Python.

    Composer stores its timestamp's wall-clock times as :class:`datetime.timedelta`, the torch
    version as ``TorchVersion`` and the RNG states as numpy arrays; nothing here is a function
    that does work when called by the unpickler.

    Returns:
        Classes and reconstructors to pass to ``torch.serialization.safe_globals``.
    """
    import numpy as np
    import torch

    out: list = [datetime.timedelta, torch.torch_version.TorchVersion, np.ndarray, np.dtype]
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    out.append(_reconstruct)
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        names = ("UInt32DType", "Int64DType", "Int32DType", "Float64DType", "Float32DType", "UInt8DType", "BoolDType")
        out += [getattr(dtypes, n) for n in names if hasattr(dtypes, n)]
    return out


def is_complete(path: PathLike) -> bool:
    """Whether ``path`` is a whole torch checkpoint (zip format) rather than a truncated one.

    Reads only the zip directory at the end of the file and checks that it lists a pickle and
    that every member's data lies inside the file; nothing is unpickled. A file cut short by a
    killed writer loses its directory and fails.

    Args:
        path: the file (a link is followed).

    Returns:
        True for a complete zip-format checkpoint, False otherwise (missing, truncated, other format).
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with zipfile.ZipFile(p) as zf:
            infos = zf.infolist()
            if not any(i.filename.endswith("data.pkl") for i in infos):
                return False
            return all(i.header_offset + i.compress_size <= size for i in infos)
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def safe_load(path: PathLike, *, map_location: Any = "cpu", extra_globals: Iterable[Any] = ()) -> Any:
    """Load a checkpoint with ``weights_only`` semantics: tensors, plain Python and the allowed types.

    Args:
        path: the checkpoint file.
        map_location: passed to ``torch.load`` (default: CPU).
        extra_globals: more classes to allow, on top of :func:`checkpoint_safe_globals`.

    Returns:
        The unpickled object.

    Raises:
        FileNotFoundError: if nothing is at ``path``.
        UnsafeCheckpointError: if the file names a callable or class outside the allowed list
            (the message names it); nothing from the file has been called.
        CorruptCheckpointError: if the file is truncated or not a torch checkpoint.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    allowed = checkpoint_safe_globals() + list(extra_globals)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        match = re.search(r"(?:GLOBAL|[Uu]nsupported global:?) ?(?:GLOBAL )?([\w.]+)", text)
        if match is None and not is_complete(p):
            raise CorruptCheckpointError(f"{p} is truncated or not a torch checkpoint ({e})") from None
        what = match.group(1) if match else "a global outside the allowed list"
        raise UnsafeCheckpointError(
            f"refusing to load {p}: it asks the unpickler for {what}, which is not one of the allowed "
            "data types (tensors, plain Python, timedelta, numpy arrays). Loading it could run code; "
            "if you wrote this file yourself and trust it, convert it with a trusted script."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, KeyError, IndexError, ValueError) as e:
        if is_complete(p):
            raise
        raise CorruptCheckpointError(f"{p} is truncated or not a torch checkpoint ({type(e).__name__}: {e})") from None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it is ``fsync``-ed and renamed over ``path``.

    The one atomic writer of the package: whatever is written to the yielded path (by
    :func:`atomic_save`, by Composer's checkpoint writer, ...) replaces ``path`` with
    ``os.replace`` only once complete, so readers see the old file or the new one. On an
    exception the temporary file is removed; a killed writer leaves at most a ``.<name>.tmp-*``
    file, which :func:`recover_latest` moves aside. The temporary name ends like ``path``, so
    writers that choose a format by extension behave the same.

    Args:
        path: the destination.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", suffix=dest.suffix, dir=dest.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        why = _write_failure(e)
        if why is not None:
            kept = f"the previous {dest.name} is unchanged" if dest.exists() else f"no {dest.name} was written"
            reason = (str(why).strip().splitlines() or [type(why).__name__])[-1]
            raise CheckpointWriteError(f"could not write {dest}: {reason} ({kept}); free space or "
                                       "choose another save_folder") from e
        raise
    _fsync_dir(dest.parent)


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)`` that a kill cannot leave half-written (see :func:`atomic_path`).

    Args:
        obj: what to save (keep it to tensors and plain Python so :func:`safe_load` reads it).
        path: the destination.
    """
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def atomic_symlink(target: PathLike, link: PathLike) -> None:
    """Create or re-point the symbolic link ``link -> target`` in one rename.

    Unlike removing the old link and creating a new one, there is no moment when ``link`` is missing.

    Args:
        target: what the link points to (stored as given; pass a relative name for a movable folder).
        link: the link's path.
    """
    link = Path(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    os.symlink(os.fspath(target), tmp)
    os.replace(tmp, link)
    _fsync_dir(link.parent)


def _batch_of(name: str) -> Optional[int]:
    m = re.search(r"ba(\d+)", name)
    return int(m.group(1)) if m else None


def recover_latest(
    folder: PathLike,
    latest_name: str = "latest-rank0.pt",
    pattern: str = r"ep\d+-ba\d+-rank0\.pt",
) -> Optional[Path]:
    """Repair a run folder after a crash so that autoresume finds the newest complete checkpoint.

    * A checkpoint matching ``pattern`` that is incomplete (see :func:`is_complete`) is renamed
      to ``<name>.partial`` (kept for inspection, ignored by Composer), as are leftover ``.tmp-*``
      files of :func:`atomic_save`.
    * ``latest_name`` is (re-)pointed, atomically, at the complete checkpoint with the highest
      batch count (``ba<N>`` in its name; modification time breaks ties) when it is missing,
      dangling, or points at an incomplete or older file.

    Args:
        folder: the run's ``save_folder``.
        latest_name: the latest link's file name (Composer's ``save_latest_filename`` for this rank).
        pattern: regular expression of this rank's checkpoint file names.

    Returns:
        The checkpoint ``latest_name`` now points to, or None if the folder holds no complete one.
    """
    root = Path(folder)
    if not root.is_dir():
        return None
    rx = re.compile(pattern)
    complete: list[Path] = []
    for p in sorted(root.iterdir()):
        if p.is_symlink() or not p.is_file():
            continue
        if ".tmp-" in p.name and not p.name.endswith(".partial"):
            p.rename(p.with_name(p.name + ".partial"))
        elif rx.fullmatch(p.name):
            if is_complete(p):
                complete.append(p)
            else:
                p.rename(p.with_name(p.name + ".partial"))
    if not complete:
        return None
    newest = max(complete, key=lambda p: (_batch_of(p.name) or -1, p.stat().st_mtime))
    link = root / latest_name
    current = link.resolve() if link.is_symlink() or link.exists() else None
    if current is None or not current.is_file() or current != newest.resolve():
        atomic_symlink(newest.name, link)
    return newest



def filename_regex(template: str, rank: int = 0) -> str:
    """A regular expression matching the file names a Composer name template produces for one rank.

    >>> import re
    >>> bool(re.fullmatch(filename_regex("ep{epoch}-ba{batch}-rank{rank}.pt"), "ep3-ba120-rank0.pt"))
    True

    Args:
        template: e.g. ``ep{epoch}-ba{batch}-rank{rank}.pt`` (Composer's ``save_filename``).
        rank: the global rank to match; every other ``{field}`` matches digits.

    Returns:
        The pattern, for ``re.fullmatch`` on bare file names.
    """
    parts = re.split(r"\{(\w+)\}", template)
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out.append(re.escape(part))
        else:
            out.append(str(int(rank)) if part == "rank" else r"\d+")
    return "".join(out)
