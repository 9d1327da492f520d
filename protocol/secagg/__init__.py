"""Secure summation of integer vectors (Bonawitz et al., CCS 2017, active-adversary variant).

A coordinator (:class:`SecAggServer`) and K clients (:class:`SecAggClient`) compute the exact sum
modulo 2^bits of the clients' uint64 vectors. Each client adds a self mask ``PRG(b_u)`` and
pairwise masks ``+-PRG(s_uv)`` that cancel in the sum; the seed ``b_u`` and the mask key
``mask_sk_u`` are Shamir-shared (threshold t) among the participants, so up to K - t clients may
drop out and the coordinator can still remove their pairwise masks, while it never learns both
secrets of any one client and never sees an unmasked individual vector.

Rounds (the message flows; the transport is someone else's job)::

    client.setup()                -> signed PublicKeys   -> server.receive_public_keys  (U1)
    client.share_keys(U1 keys)    -> KeyShares           -> server.route_shares         (U2)
    client.masked_input(cts, x)   -> masked vector       -> server.receive_masked_input
                                                            server.close_masked_inputs  (U3)
    client.consistency(U3)        -> signature over U3   -> server.receive_signatures   (U4)
    client.unmask(U3, D, sigs)    -> {owner: share}      -> server.unmask -> sum over U3

Security model (the paper's active adversary): the coordinator may lie about who dropped,
substitute keys and collude with up to ``max_colluders`` holders. Every holder pins the
consortium :class:`~fedsynth.protocol.identity.Roster` and verifies every round key's Ed25519
signature under it; every survivor signs the survivor set it is told and reveals shares only for
a set that t survivors signed; and every holder refuses ``t < min_safe_threshold(K, colluders)``
(``2t - K > colluders``), so no node's self-mask seed and mask key can both be revealed:
two survivor lists with and without one node would need more signers than exist. What this does
not stop: a colluding roster member that signs round keys as a different node id in different
holders' views can have two disjoint groups of holders each complete a separate sum (each of at
least t - c honest inputs, each holder's input in one sum only, its noise share sized as for
any survivor set), which is what running two smaller tasks gives; and with ``K - colluders = 1``
the sum less the colluders' inputs is the one honest input (hidden then only by that holder's
own noise share in distributed mode, not at all in the opt-in central mode). Share
commitments let the coordinator discard corrupt shares, so one faulty survivor cannot abort the
round. Layout: :mod:`.stages` (stage names, constants, the threshold floor), :mod:`.crypto`
(encodings and primitives), :mod:`.config` (session config, announced keys), :mod:`.client`,
:mod:`.server`.

Every public method validates its input before changing any state, so a call that raises leaves
the object as it was.
"""

from fedsynth.protocol.secagg.client import SecAggClient, check_threshold_floor
from fedsynth.protocol.secagg.config import (
    KeyShares,
    PublicKeys,
    SecAggConfig,
    SecureSumTask,
    StateValue,
)
from fedsynth.protocol.secagg.server import SecAggServer
from fedsynth.protocol.secagg.stages import (
    CLIENT_STAGES,
    COMMITMENT_BYTES,
    KEY_BYTES,
    MAX_DIM,
    MAX_NODE_ID,
    MAX_SESSION_ID_BYTES,
    ROUND_STAGES,
    SERVER_STAGES,
    SHARE_BYTES,
    SIGNATURE_BYTES,
    Stage,
    min_safe_threshold,
)

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
    "KeyShares",
    "PublicKeys",
    "SecAggClient",
    "SecAggConfig",
    "SecAggServer",
    "SecureSumTask",
    "Stage",
    "StateValue",
    "check_threshold_floor",
    "min_safe_threshold",
]
