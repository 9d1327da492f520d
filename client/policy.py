"""A data holder's own privacy policy and budget: it never trusts the coordinator's arithmetic."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fedsynth.protocol.durable import append_json_line
from fedsynth.protocol.errors import BudgetExceededError, ConfigError, PolicyViolationError
from fedsynth.protocol.manifest import PrivacySpec, TaskManifest


class PolicySubject(Protocol):
    """What a policy checks in any task manifest (dataset vector or PE round)."""

    @property
    def privacy(self) -> PrivacySpec:
        """The task's guarantee and noise."""
        ...

    @property
    def model_fingerprint(self) -> str:
        """Fingerprint of the model the client must run (generator or embedder)."""
        ...


@dataclass(frozen=True)
class ClientPolicy:
    """What a client agrees to; every manifest is checked against it before any computation.

    Attributes:
        max_epsilon_per_task: Largest epsilon one task may spend.
        max_total_epsilon: Lifetime budget over all tasks (basic composition).
        max_delta: Largest delta per task.
        min_threshold: Smallest reconstruction threshold t (fewest honest survivors) accepted.
        allowed_modes: Trust modes the holder accepts.
        allowed_fingerprints: Model fingerprints accepted (empty = the local model's only).
        allow_non_private: Whether epsilon = inf tasks (no noise) are accepted.
    """

    max_epsilon_per_task: float = 8.0
    max_total_epsilon: float = 50.0
    max_delta: float = 1e-4
    min_threshold: int = 2
    allowed_modes: tuple[str, ...] = ("distributed", "central", "local")
    allowed_fingerprints: tuple[str, ...] = ()
    allow_non_private: bool = False

    def __post_init__(self) -> None:
        if not self.max_epsilon_per_task > 0:
            raise ConfigError(f"max_epsilon_per_task={self.max_epsilon_per_task}: must be > 0")
        if not self.max_total_epsilon >= self.max_epsilon_per_task:
            raise ConfigError("max_total_epsilon must be >= max_epsilon_per_task")
        if self.min_threshold < 2:
            raise ConfigError(f"min_threshold={self.min_threshold}: must be >= 2")

    def check(self, manifest: PolicySubject, *, spent: float, n_records: int | None) -> None:
        """Refuse a manifest outside this policy, with a reason an operator can read."""
        p = manifest.privacy
        if p.mode not in self.allowed_modes:
            raise PolicyViolationError(
                f"mode={p.mode!r} is not among the allowed modes {list(self.allowed_modes)}"
            )
        if math.isinf(p.epsilon):
            if not self.allow_non_private:
                raise PolicyViolationError(
                    "epsilon=inf (non-private release) is refused by this client's policy"
                )
        elif p.epsilon > self.max_epsilon_per_task:
            raise PolicyViolationError(
                f"epsilon={p.epsilon} exceeds max_epsilon_per_task={self.max_epsilon_per_task}"
            )
        if p.delta > self.max_delta:
            raise PolicyViolationError(f"delta={p.delta} exceeds max_delta={self.max_delta}")
        if n_records is not None and p.delta >= 1.0 / max(n_records, 1):
            raise PolicyViolationError(
                f"delta={p.delta} must be below 1/n=1/{n_records} for this holder's data"
            )
        if p.threshold < self.min_threshold:
            raise PolicyViolationError(
                f"threshold t={p.threshold} is below min_threshold={self.min_threshold}"
            )
        if (
            self.allowed_fingerprints
            and manifest.model_fingerprint not in self.allowed_fingerprints
        ):
            raise PolicyViolationError(
                f"model_fingerprint={manifest.model_fingerprint} is not in allowed_fingerprints"
            )
        if not math.isinf(p.epsilon) and spent + p.epsilon > self.max_total_epsilon:
            raise BudgetExceededError(
                f"epsilon={p.epsilon} would bring the total to {spent + p.epsilon:.4g} > "
                f"max_total_epsilon={self.max_total_epsilon} (spent {spent:.4g})"
            )


class ClientBudget:
    """Persistent per-holder ledger of epsilon spent, one JSON line per task (crash safe)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def entries(self) -> list[dict[str, object]]:
        """All recorded spends."""
        if self.path is None or not self.path.exists():
            return []
        out: list[dict[str, object]] = []
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                # Fail safe: an unreadable row may be a spend; never guess it away.
                raise PolicyViolationError(
                    f"budget file {self.path} line {number} is unreadable (a torn write?); "
                    "repair it by hand before this holder takes part in new tasks"
                ) from None
        return out

    def spent(self) -> float:
        """Total finite epsilon spent so far (basic composition across tasks)."""
        total = 0.0
        for entry in self.entries():
            eps = float(str(entry["epsilon"]))
            if math.isfinite(eps):
                total += eps
        return total

    def has(self, task_id: str) -> bool:
        """Whether this task was already charged (a retried stage is not charged twice)."""
        return any(entry.get("task_id") == task_id for entry in self.entries())

    def charge(self, manifest: TaskManifest) -> None:
        """Record the spend before the contribution leaves this holder."""
        self.charge_task(manifest.task_id, manifest.privacy)

    def charge_task(self, task_id: str, privacy: PrivacySpec) -> None:
        """Record a task's whole spend once (a PE task is charged at its first round)."""
        if self.path is None or self.has(task_id):
            return
        row = {
            "task_id": task_id,
            "epsilon": str(privacy.epsilon),
            "delta": privacy.delta,
            "mode": privacy.mode,
        }
        append_json_line(self.path, row)

    def last_round(self, task_id: str) -> int:
        """The last PE round this holder answered for ``task_id`` (0: none)."""
        rounds = [
            int(str(e["round"]))
            for e in self.entries()
            if e.get("task_id") == task_id and "round" in e
        ]
        return max(rounds, default=0)

    def record_round(self, task_id: str, round_number: int) -> None:
        """Record that a PE round's votes left this holder (stale or replayed rounds refused)."""
        if self.path is None:
            return
        append_json_line(
            self.path,
            {"task_id": task_id, "round": round_number, "epsilon": "0", "kind": "pe-round"},
        )
