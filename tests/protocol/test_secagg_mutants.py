"""Edges of the secure sum (protocol/secagg) that mutation testing showed untested.

Each test states the behaviour a one-token change of the code broke without any other test
failing; see docs/mutation-testing.md for the mutants and why each edge matters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections.abc import Callable, Mapping

import numpy as np
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from secagg_harness import Round, make_round

from fedsynth.protocol.errors import (
    ConfigError,
    IdentityError,
    KeyAuthenticationError,
    ProtocolError,
    ShareError,
    StageOrderError,
    TooFewParticipantsError,
    TooFewSharesError,
    UnsafeThresholdError,
)
from fedsynth.protocol.identity import HolderIdentity
from fedsynth.protocol.secagg import (
    KeyShares,
    PublicKeys,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    min_safe_threshold,
    shamir,
)
from fedsynth.protocol.secagg.client import check_threshold_floor
from fedsynth.protocol.secagg.crypto import (
    PURPOSE_ENC,
    PURPOSE_MASK,
    aad,
    check_commitment,
    check_node_id,
    check_share,
    combine_secret,
    combine_secrets,
    decode_plaintext,
    derive_pair_key,
    encode_plaintext,
    prg,
    prg_nonce,
    share_commitment,
    signature_is_valid,
    split_secret,
    split_secrets,
)

# ---------------------------------------------------------------------------------------------
# Transport forms: a config or a key message from the wire
# ---------------------------------------------------------------------------------------------

CONFIG = {"session_id": "s", "node_ids": [1, 2, 3], "threshold": 2, "bits": 32, "dim": 4}


def _config(**change: object) -> SecAggConfig:
    """``CONFIG`` as a SecAggConfig (node ids as a tuple), with the fields in ``change``."""
    return SecAggConfig(**(CONFIG | {"node_ids": (1, 2, 3)} | change))  # type: ignore[arg-type]


def test_config_from_the_wire_must_be_a_mapping_and_says_what_it_got() -> None:
    with pytest.raises(ConfigError, match="config must be a mapping, got list"):
        SecAggConfig.from_dict([("session_id", "s")])  # type: ignore[arg-type]


@pytest.mark.parametrize("node_ids", [{1, 2, 3}, 5, "123", b"\x01\x02\x03"])
def test_config_from_the_wire_refuses_node_ids_that_are_not_a_list(node_ids: object) -> None:
    # A set has no order (the Shamir indices follow the order of U1 on every party), an int
    # or a string is not a participant list: each is a ConfigError naming the field.
    with pytest.raises(ConfigError, match=r"node_ids must be a list of ints, got "):
        SecAggConfig.from_dict({**CONFIG, "node_ids": node_ids})


def _signed_keys() -> dict[str, object]:
    rnd = make_round(3, 2)
    rnd.setup()
    return dict(rnd.announced[100].to_dict())


@pytest.mark.parametrize("dropped", ["enc_pk", "mask_pk"])
def test_a_key_message_without_either_x25519_key_is_malformed(dropped: str) -> None:
    data = {k: v for k, v in _signed_keys().items() if k != dropped}
    with pytest.raises(
        ProtocolError, match=r"^public keys message must hold 'enc_pk' and 'mask_pk'$"
    ) as caught:
        PublicKeys.from_dict(data)
    assert not isinstance(caught.value, KeyAuthenticationError)


def test_a_key_message_that_is_not_a_mapping_is_malformed() -> None:
    with pytest.raises(
        ProtocolError, match=r"^public keys message must hold 'enc_pk' and 'mask_pk'$"
    ):
        PublicKeys.from_dict([("enc_pk", b"x"), ("mask_pk", b"y")])  # type: ignore[arg-type]


@pytest.mark.parametrize("dropped", ["name", "sign_pk", "signature"])
def test_an_unsigned_key_message_is_refused_naming_what_is_missing(dropped: str) -> None:
    data = {k: v for k, v in _signed_keys().items() if k != dropped}
    with pytest.raises(KeyAuthenticationError, match=rf"lacks \['{dropped}'\].*must be signed"):
        PublicKeys.from_dict(data)


# ---------------------------------------------------------------------------------------------
# Exported client state
# ---------------------------------------------------------------------------------------------


def _state_after_share_keys() -> tuple[dict[str, object], Callable[[Mapping[str, object]], object]]:
    rnd = make_round(3, 2)
    rnd.setup()
    rnd.share_keys()
    roster = rnd.roster
    assert roster is not None
    identity = rnd.identities[100]

    def restore(data: Mapping[str, object]) -> object:
        return SecAggClient.from_state(data, identity=identity, roster=roster)

    return dict(rnd.clients[100].export_state()), restore


def test_a_state_with_u1_columns_of_different_lengths_is_refused_naming_them() -> None:
    state, restore = _state_after_share_keys()
    names = state["u1_names"]
    assert isinstance(names, list)
    with pytest.raises(ProtocolError, match=r"^state fields 'u1_\*' have different lengths$"):
        restore({**state, "u1_names": names[:-1]})


def test_a_state_naming_a_stranger_in_u1_is_refused_as_the_states_fault() -> None:
    state, restore = _state_after_share_keys()
    ids = state["u1_ids"]
    assert isinstance(ids, list)
    with pytest.raises(ProtocolError, match=r"^state: node 999 is not a participant"):
        restore({**state, "u1_ids": [*ids[:-1], 999]})


def test_a_state_whose_u1_lacks_the_own_node_is_refused() -> None:
    state, restore = _state_after_share_keys()
    position = state["u1_ids"].index(100)  # type: ignore[union-attr]
    columns = ("u1_ids", "u1_enc_pks", "u1_mask_pks", "u1_names", "u1_sign_pks", "u1_signatures")
    dropped = {
        name: [v for i, v in enumerate(state[name]) if i != position]  # type: ignore[arg-type]
        for name in columns
    }
    with pytest.raises(ProtocolError, match=r"^state: own node is missing from 'u1_ids'$"):
        restore({**state, **dropped})


def test_a_state_with_unsigned_own_keys_is_refused() -> None:
    state, restore = _state_after_share_keys()
    position = state["u1_ids"].index(100)  # type: ignore[union-attr]
    signatures = list(state["u1_signatures"])  # type: ignore[call-overload]
    signatures[position] = b""
    with pytest.raises(ProtocolError, match=r"^state: own announced keys are unsigned$"):
        restore({**state, "u1_signatures": signatures})


def test_a_restored_client_keeps_the_holders_colluder_bound() -> None:
    # K = 3, t = 2 is safe without colluders and unsafe with one (2t - K = 1 is not > 1): a
    # holder that assumes a colluder must refuse the round when it resumes from its state too.
    rnd = make_round(3, 2)
    rnd.setup()
    state = rnd.clients[100].export_state()
    roster = rnd.roster
    assert roster is not None
    identity = rnd.identities[100]
    SecAggClient.from_state(state, identity=identity, roster=roster)  # no colluder assumed
    with pytest.raises(UnsafeThresholdError, match="max_colluders=1"):
        SecAggClient.from_state(state, identity=identity, roster=roster, max_colluders=1)


def test_restore_refusals_say_what_is_wrong_with_the_state() -> None:
    state, restore = _state_after_share_keys()
    with pytest.raises(ProtocolError, match=r"^state must be a mapping, got str$"):
        restore("not a state")  # type: ignore[arg-type]
    owners = list(state["share_owners"])  # type: ignore[call-overload]
    b_shares = list(state["b_shares"])  # type: ignore[call-overload]
    sk_shares = list(state["sk_shares"])  # type: ignore[call-overload]
    with pytest.raises(
        ProtocolError, match=r"^state fields 'share_owners', 'b_shares', 'sk_shares' differ$"
    ):
        restore({**state, "b_shares": b_shares[:-1]})
    stranger = [*owners[:-1], 999]
    with pytest.raises(ProtocolError, match=r"^state holds shares of node 999, not in U1$"):
        restore({**state, "share_owners": stranger})
    own = owners.index(100)
    without = {
        "share_owners": [o for i, o in enumerate(owners) if i != own],
        "b_shares": [b for i, b in enumerate(b_shares) if i != own],
        "sk_shares": [k for i, k in enumerate(sk_shares) if i != own],
    }
    with pytest.raises(ProtocolError, match=r"^state lacks this node's own shares$"):
        restore({**state, **without})
    for column, what in (("b_shares", "state b-share"), ("sk_shares", "state mask-key share")):
        broken = list(state[column])  # type: ignore[call-overload]
        broken[0] = b"short"
        with pytest.raises(ProtocolError, match=rf"^{what} has 5 bytes, expected \d+$"):
            restore({**state, column: broken})
    other = _state_after_share_keys()[0]
    with pytest.raises(
        ProtocolError, match=r"^state: private keys do not match the node's announced keys$"
    ):
        restore({**state, "enc_sk": other["enc_sk"], "mask_sk": other["mask_sk"]})


def test_a_state_with_malformed_round_keys_is_refused() -> None:
    rnd = make_round(3, 2)
    rnd.setup()  # stage share_keys: the state holds the round's private keys
    state = rnd.clients[100].export_state()
    roster = rnd.roster
    assert roster is not None
    with pytest.raises(ProtocolError, match=r"^state holds a malformed X25519 private key$"):
        SecAggClient.from_state(
            {**state, "enc_sk": b"\x01" * 31}, identity=rnd.identities[100], roster=roster
        )


def test_the_survivor_list_of_a_state_must_be_a_sorted_subset_of_u2() -> None:
    rnd = make_round(4, 3)
    rnd.setup()
    rnd.share_keys()
    rnd.masked_input()
    rnd.consistency()
    state = rnd.clients[100].export_state()
    roster = rnd.roster
    assert roster is not None
    u3 = list(state["u3"])  # type: ignore[call-overload]
    assert u3 == sorted(u3) and len(u3) == 4

    def restore(data: Mapping[str, object]) -> object:
        return SecAggClient.from_state(data, identity=rnd.identities[100], roster=roster)

    restore(state)
    for bad in (u3[::-1], [*u3[:-1], 999]):  # unsorted; sorted but not a holder of shares
        with pytest.raises(ProtocolError, match=r"^state field 'u3' is not a sorted subset of U2$"):
            restore({**state, "u3": bad})


# ---------------------------------------------------------------------------------------------
# Shamir sharing of the round secrets
# ---------------------------------------------------------------------------------------------


def test_one_share_alone_is_used_as_given_and_reveals_nothing() -> None:
    # combine_secret uses every share it is given: one share of a t = 2 sharing interpolates
    # to a wrong value, which the integrity check refuses. It is not "too few shares": the
    # helper must not invent a threshold of its own.
    secret = bytes(range(32))
    share = split_secret(secret, 2, 3)[0]
    with pytest.raises(ShareError, match="at least one share is corrupt") as caught:
        combine_secret([share], owner=1, what="seed")
    assert not isinstance(caught.value, TooFewSharesError)


def test_lagrange_needs_at_least_one_index_and_says_so() -> None:
    with pytest.raises(TooFewSharesError, match=r"^no share indices given, need at least 1$"):
        shamir.lagrange_at_zero([])


def test_a_batch_reconstruction_names_a_bad_threshold() -> None:
    with pytest.raises(ShareError, match=r"^threshold=0 is outside \[1, \d+\]$"):
        shamir.reconstruct({}, threshold=0)
    with pytest.raises(ShareError, match=r"^threshold must be an int, got str$"):
        shamir.reconstruct({}, threshold="2")  # type: ignore[arg-type]


def test_combine_refuses_a_row_without_one_share_per_index() -> None:
    with pytest.raises(ShareError, match=r"values\[1\] holds 1 shares, expected 2 \(one per index"):
        shamir.combine([1, 2], [[3, 4], [5]])


@pytest.mark.parametrize("bad", [shamir.PRIME, shamir.PRIME + 7, -1, True, 1.0])
def test_combine_refuses_a_share_value_outside_the_field(bad: object) -> None:
    # Values are field elements: p itself, anything above it, a negative number, a bool or a
    # float is a malformed share, never silently reduced modulo p.
    with pytest.raises(ShareError, match=r"values\[0\] holds a value outside the field"):
        shamir.combine([1, 2], [[bad, 5]])  # type: ignore[list-item]


def test_combine_accepts_the_field_edges_zero_and_p_minus_one() -> None:
    # Independent reference: a line through (1, y1) and (2, y2) meets x = 0 at 2*y1 - y2.
    p = shamir.PRIME
    for y1, y2 in [(0, 0), (0, p - 1), (p - 1, 0), (p - 1, p - 1), (1, 0)]:
        assert shamir.combine([1, 2], [[y1, y2]]) == [(2 * y1 - y2) % p]


def _shares_of_value(value: int, *, t: int = 2, k: int = 3) -> list[bytes]:
    rows = shamir.split([value], threshold=t, num=k)
    return [shamir.encode_share(i + 1, row[0]) for i, row in enumerate(rows)]


def test_a_reconstruction_beyond_a_packed_secret_is_refused_as_corrupt() -> None:
    # p - 1 needs 383 bits, more than the 47 packed bytes of a secret and its check.
    shares = _shares_of_value(shamir.PRIME - 1)
    with pytest.raises(
        ShareError,
        match=r"^reconstruction of seed of node 4 is not a packed 47-byte secret; "
        r"at least one share is corrupt$",
    ):
        combine_secrets({4: shares[:2]}, threshold=2, what={4: "seed"})


def test_a_reconstruction_with_a_wrong_check_is_refused_as_corrupt() -> None:
    packed = bytes(range(32)) + bytes(15)  # a 32-byte secret with an all-zero (wrong) check
    shares = _shares_of_value(int.from_bytes(packed, "big"))
    with pytest.raises(
        ShareError,
        match=r"^reconstruction of mask key of node 6 failed its integrity check; "
        r"at least one share is corrupt$",
    ):
        combine_secrets({6: shares[1:]}, threshold=2, what={6: "mask key"})
    with pytest.raises(ShareError, match=r"^reconstruction of secret of node 6 failed its"):
        combine_secrets({6: shares[1:]}, threshold=2, what={})  # no name given: "secret"


def test_too_few_or_malformed_shares_are_refused_naming_the_secret_and_its_owner() -> None:
    shares = _shares_of_value(12345)
    with pytest.raises(
        TooFewSharesError, match=r"^mask key of node 6 has 1 shares, threshold t=2$"
    ):
        combine_secrets({6: shares[:1]}, threshold=2, what={6: "mask key"})
    with pytest.raises(TooFewSharesError, match=r"^secret of node 7 has 1 shares, threshold t=2$"):
        combine_secrets({7: shares[:1]}, threshold=2, what={})  # no name given: "secret"
    with pytest.raises(ShareError, match=r"^share of node 8 has 3 bytes, expected \d+$"):
        combine_secrets({8: [shares[0], b"abc"]}, threshold=2, what={8: "seed"})


def test_shares_beyond_the_number_of_holders_are_refused_in_a_batch() -> None:
    # Indices run 1..K: a share claiming index K + 1 came from no holder of this round.
    secret = bytes(range(32))
    shares = split_secret(secret, 2, 4)  # indices 1..4
    assert combine_secrets({5: shares[1:3]}, threshold=2, what={5: "seed"}, num=3) == {5: secret}
    with pytest.raises(ShareError, match=r"share index \[1\]=4 is outside \[1, 3\]"):
        combine_secrets({5: shares[2:4]}, threshold=2, what={5: "seed"}, num=3)


# ---------------------------------------------------------------------------------------------
# The unmask round at a holder
# ---------------------------------------------------------------------------------------------


def _round_at_unmask(k: int = 4, t: int = 3, absent: tuple[int, ...] = (103,)) -> Round:
    rnd = make_round(k, t)
    rnd.setup()
    rnd.share_keys()
    rnd.masked_input(absent)
    rnd.consistency()
    return rnd


def test_unmask_errors_name_the_call_and_the_list_at_fault() -> None:
    early = make_round(3, 2)
    with pytest.raises(StageOrderError, match=r"^unmask\(\) called in stage 'setup'"):
        early.clients[100].unmask([100, 101], [102], signatures={})
    rnd = _round_at_unmask()
    holder = rnd.clients[100]
    with pytest.raises(ProtocolError, match=r"^survivors must be a sequence of node ids"):
        holder.unmask("100", [103], signatures=rnd.signatures)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match=r"^survivors entry must be an integer node id"):
        holder.unmask([100, "101"], [103], signatures=rnd.signatures)  # type: ignore[list-item]
    with pytest.raises(ProtocolError, match=r"^dropped must be a sequence of node ids"):
        holder.unmask(rnd.survivors, 103, signatures=rnd.signatures)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match=r"^dropped lists node\(s\) \[7\] that did not share"):
        holder.unmask(rnd.survivors, [7], signatures=rnd.signatures)
    with pytest.raises(ProtocolError, match=r"refusing to release both shares of the same node$"):
        holder.unmask(rnd.survivors, [103, 101], signatures=rnd.signatures)
    with pytest.raises(ProtocolError, match=r"^signatures must be a mapping, got list$"):
        holder.unmask(rnd.survivors, rnd.dropped, signatures=[])  # type: ignore[arg-type]
    # Nothing was released by any refusal: the holder still answers the honest request.
    assert set(holder.unmask(rnd.survivors, rnd.dropped, signatures=rnd.signatures)) == {
        100,
        101,
        102,
        103,
    }


# ---------------------------------------------------------------------------------------------
# Signed statements, checked against their documented byte layout (independent reference)
# ---------------------------------------------------------------------------------------------


def _session(session_id: str) -> bytes:
    raw = session_id.encode("utf-8")
    return struct.pack(">I", len(raw)) + raw


def _verifies(public_key: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except InvalidSignature:
        return False
    return True


def test_a_consistency_signature_covers_the_documented_survivor_layout() -> None:
    # tag || 0x00 || len32(session) || session || SHA-256 config digest || len32(U3) ||
    # u64 of every survivor, ascending: what another implementation of the coordinator checks.
    rnd = _round_at_unmask(k=5, t=3, absent=(104,))
    cfg = rnd.config
    digest = hashlib.sha256(
        b"fedsynth/secagg/config\x00"
        + json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":")).encode("utf-8")
    ).digest()
    survivors = sorted(rnd.survivors)
    message = (
        b"fedsynth/secagg/v2/survivors\x00"
        + _session(cfg.session_id)
        + digest
        + struct.pack(">I", len(survivors))
        + b"".join(struct.pack(">Q", n) for n in survivors)
    )
    for node, signature in rnd.signatures.items():
        assert _verifies(rnd.identities[node].public_key, signature, message)
    # The set is what is signed: the same bytes over another survivor set do not verify.
    other = (
        message[: -8 * len(survivors) - 4]
        + struct.pack(">I", 3)
        + b"".join(struct.pack(">Q", n) for n in survivors[:3])
    )
    assert not _verifies(rnd.identities[100].public_key, rnd.signatures[100], other)


def test_round_keys_are_signed_over_the_documented_layout() -> None:
    # tag || 0x00 || len32(session) || session || config digest || u64(node) || enc_pk ||
    # mask_pk || len16(name) || name.
    rnd = make_round(3, 2)
    rnd.setup()
    cfg = rnd.config
    for node, keys in rnd.announced.items():
        name = keys.name.encode("utf-8")
        message = (
            b"fedsynth/secagg/v2/round-keys\x00"
            + _session(cfg.session_id)
            + cfg.digest()
            + struct.pack(">Q", node)
            + keys.enc_pk
            + keys.mask_pk
            + struct.pack(">H", len(name))
            + name
        )
        assert _verifies(rnd.identities[node].public_key, keys.signature, message)


def test_consistency_errors_name_the_call_and_what_is_wrong() -> None:
    early = make_round(3, 2)
    with pytest.raises(StageOrderError, match=r"^consistency\(\) called in stage 'setup'"):
        early.clients[100].consistency([100, 101])
    rnd = make_round(4, 3)
    rnd.setup()
    rnd.share_keys()
    rnd.masked_input()
    holder = rnd.clients[100]
    with pytest.raises(ProtocolError, match=r"^node 100 is not listed among the survivors$"):
        holder.consistency([101, 102, 103])
    with pytest.raises(TooFewParticipantsError, match=r"^2 survivors, threshold t=3$"):
        holder.consistency([100, 101])
    with pytest.raises(ProtocolError, match=r"^survivors lists a node more than once"):
        holder.consistency([100, 101, 101])
    # None of the refusals signed anything: the honest survivor set is still signed once.
    assert len(holder.consistency(rnd.survivors)) == 64


# ---------------------------------------------------------------------------------------------
# The coordinator's unmask: any t valid shares finish the round, whoever sent junk first
# ---------------------------------------------------------------------------------------------


def test_a_malformed_share_costs_only_that_share_not_its_senders_others() -> None:
    # 100 sends junk as the share of node 100 (the first owner it is checked for), 101 as the
    # share of node 101. Each owner still has t = 2 valid shares only if 100's shares of the
    # owners after 100 are still checked and counted.
    rnd = _round_at_unmask(3, 2, absent=())
    responses = rnd.responses()
    responses[100][100] = b"junk"
    responses[101][101] = b"junk"
    np.testing.assert_array_equal(rnd.server.unmask(responses), rnd.expected())
    assert set(rnd.server.rejected) == {100, 101}


def test_junk_responders_first_in_order_do_not_hide_the_honest_ones() -> None:
    # A non-signer id and a non-integer key sort before every real node; a signer whose reply
    # is not a mapping comes first too. The three honest signers left still finish (t = 3).
    rnd = _round_at_unmask(4, 3, absent=())
    responses: dict[object, object] = dict(rnd.responses())
    responses[100] = b"not a mapping"
    responses[1] = {}  # not a signer of this round
    responses["x"] = {}  # not a node id at all: ignored, never compared with the integers
    total = rnd.server.unmask(responses)  # type: ignore[arg-type]
    np.testing.assert_array_equal(total, rnd.expected())
    assert rnd.server.rejected == {100: "unmask: response is not a mapping"}


def test_coordinator_refusals_say_what_is_wrong() -> None:
    early = make_round(3, 2)
    with pytest.raises(StageOrderError, match=r"^unmask\(\) called in stage 'setup'"):
        early.server.unmask({})
    with pytest.raises(StageOrderError, match=r"^receive_signatures\(\) called in stage 'setup'"):
        early.server.receive_signatures({})
    rnd = make_round(3, 2)
    rnd.setup()
    rnd.share_keys()
    rnd.masked_input()
    with pytest.raises(ProtocolError, match=r"^signatures must be a mapping, got list$"):
        rnd.server.receive_signatures([])  # type: ignore[arg-type]
    rnd.consistency()
    with pytest.raises(ProtocolError, match=r"^responses must be a mapping, got list$"):
        rnd.server.unmask([])  # type: ignore[arg-type]
    responses = rnd.responses()
    responses[100][100] = b"junk"
    responses[101][100] = b"junk"
    with pytest.raises(
        TooFewParticipantsError,
        match=r"^valid shares per node \{100: 1\}, threshold t=2; corrupt or missing shares "
        r"were discarded$",
    ):
        rnd.server.unmask(responses)


Split = Callable[[list[bytes], int, int], list[list[bytes]]]


def _owner_shares_with(monkeypatch: pytest.MonkeyPatch, owner: int, cheat: Split) -> None:
    """Make node ``owner`` split its secrets with ``cheat`` instead of the honest split.

    It computes its commitments over what ``cheat`` returns, so every share it sends matches
    its commitment: only the reconstruction can tell.
    """
    from fedsynth.protocol.secagg import client as client_module

    honest: Split = client_module.split_secrets
    current: list[int] = [0]
    original = SecAggClient.share_keys

    def split(secrets: list[bytes], threshold: int, num: int) -> list[list[bytes]]:
        return (cheat if current[0] == owner else honest)(secrets, threshold, num)

    def share_keys(self: SecAggClient, u1: Mapping[int, PublicKeys]) -> object:
        current[0] = self._node_id
        return original(self, u1)

    monkeypatch.setattr(client_module, "split_secrets", split)
    monkeypatch.setattr(SecAggClient, "share_keys", share_keys)


def test_an_owner_that_shared_another_mask_key_is_caught_by_its_public_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 103 shares a well-formed mask key that is not the one it announced, then drops out: the
    # survivors' shares reconstruct it and the coordinator must refuse it, naming the node.
    def other_key(secrets: list[bytes], threshold: int, num: int) -> list[list[bytes]]:
        return split_secrets([secrets[0], bytes(32 * [7])], threshold, num)

    _owner_shares_with(monkeypatch, 103, other_key)
    rnd = _round_at_unmask(4, 3, absent=(103,))
    with pytest.raises(
        ProtocolError, match=r"^reconstructed mask key of node 103 does not match its public key$"
    ):
        rnd.server.unmask(rnd.responses())


@pytest.mark.parametrize(("absent", "what"), [((), "self-mask seed"), ((103,), "mask key")])
def test_inconsistent_shares_of_an_owner_name_the_secret_that_failed(
    monkeypatch: pytest.MonkeyPatch, absent: tuple[int, ...], what: str
) -> None:
    # 103's first share of each secret comes from another polynomial than the rest: the shares
    # match their commitments and the reconstruction fails, naming the secret and its owner.
    def mixed(secrets: list[bytes], threshold: int, num: int) -> list[list[bytes]]:
        shares = split_secrets(secrets, threshold, num)
        other = split_secrets(secrets, threshold, num)
        return [[other[j][0], *column[1:]] for j, column in enumerate(shares)]

    _owner_shares_with(monkeypatch, 103, mixed)
    rnd = _round_at_unmask(4, 3, absent=absent)
    with pytest.raises(ProtocolError, match=rf"^reconstruction of {what} of node 103 "):
        rnd.server.unmask(rnd.responses())


# ---------------------------------------------------------------------------------------------
# A restored client: each field's type, and the messages naming it
# ---------------------------------------------------------------------------------------------


def test_restore_names_the_field_of_the_wrong_type() -> None:
    state, restore = _state_after_share_keys()
    with pytest.raises(
        ProtocolError, match=r"^state version 99 is not supported \(expected \d+\)$"
    ):
        restore({**state, "version": 99})
    with pytest.raises(ProtocolError, match=r"^state field 'threshold' must be int, got '2'$"):
        restore({**state, "threshold": "2"})
    with pytest.raises(ProtocolError, match=r"^state field 'enc_sk' must be bytes, got str$"):
        restore({**state, "enc_sk": "secret"})
    with pytest.raises(ProtocolError, match=r"^state field 'session_id' must be str, got bytes$"):
        restore({**state, "session_id": b"s"})
    ids = list(state["node_ids"])  # type: ignore[call-overload]
    with pytest.raises(ProtocolError, match=r"^state field 'node_ids' must hold only int$"):
        restore({**state, "node_ids": [True, *ids[1:]]})  # a bool is not a node id
    with pytest.raises(ProtocolError, match=r"^state field 'b_shares' must hold only bytes$"):
        restore({**state, "b_shares": ["x" for _ in ids]})


# ---------------------------------------------------------------------------------------------
# The PRG and the share messages, against their documented layout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 17, 32, 63])
def test_prg_words_are_field_elements(bits: int) -> None:
    words = prg(bytes(range(32)), nonce=prg_nonce("s"), dim=4096, bits=bits)
    assert words.dtype == np.uint64
    assert int(words.max()) < 2**bits
    assert int(words.max()) >= 2 ** (bits - 1)  # the top bit is used (4096 draws)


def test_prg_nonce_is_the_documented_derivation() -> None:
    # A zero 32-bit block counter, then 96 bits of SHA-256(tag, 0, length-prefixed session id):
    # a wire format, since holders and the coordinator of different versions must agree.
    session = "round-7"
    digest = hashlib.sha256(
        b"fedsynth/secagg/prg-nonce" + b"\x00" + struct.pack(">I", len(session)) + session.encode()
    ).digest()
    assert prg_nonce(session) == bytes(4) + digest[:12]


def _plaintext_shares() -> tuple[bytes, bytes]:
    b_shares, sk_shares = split_secrets([bytes(32), bytes(range(32))], 2, 3)
    return b_shares[1], sk_shares[1]  # the shares of index 2


def test_a_share_message_with_a_bad_header_is_malformed() -> None:
    b_share, sk_share = _plaintext_shares()
    good = encode_plaintext(100, 101, b_share, sk_share)
    assert decode_plaintext(good, sender=100, recipient=101, expected_index=2) == (
        b_share,
        sk_share,
    )
    bad_header = r"^share message from node 100 is malformed \(bad header\)$"
    with pytest.raises(ProtocolError, match=bad_header):
        decode_plaintext(b"XXXX\x01" + good[5:], sender=100, recipient=101, expected_index=2)
    with pytest.raises(ProtocolError, match=bad_header):
        decode_plaintext(good[:9], sender=100, recipient=101, expected_index=2)
    # Exactly the header (magic, sender, recipient) and nothing else: truncated, not malformed.
    with pytest.raises(
        ProtocolError, match=r"^share message from node 100 is truncated at the b-share$"
    ):
        decode_plaintext(good[:21], sender=100, recipient=101, expected_index=2)


# ---------------------------------------------------------------------------------------------
# The coordinator's masked-input and consistency stages
# ---------------------------------------------------------------------------------------------


def test_masked_input_refusals_name_the_call_and_the_sender() -> None:
    early = make_round(3, 2)
    with pytest.raises(StageOrderError, match=r"^receive_masked_input\(\) called in stage"):
        early.server.receive_masked_input(100, np.zeros(8, dtype=np.uint64))
    with pytest.raises(StageOrderError, match=r"^close_masked_inputs\(\) called in stage"):
        early.server.close_masked_inputs()
    rnd = make_round(3, 2)
    rnd.setup()
    rnd.share_keys()
    with pytest.raises(ProtocolError, match=r"^masked input sender must be an integer node id"):
        rnd.server.receive_masked_input("100", np.zeros(8, dtype=np.uint64))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match=r"^masked input of node 100 must have dtype uint64"):
        rnd.server.receive_masked_input(100, np.zeros(8, dtype=np.int64))  # type: ignore[arg-type]
    rnd.masked_input()
    with pytest.raises(ProtocolError, match=r"after the masked-input round was closed$"):
        rnd.server.receive_masked_input(100, np.zeros(8, dtype=np.uint64))


def test_signatures_from_strangers_first_in_order_do_not_hide_the_survivors() -> None:
    rnd = make_round(4, 3)
    rnd.setup()
    rnd.share_keys()
    rnd.masked_input()
    signed: dict[object, bytes] = {
        n: rnd.clients[n].consistency(rnd.survivors) for n in rnd.survivors
    }
    signed[1] = bytes(64)  # not a survivor: ignored, not a reason to stop reading
    signed["x"] = bytes(64)  # not a node id: ignored, never compared with the integers
    signed[101] = bytes(64)  # a survivor whose signature does not verify
    assert set(rnd.server.receive_signatures(signed)) == {100, 102, 103}  # type: ignore[arg-type]
    assert rnd.server.rejected == {101: "consistency: signature over U3 does not verify"}


# ---------------------------------------------------------------------------------------------
# Share messages and key shares: what is wrong, and with whose message
# ---------------------------------------------------------------------------------------------


def test_a_share_message_must_name_both_its_sender_and_its_recipient() -> None:
    b_share, sk_share = _plaintext_shares()
    for sender, recipient in ((7, 101), (100, 7)):
        message = encode_plaintext(sender, recipient, b_share, sk_share)
        with pytest.raises(
            ProtocolError,
            match=rf"^share message names sender {sender} -> recipient {recipient}, but it was "
            r"delivered as 100 -> 101$",
        ):
            decode_plaintext(message, sender=100, recipient=101, expected_index=2)


def test_share_message_refusals_name_the_part_at_fault() -> None:
    b_share, sk_share = _plaintext_shares()
    good = encode_plaintext(100, 101, b_share, sk_share)
    cut_in_second = len(good) - 10
    with pytest.raises(
        ProtocolError, match=r"^share message from node 100 is truncated at the mask-key share$"
    ):
        decode_plaintext(good[:cut_in_second], sender=100, recipient=101, expected_index=2)
    with pytest.raises(
        ProtocolError, match=r"^share message from node 100 is truncated at the b-share$"
    ):
        decode_plaintext(good[:30], sender=100, recipient=101, expected_index=2)
    with pytest.raises(ProtocolError, match=r"^share message from node 100 has 3 trailing bytes$"):
        decode_plaintext(good + b"abc", sender=100, recipient=101, expected_index=2)
    with pytest.raises(
        ProtocolError, match=r"^b-share from node 100 carries Shamir index 2, expected 3$"
    ):
        decode_plaintext(good, sender=100, recipient=101, expected_index=3)


def test_share_checks_name_the_field() -> None:
    b_share, _ = _plaintext_shares()
    with pytest.raises(ProtocolError, match=r"^the share must be bytes, got str$"):
        check_share("x", expected_index=2, field="the share")
    too_big = b_share[:4] + b"\xff" * (len(b_share) - 4)  # index 2, value above the prime
    with pytest.raises(ShareError, match=r"^the share holds a value that is not below the field"):
        check_share(too_big, expected_index=2, field="the share")
    with pytest.raises(ProtocolError, match=r"^a commitment must be bytes, got str$"):
        check_commitment("x", "a commitment")
    with pytest.raises(ShareError, match=r"^share must be bytes, got str$"):
        shamir.decode_share("x")
    with pytest.raises(ShareError, match=r"^share has 1 bytes, expected \d+$"):
        shamir.decode_share(b"x")
    # The largest index a share may carry is MAX_SHARES itself.
    last = shamir.MAX_SHARES.to_bytes(shamir.INDEX_BYTES, "little") + bytes(
        shamir.SHARE_BYTES - shamir.INDEX_BYTES
    )
    assert shamir.decode_share(last) == (shamir.MAX_SHARES, 0)


def test_masked_input_refusals_say_what_the_coordinator_sent_wrong() -> None:
    rnd = make_round(4, 3)
    rnd.setup()
    with pytest.raises(StageOrderError, match=r"^masked_input\(\) called in stage"):
        rnd.clients[100].masked_input({}, rnd.values[100])
    rnd.share_keys()
    holder = rnd.clients[100]
    routed = dict(rnd.routed[100])
    value = rnd.values[100]
    cases: list[tuple[object, type[Exception], str]] = [
        ([], ProtocolError, r"^ciphertexts must be a mapping, got list$"),
        ({"101": b""}, ProtocolError, r"^ciphertext sender must be an integer node id"),
        ({**routed, 100: b""}, ProtocolError, r"^node 100 received a ciphertext from itself$"),
        ({**routed, 101: "x"}, ProtocolError, r"^ciphertext from node 101 must be bytes, got str$"),
        (
            {101: routed[101]},
            TooFewParticipantsError,
            r"^node 100: 1 other nodes shared keys, U2 has 2 members, threshold t=3$",
        ),
    ]
    for ciphertexts, error, message in cases:
        with pytest.raises(error, match=message):
            holder.masked_input(ciphertexts, value)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match=r"^value must have dtype uint64"):
        holder.masked_input(routed, value.astype(np.int64))  # type: ignore[arg-type]
    # None of the refusals used the secrets: the holder still masks its value for U2.
    assert holder.masked_input(routed, value).shape == value.shape


def _rejected_at_share_keys(tamper: Callable[[dict[int, KeyShares]], dict[int, object]]) -> dict:
    rnd = make_round(5, 3)
    rnd.setup()
    shares = {n: rnd.clients[n].share_keys(rnd.u1) for n in rnd.u1}
    rnd.server.route_shares({**shares, **tamper(shares)})  # type: ignore[dict-item]
    return rnd.server.rejected


def test_key_share_refusals_name_the_sender_and_the_entry() -> None:
    def first(shares: dict[int, KeyShares]) -> dict[int, object]:
        good = shares[101]
        return {
            100: "not key shares",
            101: KeyShares(dict(good.ciphertexts) | {102: "x"}, dict(good.commitments)),  # type: ignore[dict-item]
        }

    def second(shares: dict[int, KeyShares]) -> dict[int, object]:
        return {
            102: KeyShares({"y": b"", **shares[102].ciphertexts}, dict(shares[102].commitments)),  # type: ignore[dict-item]
            103: KeyShares(
                dict(shares[103].ciphertexts),
                dict(shares[103].commitments) | {100: "z"},  # type: ignore[dict-item]
            ),
        }

    rejected = _rejected_at_share_keys(first)
    assert rejected[100] == "share_keys: shares of node 100 must be KeyShares"
    assert rejected[101] == "share_keys: ciphertext 101 -> 102 must be bytes"
    rejected = _rejected_at_share_keys(second)
    assert rejected[102].startswith("share_keys: recipient of node 102 must be an integer node id")
    assert rejected[103] == "share_keys: commitment 103 -> 100 must be bytes, got str"

    def third(shares: dict[int, KeyShares]) -> dict[int, object]:
        commitments = dict(shares[104].commitments)
        del commitments[100]
        return {104: KeyShares(dict(shares[104].ciphertexts), commitments)}

    def fourth(shares: dict[int, KeyShares]) -> dict[int, object]:
        commitments: dict[object, bytes] = {"q": b"", **shares[104].commitments}
        return {104: KeyShares(dict(shares[104].ciphertexts), commitments)}  # type: ignore[arg-type]

    assert _rejected_at_share_keys(fourth)[104].startswith(
        "share_keys: commitment recipient of node 104 must be an integer node id"
    )
    assert _rejected_at_share_keys(third)[104] == (
        "share_keys: node 104 committed to shares for [101, 102, 103, 104], expected U1 "
        "[100, 101, 102, 103, 104]"
    )


# ---------------------------------------------------------------------------------------------
# Key derivation, associated data, commitments and signatures: the documented derivations
# ---------------------------------------------------------------------------------------------


def _u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def test_pair_keys_are_hkdf_bound_to_purpose_session_and_the_pair() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    mine, theirs = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    peer = theirs.public_key().public_bytes_raw()
    shared = mine.exchange(theirs.public_key())
    for purpose in (PURPOSE_ENC, PURPOSE_MASK):
        info = purpose + b"\x00" + _session("round-7") + _u64(3) + _u64(9)
        expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)
        for a, b in ((3, 9), (9, 3)):  # the same key from either side of the pair
            key = derive_pair_key(
                mine, peer, purpose=purpose, session_id="round-7", node_a=a, node_b=b
            )
            assert key == expected


def test_share_ciphertexts_and_commitments_bind_the_documented_fields() -> None:
    assert aad("round-7", 3, 9) == (
        b"fedsynth/secagg/share-ct\x00" + _session("round-7") + _u64(3) + _u64(9)
    )
    share = bytes(range(52))
    expected = hashlib.sha256(
        b"fedsynth/secagg/v2/share-commitment\x00"
        + _session("round-7")
        + _u64(3)
        + _u64(9)
        + bytes([2])
        + share
    ).digest()
    got = share_commitment(session_id="round-7", owner=3, recipient=9, kind=2, share=share)
    assert got == expected


def test_announced_keys_verify_only_under_the_key_they_are_checked_with() -> None:
    rnd = make_round(3, 2)
    rnd.setup()
    keys = rnd.announced[100]
    own = rnd.identities[100].public_key
    other = rnd.identities[101].public_key
    assert keys.verify(node=100, config=rnd.config, sign_pk=own)
    assert not keys.verify(node=100, config=rnd.config, sign_pk=other)
    assert keys.verify(node=100, config=rnd.config)  # None: the announced signing key
    assert not keys.verify(node=101, config=rnd.config, sign_pk=own)  # bound to its node


@pytest.mark.parametrize("signature", [5, None, "x" * 64, b"short"])
def test_a_malformed_signature_is_invalid_not_an_error(signature: object) -> None:
    rnd = make_round(3, 2)
    assert signature_is_valid(rnd.identities[100].public_key, signature, b"message") is False


def test_node_ids_outside_the_range_are_named() -> None:
    with pytest.raises(ProtocolError, match=r"^the sender=-1 is outside the node id range \[0, "):
        check_node_id(-1, "the sender")


# ---------------------------------------------------------------------------------------------
# Key sets and share routing: refusals name the party and the entry
# ---------------------------------------------------------------------------------------------


def test_a_key_set_refusal_names_who_refused_and_why() -> None:
    rnd = make_round(4, 3)
    rnd.setup()
    holder = rnd.clients[100]
    u1 = dict(rnd.u1)
    cases: list[tuple[object, type[Exception], str]] = [
        ([], ProtocolError, r"^node 100: public keys must be a mapping, got list$"),
        (
            {**u1, "x": u1[101]},
            ProtocolError,
            r"^node 100: public key owner must be an integer node id",
        ),
        (
            {**u1, 101: "keys"},
            ProtocolError,
            r"^node 100: keys of node 101 must be PublicKeys, got str$",
        ),
        (
            {100: u1[100], 101: u1[101]},
            TooFewParticipantsError,
            r"^node 100: 2 nodes announced keys, threshold t=3$",
        ),
    ]
    for keys, error, message in cases:
        with pytest.raises(error, match=message):
            holder.share_keys(keys)  # type: ignore[arg-type]
    # Two nodes announcing as one holder: named in order, with the holder's name.
    renamed = dict(u1)
    renamed[102] = dataclasses.replace(u1[102], name=u1[101].name)
    with pytest.raises(
        KeyAuthenticationError,
        match=r"^node 100: nodes 101 and 102 both announce keys as holder 'holder-101'$",
    ):
        holder.share_keys(renamed)
    assert holder.share_keys(u1).ciphertexts  # the refusals changed nothing


def test_routing_skips_strangers_first_in_order_and_names_bad_calls() -> None:
    early = make_round(3, 2)
    with pytest.raises(StageOrderError, match=r"^route_shares\(\) called in stage 'setup'"):
        early.server.route_shares({})
    rnd = make_round(4, 3)
    rnd.setup()
    with pytest.raises(ProtocolError, match=r"^outgoing must be a mapping, got list$"):
        rnd.server.route_shares([])  # type: ignore[arg-type]
    shares: dict[object, object] = {n: rnd.clients[n].share_keys(rnd.u1) for n in rnd.u1}
    shares[1] = shares[100]  # not in U1: ignored, not a reason to stop reading
    shares["x"] = shares[100]  # not a node id: ignored, never compared with the integers
    routed = rnd.server.route_shares(shares)  # type: ignore[arg-type]
    assert set(routed) == {100, 101, 102, 103}
    assert all(set(routed[n]) == {100, 101, 102, 103} - {n} for n in routed)


def test_a_low_order_peer_key_is_refused_naming_the_pair() -> None:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    with pytest.raises(ProtocolError, match=r"^X25519 key agreement between nodes 3 and 9 failed"):
        derive_pair_key(
            X25519PrivateKey.generate(),
            bytes(32),  # the identity point: an all-zero shared secret
            purpose=PURPOSE_ENC,
            session_id="s",
            node_a=9,
            node_b=3,
        )


# ---------------------------------------------------------------------------------------------
# Set-up: the holder's colluder bound, announced keys, the coordinator's first stage
# ---------------------------------------------------------------------------------------------


def test_the_colluder_bound_must_be_a_non_negative_int() -> None:
    config = _config()
    for bad in (-1, True, 1.0):
        with pytest.raises(ConfigError, match=rf"^max_colluders={bad!r}: must be an int >= 0$"):
            check_threshold_floor(config, bad)  # type: ignore[arg-type]
    check_threshold_floor(config, 0)
    # One colluder among three needs t >= 3 = K: possible, so the refusal says what t needs.
    with pytest.raises(UnsafeThresholdError, match=r"which needs t >= 3$"):
        check_threshold_floor(config, 1)
    with pytest.raises(
        UnsafeThresholdError, match=r"no t <= K is safe \(t >= 4 would be needed\)$"
    ):
        check_threshold_floor(config, 3)


def test_announced_keys_name_the_malformed_field() -> None:
    rnd = make_round(3, 2)
    rnd.setup()
    good = rnd.announced[100]
    cases: list[tuple[dict[str, object], str]] = [
        ({"enc_pk": "x"}, r"^enc_pk must be bytes, got str$"),
        ({"mask_pk": "x"}, r"^mask_pk must be bytes, got str$"),
        ({"name": "no spaces allowed"}, r"^name=.no spaces allowed. is not a holder name"),
        ({"sign_pk": "x"}, r"^sign_pk must be bytes, got str$"),
        ({"signature": 5}, r"^signature must be bytes, got int$"),
        ({"sign_pk": b"abc"}, r"^sign_pk has 3 bytes, expected 32$"),
    ]
    for change, message in cases:
        with pytest.raises(ProtocolError, match=message):
            dataclasses.replace(good, **change)  # type: ignore[arg-type]
    with pytest.raises(StageOrderError, match=r"^setup\(\) called in stage 'share_keys'"):
        rnd.clients[100].setup()


def test_a_new_coordinator_checks_its_arguments_and_has_no_signers_yet() -> None:
    config = _config()
    with pytest.raises(ConfigError, match=r"^config must be a SecAggConfig, got str$"):
        SecAggServer("config")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^roster must be a Roster or None, got str$"):
        SecAggServer(config, roster="roster")  # type: ignore[arg-type]
    assert SecAggServer(config).signers == []


def test_key_collection_skips_strangers_and_names_each_rejection() -> None:
    early = make_round(5, 3)
    early.setup()
    with pytest.raises(StageOrderError, match=r"^receive_public_keys\(\) called in stage"):
        early.server.receive_public_keys(early.announced)
    rnd = make_round(5, 3)
    with pytest.raises(ProtocolError, match=r"^public keys must be a mapping, got list$"):
        rnd.server.receive_public_keys([])  # type: ignore[arg-type]
    announced = {n: c.setup() for n, c in rnd.clients.items()}
    keys: dict[object, object] = dict(announced)
    keys["x"] = announced[101]  # not a node id: skipped, never compared with the integers
    keys[1] = announced[101]  # not a participant: skipped
    keys[100] = "not keys"  # first in order: rejected, the others still read
    keys[101] = dataclasses.replace(announced[101], signature=bytes(64))
    u1 = rnd.server.receive_public_keys(keys)  # type: ignore[arg-type]
    assert set(u1) == {102, 103, 104}
    assert rnd.server.rejected == {
        100: "setup: keys are not PublicKeys",
        101: "setup: round keys are unsigned or wrongly signed",
    }
    clash = make_round(4, 3)
    own = {n: c.setup() for n, c in clash.clients.items()}
    own[103] = dataclasses.replace(own[103], enc_pk=own[102].enc_pk)  # re-signed below
    own[103] = dataclasses.replace(
        own[103],
        signature=clash.identities[103].sign(own[103].message(node=103, config=clash.config)),
    )
    with pytest.raises(TooFewParticipantsError):
        clash.server.receive_public_keys(own)
    assert clash.server.rejected == {
        102: "setup: announces a key or name another node also uses",
        103: "setup: announces a key or name another node also uses",
    }


# ---------------------------------------------------------------------------------------------
# The session config, the holder's own identity, share encoding and the threshold floor
# ---------------------------------------------------------------------------------------------


def test_config_limits_are_inclusive_and_refusals_name_the_field() -> None:
    from fedsynth.protocol.secagg.stages import MAX_DIM, MAX_SESSION_ID_BYTES

    assert _config(session_id="s" * MAX_SESSION_ID_BYTES).session_id
    with pytest.raises(
        ConfigError,
        match=rf"^session_id is {MAX_SESSION_ID_BYTES + 1} UTF-8 bytes long, "
        rf"limit {MAX_SESSION_ID_BYTES}$",
    ):
        _config(session_id="s" * (MAX_SESSION_ID_BYTES + 1))
    assert _config(dim=MAX_DIM).dim == MAX_DIM
    assert _config(node_ids=(1, 2)).node_ids == (1, 2)  # two holders are a federation
    with pytest.raises(ConfigError, match=r"^node_ids must be distinct, duplicated: \[1, 3\]$"):
        _config(node_ids=(1, 3, 1, 2, 3))
    with pytest.raises(ConfigError, match=r"^node_ids must be a sequence of ints, got '123'$"):
        _config(node_ids="123")
    # Integer-like fields from the wire (numpy integers) are stored as plain ints.
    config = _config(threshold=np.int64(2), bits=np.int64(32), dim=np.int64(4))
    assert all(type(v) is int for v in (config.threshold, config.bits, config.dim))


def test_a_holder_refuses_an_identity_its_own_roster_does_not_pin() -> None:
    rnd = make_round(3, 2)
    assert rnd.roster is not None
    stranger = HolderIdentity.generate("holder-999")
    impostor = HolderIdentity.generate("holder-100")  # a pinned name, another key
    for identity in (stranger, impostor):
        with pytest.raises(
            IdentityError,
            match=rf"^identity {identity.name!r} is not in the pinned roster with this key",
        ):
            SecAggClient(100, rnd.config, identity=identity, roster=rnd.roster)
    with pytest.raises(IdentityError, match=r"^identity must be a HolderIdentity, got str$"):
        SecAggClient(100, rnd.config, identity="me", roster=rnd.roster)  # type: ignore[arg-type]
    with pytest.raises(IdentityError, match=r"^roster must be a Roster, got dict$"):
        SecAggClient(100, rnd.config, identity=rnd.identities[100], roster={})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^config must be a SecAggConfig, got dict$"):
        SecAggClient(100, {}, identity=rnd.identities[100], roster=rnd.roster)  # type: ignore[arg-type]


def test_share_encoding_takes_exactly_the_field() -> None:
    assert shamir.decode_share(shamir.encode_share(1, 0)) == (1, 0)
    assert shamir.decode_share(shamir.encode_share(1, shamir.PRIME - 1)) == (1, shamir.PRIME - 1)
    for bad in (shamir.PRIME, -1, True, 1.0):
        with pytest.raises(
            ShareError, match=r"^share value must be an int in \[0, p = 2\^383 - 31\)$"
        ):
            shamir.encode_share(1, bad)  # type: ignore[arg-type]
    # One holder's share with num = 1 is allowed; num outside [1, MAX_SHARES] is named.
    assert shamir.reconstruct({"a": [(1, 5)]}, threshold=1, num=1) == {"a": 5}
    with pytest.raises(ShareError, match=r"^num=0 is outside \[1, \d+\]$"):
        shamir.reconstruct({"a": [(1, 5)]}, threshold=1, num=0)


def test_the_threshold_floor_takes_only_integer_counts() -> None:
    for k in (True, 1, 2.0):
        with pytest.raises(ConfigError, match=rf"^K={k!r} participants: must be an int >= 2$"):
            min_safe_threshold(k)  # type: ignore[arg-type]
    for colluders in (True, -1):
        with pytest.raises(ConfigError, match=rf"^colluders={colluders!r}: must be an int >= 0$"):
            min_safe_threshold(5, colluders)  # type: ignore[arg-type]
