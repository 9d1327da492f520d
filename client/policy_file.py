"""A data holder's POLICY.toml: the terms it agrees to, read strictly into a ClientPolicy.

Example (every key optional; an absent key keeps :class:`ClientPolicy`'s default)::

    max_epsilon_per_task = 4.0      # largest epsilon one task may spend
    max_total_epsilon = 20.0        # lifetime cap over all tasks (basic composition)
    max_delta = 1e-6                # largest delta per task
    max_total_delta = 1e-4          # lifetime cap on the deltas (basic composition)
    allowed_fingerprints = ["sha256:..."]   # models accepted ([] = the local model's only)
    allowed_modes = ["distributed", "local"]
    min_threshold = 3               # smallest secure-sum threshold t
    min_holders = 3                 # fewest participants K, key exchangers and survivors
    max_colluders = 0               # holders assumed to collude with the coordinator
    max_records = 1000000           # most records contributed to any task (a public cap)
    masked_input_reply_s = 300.0    # answer a masked input this long after it arrives
    allow_non_private = false       # epsilon = inf tasks; never true unless meant
    budget_path = "budget.sqlite"   # relative paths: beside this file
    log_file = "node.log"           # refusal details go here (never records)

Parsing is strict because the file is the holder's consent: an unknown key (a typo such as
``max_epsilon``) would otherwise silently keep a looser default, and a string "false" where a
boolean belongs must never read as consent. Every error names the file, the key, the value and
the expected type. The coordinator's run config can set none of these terms.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fedsynth.client.policy import ClientPolicy, parse_bool, parse_float
from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.mechanisms import TrustMode

__all__ = [
    "NodePolicy",
    "PolicyFile",
    "attach_log_file",
    "load_policy_file",
    "node_policy",
    "parse_policy",
]

MAX_POLICY_BYTES: Final = 1024 * 1024
_FINGERPRINT: Final = re.compile(r"sha256:[0-9a-f]{64}")
_FLOATS: Final = ("max_epsilon_per_task", "max_total_epsilon", "max_delta", "max_total_delta")
_INTS: Final = ("min_threshold", "min_holders", "max_colluders", "max_records")
_PATHS: Final = ("budget_path", "log_file")
_SECONDS: Final = ("masked_input_reply_s",)
KNOWN_KEYS: Final = frozenset(
    {
        *_FLOATS,
        *_INTS,
        *_PATHS,
        *_SECONDS,
        "allowed_fingerprints",
        "allowed_modes",
        "allow_non_private",
    }
)
"""Every key a policy file may hold."""

NODE_POLICY_KEYS: Final = ("max-epsilon", "allow-non-private")
"""Node-config keys that set policy terms without a policy file (both may not be combined)."""


@dataclass(frozen=True)
class PolicyFile:
    """A parsed policy file.

    Attributes:
        policy: The privacy terms.
        budget_path: The budget store the file names (None: the node directory's default).
        log_file: Where the node logs refusal details (None: the SuperNode's own log).
    """

    policy: ClientPolicy
    budget_path: Path | None = None
    log_file: Path | None = None


def _a_type(value: object) -> str:
    """The value's TOML type with its article: "an integer", "a string", "a dict"."""
    name = {bool: "boolean", int: "integer", float: "float", str: "string"}.get(
        type(value), type(value).__name__
    )
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _wrong(key: str, value: object, expected: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is {_a_type(value)}, expected {expected}")


def _float(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _wrong(key, value, "a number")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{key}={value!r}: must be a finite number > 0")
    if key in ("max_delta", "max_total_delta") and number >= 1:
        raise ConfigError(f"{key}={value!r}: must be below 1")
    return number


def _int(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong(key, value, "an integer")
    return value


def _strings(key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _wrong(key, value, "a list of strings")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise _wrong(f"{key}[{index}]", item, "a string")
    if len(set(value)) != len(value):
        raise ConfigError(f"{key}={value!r} lists an entry twice")
    return tuple(value)


def parse_policy(data: Mapping[str, object], *, base_dir: Path) -> PolicyFile:
    """Build a :class:`PolicyFile` from parsed TOML, refusing anything unknown or mistyped.

    Relative paths resolve against ``base_dir`` (the policy file's directory).

    Raises:
        ConfigError: An unknown key (named, with the known ones), a value of the wrong type
            (key, value and expected type), or a value out of range.
    """
    unknown = sorted(set(data) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0]!r} (known keys: {', '.join(sorted(KNOWN_KEYS))})"
        )
    terms: dict[str, object] = {}
    for key in _FLOATS:
        if key in data:
            terms[key] = _float(key, data[key])
    for key in _INTS:
        if key in data:
            terms[key] = _int(key, data[key])
    for key in _SECONDS:
        if key in data:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _wrong(key, value, "a number of seconds")
            terms[key] = float(value)
    if "allow_non_private" in data:
        value = data["allow_non_private"]
        if not isinstance(value, bool):  # TOML true/false only; "false" is a string here
            raise _wrong("allow_non_private", value, "true or false (unquoted)")
        terms["allow_non_private"] = value
    if "allowed_modes" in data:
        modes = _strings("allowed_modes", data["allowed_modes"])
        if not modes:
            raise ConfigError("allowed_modes=[]: a policy must allow at least one trust mode")
        known = [m.value for m in TrustMode]
        for mode in modes:
            if mode not in known:
                raise ConfigError(f"allowed_modes: {mode!r} is not a trust mode {known}")
        terms["allowed_modes"] = modes
    if "allowed_fingerprints" in data:
        prints = _strings("allowed_fingerprints", data["allowed_fingerprints"])
        for item in prints:
            if _FINGERPRINT.fullmatch(item) is None:
                raise ConfigError(
                    f"allowed_fingerprints: {item!r} is not 'sha256:' and 64 lower-case hex "
                    "digits (the fingerprint `fedsynth node fetch-model` prints)"
                )
        terms["allowed_fingerprints"] = prints
    paths: dict[str, Path] = {}
    for key in _PATHS:
        if key in data:
            value = data[key]
            if not isinstance(value, str) or not value:
                raise _wrong(key, value, "a non-empty string (a path)")
            path = Path(value).expanduser()
            paths[key] = path if path.is_absolute() else Path(base_dir) / path
    policy = ClientPolicy(**terms)  # type: ignore[arg-type]
    return PolicyFile(
        policy=policy, budget_path=paths.get("budget_path"), log_file=paths.get("log_file")
    )


def load_policy_file(path: Path) -> PolicyFile:
    """Read and parse a holder's POLICY.toml.

    Raises:
        ConfigError: If the file is missing, too large, not TOML, or any term is refused
            (the message starts with the file's path).
    """
    path = Path(path)
    try:
        if path.stat().st_size > MAX_POLICY_BYTES:
            raise ConfigError(f"policy file {path} exceeds {MAX_POLICY_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"policy file {path}: cannot read ({reason})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"policy file {path} is not valid TOML ({exc})") from None
    try:
        return parse_policy(data, base_dir=path.parent)
    except ConfigError as exc:
        raise ConfigError(f"policy file {path}: {exc}") from None


@dataclass(frozen=True)
class NodePolicy:
    """The policy, budget store and log file a SuperNode's own node config selects.

    Attributes:
        policy: The holder's terms.
        budget_path: The node config's ``budget-path``, else the policy file's (None: unset).
        log_file: The policy file's ``log_file`` (None: unset).
    """

    policy: ClientPolicy
    budget_path: Path | None
    log_file: Path | None


def node_policy(node_config: Mapping[str, object]) -> NodePolicy:
    """The holder's policy from its node config: ``policy-path`` or the two inline keys.

    With ``policy-path`` the file holds every term; the inline keys (``max-epsilon``,
    ``allow-non-private``) are then refused, since two sources of one consent could disagree.
    A ``budget-path`` in the node config that differs from the file's is refused as well: two
    stores would each see only part of the spending.

    Raises:
        ConfigError: On a conflict (naming both keys) or anything :func:`load_policy_file`
            refuses.
    """
    node_budget = node_config.get("budget-path")
    budget = Path(str(node_budget)) if node_budget else None
    path = node_config.get("policy-path")
    if not path:
        policy = ClientPolicy(
            max_epsilon_per_task=parse_float("max-epsilon", node_config.get("max-epsilon", 8.0)),
            allow_non_private=parse_bool(
                "allow-non-private", node_config.get("allow-non-private", False)
            ),
        )
        return NodePolicy(policy=policy, budget_path=budget, log_file=None)
    for key in NODE_POLICY_KEYS:
        if key in node_config:
            raise ConfigError(
                f"node config sets both policy-path={path!r} and {key}={node_config[key]!r}; "
                "put every term in the policy file"
            )
    loaded = load_policy_file(Path(str(path)))
    if (
        budget is not None
        and loaded.budget_path is not None
        and os.path.abspath(budget) != os.path.abspath(loaded.budget_path)
    ):
        raise ConfigError(
            f"node config budget-path={str(budget)!r} differs from budget_path="
            f"{str(loaded.budget_path)!r} in {path}; one holder keeps one budget store"
        )
    return NodePolicy(
        policy=loaded.policy, budget_path=budget or loaded.budget_path, log_file=loaded.log_file
    )


def attach_log_file(path: Path, logger_name: str = "fedsynth") -> None:
    """Send the ``fedsynth`` loggers' records to ``path`` too (once per process and path).

    The file is created readable by its owner only: refusal details name task terms and the
    holder's own settings (never records, vectors or noise).

    Raises:
        ConfigError: If the log file cannot be created (naming the path).
    """
    path = Path(path).absolute()
    logger = logging.getLogger(logger_name)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == path:
            return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"log_file {path}: cannot create ({exc.strerror})") from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
