"""Run ``flwr run --stream`` and tell whether the run really completed.

``flwr run --stream`` exits with status 0 once the log stream ends, also when the ServerApp
raised (Flower reports that only in the streamed log, as "Exit Code: 201"). The operator's
``fedsynth task run`` must not say "release and ledger row" then, so the output is passed
through line by line, the run id is read from it, and the run's final status is asked of the
SuperLink (``flwr ls --run-id ID --format json``) once the stream ends.

Parsing is pure (:func:`run_id_from_line`, :func:`status_from_ls`); the process handling is at
the bottom.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TextIO

__all__ = ["FlwrRun", "run_id_from_line", "run_streaming", "status_from_ls"]

COMPLETED: Final = "finished:completed"
_STARTED = re.compile(r"Successfully started run (\d+)")
STATUS_WAIT_S: Final = 30.0  # how long a just-ended stream may take to show a final status


def run_id_from_line(line: str) -> int | None:
    """The run id in ``flwr run``'s "Successfully started run N" line, else None."""
    found = _STARTED.search(line)
    return int(found.group(1)) if found else None


def status_from_ls(output: str, run_id: int) -> tuple[str, str] | None:
    """(status, details) of ``run_id`` in ``flwr ls --format json`` output, else None."""
    start = output.find("{")
    if start < 0:
        return None
    try:
        data = json.loads(output[start:])
    except json.JSONDecodeError:
        return None
    runs = data.get("runs") if isinstance(data, dict) else None
    for run in runs if isinstance(runs, list) else []:
        if isinstance(run, dict) and str(run.get("run-id")) == str(run_id):
            return str(run.get("status", "")), str(run.get("status-details", ""))
    return None


@dataclass(frozen=True)
class FlwrRun:
    """How a streamed ``flwr run`` ended.

    Attributes:
        returncode: ``flwr run``'s exit status.
        run_id: The run it started (None: it never started one).
        status: The run's final status at the SuperLink (``finished:completed`` when it
            succeeded); '' when it could not be read.
        details: Flower's status details (the reason of a failed run).
    """

    returncode: int
    run_id: int | None
    status: str
    details: str

    @property
    def completed(self) -> bool:
        """Whether the run started, streamed to its end and completed."""
        return self.returncode == 0 and self.run_id is not None and self.status == COMPLETED


def run_streaming(
    command: Sequence[str],
    *,
    flwr: str,
    federation: str | None,
    env: Mapping[str, str] | None = None,
    out: TextIO = sys.stdout,
) -> FlwrRun:
    """Run ``command`` (a ``flwr run --stream``), copy its output to ``out``, read the status."""
    run_id: int | None = None
    with subprocess.Popen(
        list(command),
        env=None if env is None else dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as proc:
        assert proc.stdout is not None  # stdout=PIPE
        for line in proc.stdout:
            out.write(line)
            out.flush()
            if run_id is None:
                run_id = run_id_from_line(line)
    code = proc.returncode
    if run_id is None:
        return FlwrRun(code, None, "", "")
    status, details = _final_status(flwr, federation, run_id, env)
    return FlwrRun(code, run_id, status, details)


def _final_status(
    flwr: str, federation: str | None, run_id: int, env: Mapping[str, str] | None
) -> tuple[str, str]:
    """Ask the SuperLink until the run shows a ``finished:*`` status (or the wait is over)."""
    command = [flwr, "ls", *([federation] if federation else []), "--run-id", str(run_id)]
    deadline = time.monotonic() + STATUS_WAIT_S
    found: tuple[str, str] | None = None
    while True:
        proc = subprocess.run(
            [*command, "--format", "json"],
            env=None if env is None else dict(env),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        found = status_from_ls(proc.stdout, run_id) or found
        if (found and found[0].startswith("finished")) or time.monotonic() > deadline:
            return found or ("", "")
        time.sleep(1.0)
