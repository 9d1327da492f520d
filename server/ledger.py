"""The coordinator's privacy ledger: one JSON line per release, appended with fsync.

A release is recorded only after its file is safely on disk; the ledger is read back to enforce
the coordinator's lifetime budget before any new round starts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedsynth.protocol.durable import append_json_line
from fedsynth.protocol.errors import BudgetExceededError


class PrivacyLedger:
    """Append-only record of releases and the epsilon each spent."""

    def __init__(self, path: Path, *, max_total_epsilon: float = math.inf) -> None:
        self.path = path
        self.max_total_epsilon = max_total_epsilon

    def rows(self) -> list[dict[str, Any]]:
        """All recorded releases (a torn last line from a crash is ignored)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def spent(self) -> float:
        """Sum of the finite epsilons recorded (basic composition across releases)."""
        return sum(float(r["epsilon"]) for r in self.rows() if math.isfinite(float(r["epsilon"])))

    def check(self, epsilon: float) -> None:
        """Refuse a new task that would exceed the coordinator's budget."""
        if math.isfinite(epsilon) and self.spent() + epsilon > self.max_total_epsilon:
            raise BudgetExceededError(
                f"epsilon={epsilon} would bring the ledger to {self.spent() + epsilon:.4g} > "
                f"max_total_epsilon={self.max_total_epsilon}"
            )

    def record(self, report: dict[str, Any], *, release_path: Path) -> None:
        """Append one row for a release already saved at ``release_path``."""
        row = {
            "task_id": report["task_id"],
            "epsilon": str(report["epsilon"]),
            "delta": report["delta"],
            "trust_mode": report["trust_mode"],
            "survivors": report["survivors"],
            "release": str(release_path),
        }
        append_json_line(self.path, row)
