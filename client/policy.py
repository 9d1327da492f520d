"""A data holder's own privacy policy and budget: it never trusts the coordinator's arithmetic."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Protocol

from fedsynth.client.budget import ClientBudget as ClientBudget
from fedsynth.protocol.errors import BudgetExceededError, ConfigError, PolicyViolationError
from fedsynth.protocol.manifest import PrivacySpec

log = logging.getLogger(__name__)

REPLY_MARGIN_S = 10.0
"""Room a stage deadline must leave beyond a holder's fixed masked-input reply time (transport,
clock skew): a tighter deadline would drop the holder at every round."""


def parse_bool(key: str, value: object) -> bool:
    """A boolean setting, strictly: a bool, or "true"/"false" in any case; nothing else.

    ``bool("false")`` is True, so a loose parse would turn an operator's explicit "no" into
    consent; any other value is refused with the key and the value.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(f"{key}={value!r}: must be true or false")


def parse_float(key: str, value: object) -> float:
    """A numeric setting (an int, a float or its text); anything else is refused by key."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: must be a number")
    try:
        return float(str(value))
    except ValueError:
        raise ConfigError(f"{key}={value!r}: must be a number") from None


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

    @property
    def node_ids(self) -> tuple[int, ...]:
        """The task's participants (K of them)."""
        ...

    @property
    def max_records(self) -> int:
        """The most records per holder the task's field range holds."""
        ...

    @property
    def deadline_s(self) -> float:
        """The secure sum's per-stage deadline."""
        ...


@dataclass(frozen=True)
class ClientPolicy:
    """What a client agrees to; every manifest is checked against it before any computation.

    Attributes:
        max_epsilon_per_task: Largest epsilon one task may spend.
        max_total_epsilon: Lifetime budget over all tasks (basic composition).
        max_delta: Largest delta per task.
        max_total_delta: Lifetime cap on the deltas of all tasks of finite epsilon (basic
            composition adds them up as it adds the epsilons).
        min_threshold: Smallest reconstruction threshold t (fewest honest survivors) accepted.
        allowed_modes: Trust modes the holder accepts. ``central`` (the coordinator sees the
            noise-free sum and is trusted to add the noise) only when the holder lists it.
        allowed_fingerprints: Model fingerprints accepted (empty = the local model's only).
        allow_non_private: Whether epsilon = inf tasks (no noise) are accepted.
        max_colluders: Holders this holder assumes may collude with the coordinator; the
            secure sum's threshold must satisfy 2t - K > max_colluders (0: a strict majority),
            and a distributed task's noise must be sized for at least as many colluders
            (their shares may be missing).
        min_holders: Fewest participants K a task may have (a sum over few holders reveals
            more about each one's data to the others), fewest holders that must have
            exchanged keys before this holder's masked input leaves, and fewest survivors
            whose sum it signs and unmasks.
        max_records: Most records this holder contributes to any task, a public cap of its
            own. A task must allow at least as many (its field range must hold a full
            contribution); a data file with more is refused for every task alike. Comparing
            the file with the task's cap instead would let a coordinator find the file's exact
            size by moving that cap over a few free setups.
        masked_input_reply_s: Seconds after a masked-input request arrives before this holder
            answers it, whatever it computed (0: at once). Set above the holder's longest
            computation on its records, the reply's time no longer tells a coordinator how
            many records carry the task's labels; a task whose stage deadline leaves less than
            :data:`REPLY_MARGIN_S` beyond it is refused.
    """

    max_epsilon_per_task: float = 8.0
    max_total_epsilon: float = 50.0
    max_delta: float = 1e-4
    max_total_delta: float = 1e-3
    min_threshold: int = 2
    allowed_modes: tuple[str, ...] = ("distributed", "local")
    allowed_fingerprints: tuple[str, ...] = ()
    allow_non_private: bool = False
    max_colluders: int = 0
    min_holders: int = 2
    max_records: int = 1_000_000
    masked_input_reply_s: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.allow_non_private, bool):
            raise ConfigError(
                f"allow_non_private={self.allow_non_private!r}: must be a bool (True or False)"
            )
        if not self.max_epsilon_per_task > 0:
            raise ConfigError(f"max_epsilon_per_task={self.max_epsilon_per_task}: must be > 0")
        if not self.max_total_epsilon >= self.max_epsilon_per_task:
            raise ConfigError("max_total_epsilon must be >= max_epsilon_per_task")
        if not self.max_delta <= self.max_total_delta < 1:
            raise ConfigError(
                f"max_total_delta={self.max_total_delta}: must be >= max_delta="
                f"{self.max_delta} and < 1"
            )
        if self.min_threshold < 2:
            raise ConfigError(f"min_threshold={self.min_threshold}: must be >= 2")
        if (
            isinstance(self.max_colluders, bool)
            or not isinstance(self.max_colluders, int)
            or self.max_colluders < 0
        ):
            raise ConfigError(f"max_colluders={self.max_colluders!r}: must be an int >= 0")
        if (
            isinstance(self.min_holders, bool)
            or not isinstance(self.min_holders, int)
            or self.min_holders < 2
        ):
            raise ConfigError(f"min_holders={self.min_holders!r}: must be an int >= 2")
        if (
            isinstance(self.max_records, bool)
            or not isinstance(self.max_records, int)
            or self.max_records < 1
        ):
            raise ConfigError(f"max_records={self.max_records!r}: must be an int >= 1")
        reply = self.masked_input_reply_s
        if (
            isinstance(reply, bool)
            or not isinstance(reply, int | float)
            or not math.isfinite(reply)
            or reply < 0
        ):
            raise ConfigError(
                f"masked_input_reply_s={reply!r}: must be a finite number of seconds >= 0"
            )

    def check_records(self, n_records: int) -> None:
        """Refuse a data file with more records than this holder's own ``max_records``.

        The cap is the holder's (a task must allow at least as many, :meth:`check`), so the
        answer is the same for every task; the count stays in the holder's own log (the
        coordinator learns only the refusal's category).
        """
        if n_records > self.max_records:
            raise PolicyViolationError(
                f"{n_records} records exceed this holder's max_records={self.max_records}"
            )

    def check(
        self,
        manifest: PolicySubject,
        *,
        spent: float,
        n_records: int | None,
        spent_delta: float = 0.0,
    ) -> None:
        """Refuse a manifest outside this policy, with a reason an operator can read.

        Every refusal depends on the task's terms and this holder's own settings and spending
        only, never on its data (``n_records`` only feeds a local warning about delta).
        """
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
        if manifest.max_records < self.max_records:
            raise PolicyViolationError(
                f"the task's max_records={manifest.max_records} is below this holder's "
                f"max_records={self.max_records}"
            )
        if n_records is not None and p.delta >= 1.0 / max(n_records, 1):
            # Only the holder's log says so: a refusal that depends on the private record
            # count would tell the coordinator about it (max_delta is the refusing term).
            log.warning(
                "delta=%s is not below 1/n=1/%s for this holder's data; lower max_delta in the "
                "policy to refuse such tasks",
                p.delta,
                n_records,
            )
        noisy = math.isfinite(p.epsilon)
        if p.mode == "distributed" and noisy and p.colluders < self.max_colluders:
            raise PolicyViolationError(
                f"colluders={p.colluders}: the task's noise shares assume fewer colluding "
                f"holders than this holder's max_colluders={self.max_colluders} (their "
                "missing noise would leave the sum below the target)"
            )
        if p.threshold < self.min_threshold:
            raise PolicyViolationError(
                f"threshold t={p.threshold} is below min_threshold={self.min_threshold}"
            )
        if len(manifest.node_ids) < self.min_holders:
            raise PolicyViolationError(
                f"K={len(manifest.node_ids)} participants is below min_holders={self.min_holders}"
            )
        if self.masked_input_reply_s and (
            manifest.deadline_s < self.masked_input_reply_s + REPLY_MARGIN_S
        ):
            raise PolicyViolationError(
                f"deadline_s={manifest.deadline_s:g} leaves less than {REPLY_MARGIN_S:g} s beyond "
                f"this holder's masked_input_reply_s={self.masked_input_reply_s:g}"
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
        if not math.isinf(p.epsilon) and spent_delta + p.delta > self.max_total_delta:
            raise BudgetExceededError(
                f"delta={p.delta} would bring the total to {spent_delta + p.delta:.4g} > "
                f"max_total_delta={self.max_total_delta} (spent {spent_delta:.4g})"
            )
