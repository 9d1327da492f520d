"""The secure sum against an active coordinator (Bonawitz et al. 2017, active-adversary variant).

Each test plays a coordinator that lies: it strips or forges signatures, substitutes keys, tells
survivors different survivor lists, corrupts shares, or runs below the threshold floor. Every
attack must be refused before the holder reveals anything it should not; and the privacy tests
check, from the coordinator's own view, that the masks are really there and depend on the keys.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from scipy.stats import chisquare
from secagg_harness import U64, Round, make_round, plain_sum

from fedsynth.protocol.errors import (
    ConfigError,
    InconsistentSurvivorsError,
    KeyAuthenticationError,
    ProtocolError,
    TooFewParticipantsError,
    UnsafeThresholdError,
)
from fedsynth.protocol.identity import HolderIdentity
from fedsynth.protocol.secagg import (
    PublicKeys,
    SecAggClient,
    SecAggConfig,
    Stage,
    min_safe_threshold,
)
from fedsynth.protocol.secagg.crypto import (
    add_inplace,
    combine_secret,
    pairwise_mask,
    prg,
    prg_nonce,
    sub_inplace,
)

# ---------------------------------------------------------------------------------------------
# Helpers: the coordinator's arithmetic, done by the test
# ---------------------------------------------------------------------------------------------


def _self_mask(rnd: Round, owner: int, shares: list[bytes]) -> U64:
    seed = combine_secret(shares[: rnd.config.threshold], owner=owner, what="seed")
    cfg = rnd.config
    return prg(seed, nonce=prg_nonce(cfg.session_id), dim=cfg.dim, bits=cfg.bits)


def _pairwise_total(rnd: Round, node: int, mask_sk: X25519PrivateKey, peers: list[int]) -> U64:
    """What ``node`` added in pairwise masks with ``peers``, recomputed from ``mask_sk``."""
    cfg = rnd.config
    total = np.zeros(cfg.dim, dtype=np.uint64)
    for peer in peers:
        mask = pairwise_mask(
            mask_sk,
            rnd.u1[peer].mask_pk,
            session_id=cfg.session_id,
            node=node,
            peer=peer,
            dim=cfg.dim,
            bits=cfg.bits,
        )
        if peer > node:
            add_inplace(total, mask, cfg.bits)
        else:
            sub_inplace(total, mask, cfg.bits)
    return total


def _minus(a: U64, b: U64, bits: int) -> U64:
    out = a.copy()
    sub_inplace(out, b, bits)
    return out


def _mask_keys_before_masking(rnd: Round) -> dict[int, X25519PrivateKey]:
    """Each client's mask key, read from its exported state while it still holds it."""
    return {
        n: X25519PrivateKey.from_private_bytes(rnd.clients[n].export_state()["mask_sk"])  # type: ignore[arg-type]
        for n in rnd.routed
    }


def _resign(rnd: Round, node: int, keys: PublicKeys, signer: HolderIdentity) -> PublicKeys:
    unsigned = dataclasses.replace(keys, name=signer.name, sign_pk=signer.public_key, signature=b"")
    signature = signer.sign(unsigned.message(node=node, config=rnd.config))
    return dataclasses.replace(unsigned, signature=signature)


# ---------------------------------------------------------------------------------------------
# Signed round keys
# ---------------------------------------------------------------------------------------------


def _at_share_keys(k: int = 4) -> Round:
    rnd = make_round(k)
    rnd.setup()
    return rnd


def test_unsigned_key_is_refused_and_nothing_is_shared() -> None:
    rnd = _at_share_keys()
    tampered = dict(rnd.u1)
    tampered[101] = dataclasses.replace(tampered[101], signature=b"")
    with pytest.raises(KeyAuthenticationError, match=r"node 101.*unsigned"):
        rnd.clients[100].share_keys(tampered)
    assert rnd.clients[100].stage == Stage.SHARE_KEYS  # no shares left the holder


def test_wrongly_signed_key_is_refused() -> None:
    rnd = _at_share_keys()
    tampered = dict(rnd.u1)
    bad = bytearray(tampered[102].signature)
    bad[5] ^= 0x01
    tampered[102] = dataclasses.replace(tampered[102], signature=bytes(bad))
    with pytest.raises(KeyAuthenticationError, match="node 102"):
        rnd.clients[100].share_keys(tampered)


def test_key_substitution_by_the_coordinator_is_detected() -> None:
    """The coordinator swaps in its own X25519 keys to decrypt the shares meant for 101."""
    rnd = _at_share_keys()
    own_enc, own_mask = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    swapped = dataclasses.replace(
        rnd.u1[101],
        enc_pk=own_enc.public_key().public_bytes_raw(),
        mask_pk=own_mask.public_key().public_bytes_raw(),
    )
    # Kept signature: it no longer verifies.
    with pytest.raises(KeyAuthenticationError, match="node 101"):
        rnd.clients[100].share_keys({**rnd.u1, 101: swapped})
    # Re-signed with the coordinator's own identity, under 101's name: not the roster's key.
    impostor = HolderIdentity.generate(rnd.u1[101].name)
    with pytest.raises(KeyAuthenticationError, match="substituted"):
        rnd.clients[100].share_keys({**rnd.u1, 101: _resign(rnd, 101, swapped, impostor)})
    # Re-signed under a name the roster does not list.
    stranger = HolderIdentity.generate("coordinator")
    with pytest.raises(KeyAuthenticationError, match="not in the pinned roster"):
        rnd.clients[100].share_keys({**rnd.u1, 101: _resign(rnd, 101, swapped, stranger)})
    for client in rnd.clients.values():
        assert client.stage == Stage.SHARE_KEYS
    # The honest broadcast is still accepted.
    assert set(rnd.clients[100].share_keys(rnd.u1).ciphertexts) == {101, 102, 103}


def test_signed_keys_are_bound_to_node_session_and_configuration() -> None:
    rnd = _at_share_keys()
    # 101's genuine signed keys presented as node 103's.
    moved = {n: k for n, k in rnd.u1.items() if n not in (101, 103)}
    moved[103] = rnd.u1[101]
    with pytest.raises(KeyAuthenticationError, match="node 103"):
        rnd.clients[100].share_keys(moved)
    # Keys signed for another session (replayed from an earlier round).
    other = Round(
        dataclasses.replace(rnd.config, session_id="earlier"),
        rnd.values,
        identities=rnd.identities,
        roster=rnd.roster,
    )
    other.setup()
    with pytest.raises(KeyAuthenticationError, match="node 101"):
        rnd.clients[100].share_keys({**rnd.u1, 101: other.u1[101]})
    # Keys signed under another threshold (a coordinator running one session with two t's).
    higher = Round(
        dataclasses.replace(rnd.config, threshold=4),
        rnd.values,
        identities=rnd.identities,
        roster=rnd.roster,
    )
    higher.setup()
    with pytest.raises(KeyAuthenticationError, match="node 102"):
        rnd.clients[100].share_keys({**rnd.u1, 102: higher.u1[102]})


def test_one_holder_cannot_take_two_places() -> None:
    rnd = _at_share_keys()
    # Holder 101 (malicious) signs a second set of keys for node 103 under its own name.
    fresh = dataclasses.replace(
        rnd.u1[103],
        enc_pk=X25519PrivateKey.generate().public_key().public_bytes_raw(),
        mask_pk=X25519PrivateKey.generate().public_key().public_bytes_raw(),
    )
    doubled = {**rnd.u1, 103: _resign(rnd, 103, fresh, rnd.identities[101])}
    with pytest.raises(KeyAuthenticationError, match="already used by node 101"):
        rnd.clients[100].share_keys(doubled)
    # The coordinator drops both entries instead of aborting.
    server_round = make_round(4)
    keys = {n: c.setup() for n, c in server_round.clients.items()}
    keys[103] = _resign(server_round, 103, keys[103], server_round.identities[101])
    with pytest.raises(TooFewParticipantsError):
        server_round.server.receive_public_keys(keys)  # 2 left of K=4 with t=3
    assert set(server_round.server.rejected) == {101, 103}


def test_coordinator_drops_wrongly_signed_and_unknown_keys() -> None:
    rnd = make_round(5)
    keys = {n: c.setup() for n, c in rnd.clients.items()}
    keys[101] = dataclasses.replace(keys[101], signature=bytes(64))
    keys[102] = _resign(rnd, 102, keys[102], HolderIdentity.generate("outsider"))
    u1 = rnd.server.receive_public_keys(keys)
    assert sorted(u1) == [100, 103, 104]
    assert "unsigned or wrongly signed" in rnd.server.rejected[101]
    assert "not in the roster" in rnd.server.rejected[102]


# ---------------------------------------------------------------------------------------------
# Consistency check: one survivor list for everyone
# ---------------------------------------------------------------------------------------------


def _after_masked_input(k: int, t: int | None = None) -> Round:
    rnd = make_round(k, t, dim=16)
    rnd.setup()
    rnd.share_keys()
    rnd.masked_input()
    return rnd


def test_inconsistent_survivor_lists_abort_before_any_share_is_revealed() -> None:
    """Half the holders are told the target survived, half that it dropped."""
    rnd = _after_masked_input(4)  # t = 3; the target is node 103
    with_target, without_target = [100, 101, 102, 103], [100, 101, 102]
    told = {100: with_target, 103: with_target, 101: without_target, 102: without_target}
    signed = {n: rnd.clients[n].consistency(told[n]) for n in told}
    revealed: dict[int, dict[int, bytes]] = {}
    for n, survivors in told.items():
        dropped = sorted(set(with_target) - set(survivors))
        with pytest.raises(InconsistentSurvivorsError, match="2 valid survivor signatures"):
            revealed[n] = rnd.clients[n].unmask(survivors, dropped, signatures=signed)
        assert rnd.clients[n].stage == Stage.UNMASK
    assert revealed == {}
    # The honest coordinator's own check fails the same way: 2 signatures verify over its U3.
    with pytest.raises(TooFewParticipantsError, match="2 survivors signed"):
        rnd.server.receive_signatures(signed)


def test_a_holder_reveals_only_the_survivor_set_it_signed() -> None:
    rnd = _after_masked_input(5)  # t = 3
    everyone = rnd.survivors
    signed = {n: rnd.clients[n].consistency(everyone) for n in everyone}
    # t valid signatures over the full set, but the holder is told a smaller set at unmask.
    smaller = [100, 101, 102, 103]
    with pytest.raises(InconsistentSurvivorsError, match="differ from the survivor set"):
        rnd.clients[100].unmask(smaller, [104], signatures=signed)
    # Signatures over another set do not count.
    forged = {n: rnd.identities[n].sign(b"another statement") for n in everyone}
    with pytest.raises(InconsistentSurvivorsError, match="0 valid"):
        rnd.clients[100].unmask(everyone, [], signatures=forged)
    # Signatures of non-survivors or of unknown nodes do not count either.
    few = {100: signed[100], 101: signed[101], 7: signed[102]}
    with pytest.raises(InconsistentSurvivorsError, match="2 valid"):
        rnd.clients[100].unmask(everyone, [], signatures=few)
    shares = rnd.clients[100].unmask(everyone, [], signatures=signed)
    assert set(shares) == set(everyone)


def test_majority_threshold_defeats_the_split_even_with_t_signers_on_one_side() -> None:
    """K = 5, t = 3: one side can gather t signatures, the other cannot; one secret at most."""
    rnd = _after_masked_input(5)
    target = 104
    with_target, without_target = rnd.survivors, [n for n in rnd.survivors if n != target]
    told = {n: (with_target if n in (100, 101, 104) else without_target) for n in rnd.survivors}
    signed = {n: rnd.clients[n].consistency(told[n]) for n in told}
    seed_shares, key_shares = 0, 0
    for n, survivors in told.items():
        dropped = sorted(set(with_target) - set(survivors))
        try:
            shares = rnd.clients[n].unmask(survivors, dropped, signatures=signed)
        except InconsistentSurvivorsError:
            continue
        if target in survivors:
            seed_shares += target in shares
        else:
            key_shares += target in shares
    assert seed_shares == 3  # the consistent side may finish (the target did survive)
    assert key_shares == 0  # the mask key of the target is never revealed


def test_threshold_floor_is_what_the_theorem_needs() -> None:
    table = {(2, 0): 2, (3, 0): 2, (4, 0): 3, (5, 0): 3, (6, 0): 4, (5, 1): 4, (6, 2): 5, (4, 3): 4}
    for (k, c), t in table.items():
        assert min_safe_threshold(k, c) == t
        assert 2 * t - k > c or t == 2
        assert not (2 * (t - 1) - k > c and t - 1 >= 2)
    assert min_safe_threshold(4, 4) == 5  # exceeds K: no threshold is safe
    for bad in ((1, 0), (3, -1)):
        with pytest.raises(ConfigError):
            min_safe_threshold(*bad)


def test_holders_refuse_thresholds_below_the_floor() -> None:
    rnd = make_round(4)
    identity, roster = rnd.identities[100], rnd.roster
    assert roster is not None
    low = SecAggConfig(session_id="s", node_ids=(100, 101, 102, 103), threshold=2, bits=32, dim=1)
    with pytest.raises(UnsafeThresholdError, match=r"t=2 with K=4.*needs t >= 3"):
        SecAggClient(100, low, identity=identity, roster=roster)
    ok = dataclasses.replace(low, threshold=3)
    SecAggClient(100, ok, identity=identity, roster=roster)
    SecAggClient(100, ok, identity=identity, roster=roster, max_colluders=1)  # 2*3 - 4 > 1
    with pytest.raises(UnsafeThresholdError, match="max_colluders=2"):
        SecAggClient(100, ok, identity=identity, roster=roster, max_colluders=2)
    with pytest.raises(UnsafeThresholdError, match="no t <= K is safe"):
        SecAggClient(100, ok, identity=identity, roster=roster, max_colluders=4)
    SecAggClient(
        100,
        dataclasses.replace(low, threshold=4),
        identity=identity,
        roster=roster,
        max_colluders=1,
    )


def test_below_the_floor_one_colluder_unmasks_a_holder() -> None:
    """Why the floor counts colluders: K = 5, t = 3 and one holder siding with the coordinator.

    The colluder signs both lists, so each gathers t = 3 signatures; the coordinator gets the
    target's seed from one side and its mask key from the other, and recovers its input
    exactly. Holders with ``max_colluders=1`` refuse this t (the floor is 4).
    """
    rnd = _after_masked_input(5, 3)
    target, colluder = 104, 103
    with_target, without_target = rnd.survivors, [n for n in rnd.survivors if n != target]
    side_a, side_b = (100, target), (101, 102)
    signed_a = {n: rnd.clients[n].consistency(with_target) for n in side_a}
    signed_b = {n: rnd.clients[n].consistency(without_target) for n in side_b}
    colluder_sk = rnd.identities[colluder]
    for signed, survivors in ((signed_a, with_target), (signed_b, without_target)):
        signed[colluder] = colluder_sk.sign(rnd.clients[100]._survivors_message(survivors))
    seed_shares = [
        rnd.clients[n].unmask(with_target, [], signatures=signed_a)[target] for n in side_a
    ]
    key_shares = [
        rnd.clients[n].unmask(without_target, [target], signatures=signed_b)[target] for n in side_b
    ]
    held = rnd.clients[colluder]._shares[target]  # the colluder's own shares of the target
    seed_shares.append(held[0])
    key_shares.append(held[1])
    cfg = rnd.config
    y = rnd.received[target]
    b_mask = _self_mask(rnd, target, seed_shares)
    mask_sk = X25519PrivateKey.from_private_bytes(
        combine_secret(key_shares, owner=target, what="mask key")
    )
    others = [n for n in rnd.survivors if n != target]
    x = _minus(_minus(y, b_mask, cfg.bits), _pairwise_total(rnd, target, mask_sk, others), cfg.bits)
    np.testing.assert_array_equal(x, rnd.values[target])  # the attack works below the floor
    with pytest.raises(UnsafeThresholdError):
        SecAggClient(
            target,
            cfg,
            identity=rnd.identities[target],
            roster=rnd.roster,  # type: ignore[arg-type]
            max_colluders=1,
        )


def test_at_the_floor_one_colluder_cannot_split_the_survivors() -> None:
    """K = 5, t = 4 (the floor for one colluder): no split gives both lists 4 signatures."""
    rnd = _after_masked_input(5, 4)
    target, colluder = 104, 103
    honest = [100, 101, 102, target]
    with_target, without_target = rnd.survivors, [n for n in rnd.survivors if n != target]
    for split in range(1, len(honest)):
        side_a, side_b = honest[:split], honest[split:]
        count_a, count_b = len(side_a) + 1, len(side_b) + 1  # the colluder signs both
        assert count_a < 4 or count_b < 4
    # Concretely, the split that helps the coordinator most: 2 + colluder on each side.
    signed_a = {n: rnd.clients[n].consistency(with_target) for n in (100, target)}
    signed_b = {n: rnd.clients[n].consistency(without_target) for n in (101, 102)}
    for signed, survivors in ((signed_a, with_target), (signed_b, without_target)):
        signed[colluder] = rnd.identities[colluder].sign(
            rnd.clients[100]._survivors_message(survivors)
        )
    for n in (100, target):
        with pytest.raises(InconsistentSurvivorsError):
            rnd.clients[n].unmask(with_target, [], signatures=signed_a)
    for n in (101, 102):
        with pytest.raises(InconsistentSurvivorsError):
            rnd.clients[n].unmask(without_target, [target], signatures=signed_b)


# ---------------------------------------------------------------------------------------------
# Robust unmask
# ---------------------------------------------------------------------------------------------


def _corrupt(share: bytes) -> bytes:
    raw = bytearray(share)
    raw[10] ^= 0x40  # inside the first 16-byte chunk, after the 4-byte index
    return bytes(raw)


def test_one_corrupt_survivor_does_not_abort_the_round() -> None:
    rnd = make_round(5, 3, dim=16, seed=4)
    rnd.setup()
    rnd.share_keys()
    rnd.masked_input(absent=[104])
    rnd.consistency()
    responses = rnd.responses()
    liar = min(responses)  # its shares would be among the first t tried
    responses[liar] = {owner: _corrupt(share) for owner, share in responses[liar].items()}
    np.testing.assert_array_equal(rnd.server.unmask(responses), rnd.expected())
    assert set(rnd.server.rejected) == {liar}
    assert "fails its commitment" in rnd.server.rejected[liar]


def test_corrupt_shares_leave_too_few_valid_ones() -> None:
    rnd = make_round(5, 3, dim=4, seed=5)
    rnd.setup()
    rnd.share_keys()
    rnd.masked_input(absent=[103, 104])
    rnd.consistency()
    responses = rnd.responses()
    assert len(responses) == 3
    responses[100] = {owner: _corrupt(share) for owner, share in responses[100].items()}
    with pytest.raises(TooFewParticipantsError, match="valid shares per node"):
        rnd.server.unmask(responses)
    assert rnd.server.stage == Stage.UNMASK


def test_an_owner_that_shared_inconsistently_is_named() -> None:
    """Shares that match their (dishonest) owner's commitments but not one polynomial."""
    rnd = make_round(4, 3, dim=4, seed=6)
    rnd.setup()
    rnd.share_keys()
    rnd.masked_input()
    rnd.consistency()
    responses = rnd.responses()
    owner, first = 101, min(responses)
    bad = _corrupt(responses[first][owner])
    responses[first][owner] = bad
    # The owner committed to the corrupt share itself (it lied at share_keys).
    from fedsynth.protocol.secagg.crypto import SHARE_KIND_SEED, share_commitment

    seed_commit = share_commitment(
        session_id=rnd.config.session_id,
        owner=owner,
        recipient=first,
        kind=SHARE_KIND_SEED,
        share=bad,
    )
    commitments = rnd.server._commitments[owner][first]
    rnd.server._commitments[owner][first] = (seed_commit, commitments[1])
    with pytest.raises(ProtocolError, match=f"node {owner}"):
        rnd.server.unmask(responses)


# ---------------------------------------------------------------------------------------------
# What the coordinator sees: the masks are there and depend on the keys
# ---------------------------------------------------------------------------------------------


def _round_with_views(dim: int = 4096, bits: int = 32) -> tuple[Round, dict[int, X25519PrivateKey]]:
    def zeros_or_ramp(node: int, rng: np.random.Generator) -> U64:
        if node % 2:
            return np.zeros(dim, dtype=np.uint64)
        return (np.arange(dim, dtype=np.uint64) * np.uint64(node)) % np.uint64(2**bits)

    rnd = make_round(5, 3, bits=bits, dim=dim, seed=8, value_fn=zeros_or_ramp)
    rnd.setup()
    rnd.share_keys()
    mask_keys = _mask_keys_before_masking(rnd)
    rnd.masked_input(absent=[104])
    rnd.consistency()
    return rnd, mask_keys


def _uniform_pvalue(values: npt.NDArray[np.uint64], bits: int) -> float:
    top = ((values >> np.uint64(bits - 8)) & np.uint64(0xFF)).astype(np.int64)
    return float(chisquare(np.bincount(top, minlength=256)).pvalue)


def test_view_minus_self_mask_reveals_no_input() -> None:
    """After unmasking, each survivor's masked vector minus its reconstructed self mask is
    still uniformly masked (pairwise masks), and only the true mask key removes those masks."""
    rnd, mask_keys = _round_with_views()
    cfg = rnd.config
    responses = rnd.responses()
    total = rnd.server.unmask(responses)
    np.testing.assert_array_equal(total, rnd.expected())
    residues: dict[int, U64] = {}
    for u in rnd.survivors:
        shares = [responses[r][u] for r in sorted(responses)]
        residue = _minus(rnd.received[u], _self_mask(rnd, u, shares), cfg.bits)
        residues[u] = residue
        assert not np.any(residue == rnd.values[u]), f"survivor {u}: input visible"
        assert _uniform_pvalue(residue, cfg.bits) > 1e-4
        # The masks are exactly the key-derived pairwise masks with every other member of U2...
        peers = [n for n in rnd.routed if n != u]
        exact = _minus(residue, _pairwise_total(rnd, u, mask_keys[u], peers), cfg.bits)
        np.testing.assert_array_equal(exact, rnd.values[u])
        # ...and a mask computed with any other key does not remove them.
        wrong = _minus(
            residue, _pairwise_total(rnd, u, X25519PrivateKey.generate(), peers), cfg.bits
        )
        assert not np.any(wrong == rnd.values[u])
    # Summing fewer than all survivors' unmasked views does not give their input sum either
    # (their pairwise masks with the others remain), while all of them plus the dropped node's
    # recovered masks do (the sum above).
    for left_out in rnd.survivors:
        part = [u for u in rnd.survivors if u != left_out]
        partial = plain_sum((residues[u] for u in part), cfg.bits, cfg.dim)
        inputs = plain_sum((rnd.values[u] for u in part), cfg.bits, cfg.dim)
        assert np.mean(partial == inputs) < 0.01


def test_masks_depend_on_the_keys_and_the_session() -> None:
    key_a, key_b = bytes(range(32)), bytes(range(1, 33))
    nonce = prg_nonce("s")
    a = prg(key_a, nonce=nonce, dim=256, bits=64)
    np.testing.assert_array_equal(a, prg(key_a, nonce=nonce, dim=256, bits=64))
    assert np.mean(a == prg(key_b, nonce=nonce, dim=256, bits=64)) == 0
    assert np.mean(a == prg(key_a, nonce=prg_nonce("t"), dim=256, bits=64)) == 0
    # Pairwise masks: the two ends agree, a third key gives another mask.
    u_sk, v_sk, w_sk = (X25519PrivateKey.generate() for _ in range(3))
    pk = {n: k.public_key().public_bytes_raw() for n, k in (("u", u_sk), ("v", v_sk), ("w", w_sk))}

    def mask(sk: X25519PrivateKey, peer_pk: bytes, node: int, peer: int) -> U64:
        return pairwise_mask(sk, peer_pk, session_id="s", node=node, peer=peer, dim=64, bits=64)

    uv = mask(u_sk, pk["v"], 1, 2)
    np.testing.assert_array_equal(uv, mask(v_sk, pk["u"], 2, 1))
    assert np.mean(uv == mask(u_sk, pk["w"], 1, 2)) == 0
    assert np.mean(uv == mask(w_sk, pk["v"], 1, 2)) == 0


def test_one_masked_vector_is_independent_of_its_value() -> None:
    """The coordinator's view of one holder looks the same whatever the holder's input."""
    dim, bits = 8192, 32
    views = {}
    for fill in (0, 2**31 + 12345):
        rnd = make_round(
            3,
            2,
            bits=bits,
            dim=dim,
            seed=1,
            value_fn=lambda n, rng, fill=fill: np.full(dim, fill, dtype=np.uint64),
        )
        rnd.run()
        views[fill] = rnd.received[100]
    for view in views.values():
        assert _uniform_pvalue(view, bits) > 1e-4
        assert _uniform_pvalue(view & np.uint64(0xFF) << np.uint64(bits - 8), bits) > 1e-4
    # Both views are uniform; neither is near its input (a masked value equal to the input
    # in more than a handful of the 8192 places would show the mask missing).
    assert np.sum(views[0] == 0) < 5
    assert np.sum(views[2**31 + 12345] == 2**31 + 12345) < 5
