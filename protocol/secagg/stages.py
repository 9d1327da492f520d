"""Names and sizes shared by both sides of the secure sum: the stages and the constants.

One :class:`Stage` enum names every round of the protocol (Bonawitz et al., CCS 2017, the
active-adversary variant with signed keys and a consistency check); the client, the
coordinator, the wire codec and the progress reports all use it. The threshold floor that
the holders enforce is a pure function of K and the number of colluders, defined here once.
"""

from __future__ import annotations

import enum
import math
from typing import Final

from fedsynth.protocol.errors import ConfigError, StageOrderError

__all__ = [
    "CLIENT_STAGES",
    "COMMITMENT_BYTES",
    "KEY_BYTES",
    "MAX_DIM",
    "MAX_NODE_ID",
    "MAX_SESSION_ID_BYTES",
    "ROUND_STAGES",
    "SERVER_STAGES",
    "SHARE_BYTES",
    "SIGNATURE_BYTES",
    "Stage",
    "check_stage",
    "min_safe_threshold",
]


class Stage(enum.StrEnum):
    """The rounds of one secure sum, in order; the value is the name used on the wire.

    A client's or coordinator's ``stage`` is the round it expects next; ``DONE`` expects none.
    """

    SETUP = "setup"
    """Clients announce signed round keys (the set U1)."""
    SHARE_KEYS = "share_keys"
    """Clients verify U1 and send encrypted Shamir shares (the set U2)."""
    MASKED_INPUT = "masked_input"
    """Clients send masked vectors (the set U3)."""
    CONSISTENCY = "consistency"
    """Survivors sign the survivor set U3 they were told (the set U4 of signers)."""
    UNMASK = "unmask"
    """Signers check t signatures over their U3 and reveal shares."""
    DONE = "done"
    """Nothing more is expected."""


ROUND_STAGES: Final = (
    Stage.SETUP,
    Stage.SHARE_KEYS,
    Stage.MASKED_INPUT,
    Stage.CONSISTENCY,
    Stage.UNMASK,
)
"""The stages that exchange messages, in the order the coordinator runs them."""

CLIENT_STAGES: Final = (*ROUND_STAGES, Stage.DONE)
"""Every stage a client can be in (each named after the call it expects next)."""

SERVER_STAGES: Final = CLIENT_STAGES
"""Every stage a coordinator can be in (each named after the round it expects next)."""


def check_stage(current: Stage, expected: Stage, call: str) -> None:
    """Raise StageOrderError unless ``current == expected`` (a call out of order)."""
    if current != expected:
        raise StageOrderError(
            f"{call}() called in stage {current.value!r}; expected stage {expected.value!r}"
        )


KEY_BYTES: Final = 32
"""Length of X25519 and Ed25519 public keys, of the self-mask seed and of every derived key."""

SIGNATURE_BYTES: Final = 64
"""Length of an Ed25519 signature."""

COMMITMENT_BYTES: Final = 32
"""Length of one share commitment (SHA-256)."""

MAX_DIM: Final = 2**31
"""Largest vector length (keeps the ChaCha20 32-bit block counter far from wrapping)."""

MAX_NODE_ID: Final = 2**64 - 1
"""Largest node id (Flower node ids are unsigned 64-bit)."""

MAX_SESSION_ID_BYTES: Final = 1024
"""Longest accepted session id, in UTF-8 bytes."""

# A shared secret is ``secret32 || SHA-256(tag || secret32)[:15]`` = 47 bytes, one element of
# GF(2^383 - 31); every share is a 4-byte little-endian index plus one 48-byte field element.
SHARE_BYTES: Final = 4 + 48
"""Length of one Shamir share (:mod:`fedsynth.protocol.secagg.shamir`) of one secret."""


def min_safe_threshold(k: int, colluders: int = 0) -> int:
    """Smallest Shamir threshold t for which no survivor's input can be unmasked.

    With signed round keys and the consistency check (Bonawitz et al. 2017, Theorem A.2), a
    coordinator that wants one holder's self-mask seed *and* its mask key must make t parties
    sign a survivor list with the holder in it and t parties sign one without it. Each honest
    holder signs one list; the ``colluders`` holders that side with the coordinator sign both.
    Two such lists exist only if ``2t <= K + colluders``, so the guarantee needs
    ``2t - K > colluders``: with no colluders, a strict majority ``t >= floor(K/2) + 1``.
    The result is never below 2 (one share would be the secret itself).

    Args:
        k: Number of participants K (>= 2).
        colluders: Largest number of holders assumed to collude with the coordinator (>= 0).

    Returns:
        The smallest safe t; it exceeds ``k`` when no threshold is safe for these numbers.

    Raises:
        ConfigError: If ``k < 2`` or ``colluders < 0`` (or either is not an int).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ConfigError(f"K={k!r} participants: must be an int >= 2")
    if isinstance(colluders, bool) or not isinstance(colluders, int) or colluders < 0:
        raise ConfigError(f"colluders={colluders!r}: must be an int >= 0")
    return max(2, math.floor((k + colluders) / 2) + 1)
