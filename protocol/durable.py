"""Crash-safe append of one JSON row to a ledger file (used by both budget ledgers)."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any


def append_json_line(path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` as one JSON line under an exclusive lock, then fsync.

    After a crash mid-write the file may end in a torn line; the new row starts on a fresh
    line so it is never glued to (and lost with) the torn one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if handle.seek(0, os.SEEK_END) > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    handle.write(b"\n")
            handle.write((json.dumps(row) + "\n").encode())
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
