"""One writer per results folder: a second run on the same folder is refused, not interleaved.

Studies and curves resume from what their folder holds, so two runs on one folder would both
compute the same missing cells and append rows in turn (duplicated work, rows of two runs
mixed). An advisory ``fcntl`` lock on ``<folder>/.lock`` is held for the whole run; the
kernel drops it when the process ends, however it ends, so a crash never leaves the folder
locked. The file keeps the holder's pid and name for the error message only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from fedsynth.protocol.errors import FolderInUseError

LOCK_NAME = ".lock"


@contextlib.contextmanager
def exclusive_folder(folder: Path, what: str) -> Iterator[None]:
    """Hold ``folder``'s lock for the block; refuse at once if another process holds it.

    Raises:
        FolderInUseError: naming the folder and the other run's name and pid.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, holder = os.pread(fd, 256, 0).decode(errors="replace").strip().partition(" ")
            raise FolderInUseError(
                f"{folder} is in use by {holder or 'another run'} (pid {pid or 'unknown'}); "
                f"wait for it to finish or give this {what} another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {what}\n".encode(), 0)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
