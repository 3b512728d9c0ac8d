"""One run per save folder: a lock file that ``amortize train`` holds while it trains.

Rank 0 creates ``<save_folder>/.amortize-lock`` (JSON: pid, host, start time) before the run
decides how to start, and removes it when the command ends, whatever the ending (finished,
refused, SIGTERM or Ctrl-C saved and stopped, an error). A second run into the folder while the
first lives is refused, naming the folder and the other run's pid and host. A lock whose process
is gone (a run killed with SIGKILL, a machine that rebooted) is taken over, with a line saying so,
when it was written on this host; a lock of another host cannot be checked from here and is
refused with the way out (delete it once that run is gone).

``amortize train --dry-run`` reads the lock and refuses the same way, and writes nothing.

This module does not import Composer.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from amortize.options import RecipeError

__all__ = ["LOCK_NAME", "RunLock", "acquire_run_lock", "check_run_lock", "pid_alive"]

LOCK_NAME = ".amortize-lock"
"""The lock file's name inside the save folder."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie, exited but not yet reaped, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS): kill(0) said it exists
        return True


def _read(path: Path) -> Optional[dict]:
    """The lock's content, None when there is no lock; a lock that is not ours to parse reads as stale."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        held = json.loads(text)
        return {"pid": int(held["pid"]), "host": str(held["host"]), "started": str(held.get("started", "?"))}
    except (ValueError, KeyError, TypeError):
        return {"pid": -1, "host": socket.gethostname(), "started": "?"}


def check_run_lock(folder: str) -> Optional[str]:
    """Refuse a save folder another live run holds; say when its lock is stale (nothing is written).

    Returns:
        None when the folder has no lock (or this process holds it), else the line saying which
        stale lock would be taken over.

    Raises:
        RecipeError: ``save_folder: runs/x is in use by another run (pid 123 on host h, started ...)``.
    """
    path = Path(folder or ".") / LOCK_NAME
    held = _read(path)
    if held is None:
        return None
    here = socket.gethostname()
    who = f"pid {held['pid']} on host {held['host']}, started {held['started']}"
    if held["host"] == here and held["pid"] == os.getpid():
        return None
    if held["host"] != here:
        raise RecipeError(f"{folder or '.'} is in use by another run ({who}; it cannot be checked from {here}); wait "
                          f"for it, train elsewhere with run_name=NEW or save_folder=DIR, or delete {path} if that run "
                          "is gone", key="save_folder")
    if pid_alive(held["pid"]):
        raise RecipeError(f"{folder or '.'} is in use by another run ({who}), which is still running; wait for it "
                          "or stop it, or train elsewhere with run_name=NEW or save_folder=DIR", key="save_folder")
    return f"taking over the lock of {path}: its run ({who}) is no longer running"


@dataclass
class RunLock:
    """The lock this process holds on a save folder.

    Attributes:
        path: the lock file.
        created_folder: the folder was made for the lock (removed again on release when left empty).
        note: the line saying a stale lock was taken over (None: there was none).
    """

    path: Path
    created_folder: bool = False
    note: Optional[str] = None

    def release(self) -> None:
        """Remove the lock if it is still this process's (and the folder, if it was made for it and is empty)."""
        held = _read(self.path)
        if held is not None and held["pid"] == os.getpid() and held["host"] == socket.gethostname():
            self.path.unlink(missing_ok=True)
        if self.created_folder:
            try:
                self.path.parent.rmdir()
            except OSError:  # the run wrote files there: keep them
                pass


def acquire_run_lock(folder: str) -> RunLock:
    """Take the lock of ``folder`` for this process (see the module docstring).

    Raises:
        RecipeError: when another live run holds it (see :func:`check_run_lock`), or when another
            run took the folder's lock between the check and the write.
    """
    note = check_run_lock(folder)
    target = Path(folder or ".")
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    path = target / LOCK_NAME
    body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n"
    held = _read(path)
    if note is not None or (held is not None and held["pid"] == os.getpid()):  # stale, or this process's own
        path.unlink(missing_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:  # another run took it in the meantime
        check_run_lock(folder)
        raise RecipeError(f"{folder or '.'} was just locked by another run; train elsewhere with run_name=NEW or "
                          "save_folder=DIR", key="save_folder") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(body)
    return RunLock(path, created_folder=created, note=note)
