"""A secure-sum session driven step by step in one process, for the secagg tests.

Every holder gets a fresh Ed25519 identity and all pin one roster; the coordinator is an honest
SecAggServer unless a test tampers with what the Round passes between the parties.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from fedsynth.protocol.identity import HolderIdentity, Roster
from fedsynth.protocol.secagg import (
    KeyShares,
    PublicKeys,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    min_safe_threshold,
)

U64 = npt.NDArray[np.uint64]


def random_field(rng: np.random.Generator, dim: int, bits: int) -> U64:
    return rng.integers(0, 2**bits, size=dim, dtype=np.uint64, endpoint=False)


def plain_sum(values: Iterable[U64], bits: int, dim: int) -> U64:
    total = [0] * dim
    for vec in values:
        total = [t + int(v) for t, v in zip(total, vec, strict=True)]
    return np.array([t % (1 << bits) for t in total], dtype=np.uint64)


def consortium(node_ids: Iterable[int]) -> tuple[dict[int, HolderIdentity], Roster]:
    """One fresh identity per node (named after it) and the roster listing them all."""
    identities = {n: HolderIdentity.generate(f"holder-{n}") for n in node_ids}
    roster = Roster({i.name: i.public_key for i in identities.values()})
    return identities, roster


@dataclass
class Round:
    """One session driven step by step, recording what the coordinator receives."""

    config: SecAggConfig
    values: dict[int, U64]
    identities: dict[int, HolderIdentity] = field(default_factory=dict)
    roster: Roster | None = None
    clients: dict[int, SecAggClient] = field(default_factory=dict)
    server: SecAggServer = field(init=False)
    announced: dict[int, PublicKeys] = field(default_factory=dict)
    u1: dict[int, PublicKeys] = field(default_factory=dict)
    key_shares: dict[int, KeyShares] = field(default_factory=dict)
    routed: dict[int, dict[int, bytes]] = field(default_factory=dict)
    received: dict[int, U64] = field(default_factory=dict)
    survivors: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    signatures: dict[int, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.identities:
            self.identities, self.roster = consortium(self.config.node_ids)
        assert self.roster is not None
        self.server = SecAggServer(self.config, roster=self.roster)
        self.clients = {n: self.make_client(n) for n in self.config.node_ids}

    def make_client(self, node: int) -> SecAggClient:
        assert self.roster is not None
        return SecAggClient(node, self.config, identity=self.identities[node], roster=self.roster)

    def setup(self, absent: Iterable[int] = ()) -> None:
        skip = set(absent)
        self.announced = {n: c.setup() for n, c in self.clients.items() if n not in skip}
        self.u1 = self.server.receive_public_keys(self.announced)

    def share_keys(self, absent: Iterable[int] = ()) -> None:
        skip = set(absent)
        self.key_shares = {n: self.clients[n].share_keys(self.u1) for n in self.u1 if n not in skip}
        self.routed = self.server.route_shares(self.key_shares)

    def masked_input(self, absent: Iterable[int] = ()) -> None:
        skip = set(absent)
        for n, cts in self.routed.items():
            masked = self.clients[n].masked_input(cts, self.values[n])
            if n not in skip:
                self.received[n] = masked.copy()
                self.server.receive_masked_input(n, masked)
        self.survivors, self.dropped = self.server.close_masked_inputs()

    def consistency(self, absent: Iterable[int] = ()) -> None:
        skip = set(absent)
        signed = {
            n: self.clients[n].consistency(self.survivors) for n in self.survivors if n not in skip
        }
        self.signatures = self.server.receive_signatures(signed)

    def responses(self, absent: Iterable[int] = ()) -> dict[int, dict[int, bytes]]:
        skip = set(absent)
        return {
            n: self.clients[n].unmask(self.survivors, self.dropped, signatures=self.signatures)
            for n in self.server.signers
            if n not in skip
        }

    def run(
        self,
        *,
        absent_setup: Iterable[int] = (),
        absent_share: Iterable[int] = (),
        absent_masked: Iterable[int] = (),
        absent_consistency: Iterable[int] = (),
        absent_unmask: Iterable[int] = (),
    ) -> U64:
        self.setup(absent_setup)
        self.share_keys(absent_share)
        self.masked_input(absent_masked)
        self.consistency(absent_consistency)
        result: U64 = self.server.unmask(self.responses(absent_unmask))
        return result

    def expected(self) -> U64:
        return plain_sum(
            (self.values[n] for n in self.survivors), self.config.bits, self.config.dim
        )


def make_round(
    k: int,
    t: int | None = None,
    *,
    bits: int = 32,
    dim: int = 8,
    seed: int = 0,
    node_ids: tuple[int, ...] | None = None,
    value_fn: Callable[[int, np.random.Generator], U64] | None = None,
) -> Round:
    """A round of K nodes (ids 100, 101, ...) with threshold t (default: the safe floor)."""
    ids = node_ids if node_ids is not None else tuple(range(100, 100 + k))
    threshold = t if t is not None else min_safe_threshold(k)
    cfg = SecAggConfig(
        session_id=f"test-{seed}", node_ids=ids, threshold=threshold, bits=bits, dim=dim
    )
    rng = np.random.default_rng(seed)
    values = {
        n: (value_fn(n, rng) if value_fn is not None else random_field(rng, dim, bits)) for n in ids
    }
    return Round(cfg, values)
