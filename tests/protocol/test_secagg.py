"""Tests of the secure-summation protocol (coordinator and clients in one process).

Correctness, input validation, stage order and state export. The attacks of an active
coordinator are in test_secagg_active.py; every dropout pattern in test_secagg_dropouts.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from flwr.app import ConfigRecord
from flwr.common.serde import config_record_from_proto, config_record_to_proto
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare
from secagg_harness import U64, Round, make_round, plain_sum, random_field

from fedsynth.protocol.errors import (
    ConfigError,
    DuplicateSubmissionError,
    FieldRangeError,
    KeyAuthenticationError,
    LateSubmissionError,
    ProtocolError,
    ShapeError,
    StageOrderError,
    TooFewParticipantsError,
)
from fedsynth.protocol.identity import HolderIdentity, Roster
from fedsynth.protocol.secagg import (
    CLIENT_STAGES,
    SERVER_STAGES,
    SHARE_BYTES,
    KeyShares,
    PublicKeys,
    SecAggClient,
    SecAggConfig,
    Stage,
    min_safe_threshold,
)

# ---------------------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------------------


@st.composite
def _scenarios(draw: st.DrawFn) -> tuple[SecAggConfig, dict[int, U64], list[int]]:
    k = draw(st.integers(3, 12))
    t = draw(st.integers(min_safe_threshold(k), k))
    bits = draw(st.sampled_from([32, 64]))
    dim = draw(st.integers(1, 64))
    ids = draw(st.lists(st.integers(0, 2**64 - 1), min_size=k, max_size=k, unique=True))
    dropped = draw(st.lists(st.sampled_from(ids), unique=True, max_size=k - t))
    pattern = draw(st.sampled_from(["random", "zeros", "max"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    top = np.uint64((1 << bits) - 1)
    values = {
        n: (
            random_field(rng, dim, bits)
            if pattern == "random"
            else np.full(dim, 0 if pattern == "zeros" else top, dtype=np.uint64)
        )
        for n in ids
    }
    cfg = SecAggConfig(
        session_id=f"hyp-{seed}", node_ids=tuple(ids), threshold=t, bits=bits, dim=dim
    )
    return cfg, values, dropped


@settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(scenario=_scenarios())
def test_sum_exact_with_dropouts_after_share_keys(
    scenario: tuple[SecAggConfig, dict[int, U64], list[int]],
) -> None:
    cfg, values, dropped = scenario
    rnd = Round(cfg, values)
    result = rnd.run(absent_masked=dropped)
    assert rnd.dropped == sorted(dropped)
    assert rnd.survivors == sorted(set(cfg.node_ids) - set(dropped))
    assert result.dtype == np.uint64
    np.testing.assert_array_equal(result, rnd.expected())
    assert rnd.server.stage == Stage.DONE


@pytest.mark.parametrize("drop", [None, 100, 101, 102])
def test_three_nodes_threshold_two_each_single_dropout(drop: int | None) -> None:
    rnd = make_round(3, 2, bits=32, dim=10, seed=7)
    result = rnd.run(absent_masked=[] if drop is None else [drop])
    expected_survivors = [n for n in (100, 101, 102) if n != drop]
    assert rnd.survivors == expected_survivors
    assert rnd.dropped == ([] if drop is None else [drop])
    np.testing.assert_array_equal(
        result, plain_sum((rnd.values[n] for n in expected_survivors), 32, 10)
    )


def test_unmask_with_more_than_threshold_responses_and_large_node_ids() -> None:
    ids = (2**64 - 1, 2**63, 0, 12345, 2**63 - 1)
    rnd = make_round(5, 3, bits=64, dim=32, seed=3, node_ids=ids)
    result = rnd.run(absent_masked=[0])
    np.testing.assert_array_equal(result, rnd.expected())


def test_stage_names_are_one_enum() -> None:
    assert [s.value for s in CLIENT_STAGES] == [
        "setup",
        "share_keys",
        "masked_input",
        "consistency",
        "unmask",
        "done",
    ]
    assert SERVER_STAGES == CLIENT_STAGES
    rnd = make_round(3)
    assert rnd.server.stage is Stage.SETUP and rnd.clients[100].stage is Stage.SETUP


# ---------------------------------------------------------------------------------------------
# Threshold violations
# ---------------------------------------------------------------------------------------------


def test_too_many_dropouts_at_masked_input() -> None:
    rnd = make_round(5, 3)
    rnd.setup()
    rnd.share_keys()
    for n in (100, 101):
        rnd.server.receive_masked_input(
            n, rnd.clients[n].masked_input(rnd.routed[n], rnd.values[n])
        )
    with pytest.raises(TooFewParticipantsError, match=r"2 masked inputs.*t=3"):
        rnd.server.close_masked_inputs()
    # The round stays open: a third input arrives and the sum is released.
    rnd.server.receive_masked_input(
        102, rnd.clients[102].masked_input(rnd.routed[102], rnd.values[102])
    )
    rnd.survivors, rnd.dropped = rnd.server.close_masked_inputs()
    assert rnd.dropped == [103, 104]
    for n in (103, 104):  # they computed their input but it never arrived
        rnd.clients[n].masked_input(rnd.routed[n], rnd.values[n])
    rnd.consistency()
    np.testing.assert_array_equal(rnd.server.unmask(rnd.responses()), rnd.expected())


def test_too_few_unmask_responses() -> None:
    rnd = make_round(5, 3, seed=2)
    rnd.setup()
    rnd.share_keys()
    rnd.masked_input(absent=[104])
    rnd.consistency()
    responses = rnd.responses()
    partial = {n: responses[n] for n in rnd.survivors[:2]}
    with pytest.raises(TooFewParticipantsError, match=r"2 survivors answered.*t=3"):
        rnd.server.unmask(partial)
    assert rnd.server.stage == Stage.UNMASK
    np.testing.assert_array_equal(rnd.server.unmask(responses), rnd.expected())


def test_too_few_keys_and_too_few_share_senders() -> None:
    rnd = make_round(5, 4)
    keys = {n: c.setup() for n, c in rnd.clients.items()}
    with pytest.raises(TooFewParticipantsError, match=r"3 nodes.*t=4"):
        rnd.server.receive_public_keys({n: keys[n] for n in (100, 101, 102)})
    with pytest.raises(TooFewParticipantsError):
        rnd.clients[100].share_keys({n: keys[n] for n in (100, 101, 102)})
    rnd.u1 = rnd.server.receive_public_keys(keys)
    outgoing = {n: rnd.clients[n].share_keys(rnd.u1) for n in (100, 101, 102)}
    with pytest.raises(TooFewParticipantsError, match=r"3 nodes shared keys"):
        rnd.server.route_shares(outgoing)
    # A client that hears from fewer than t - 1 others refuses to send a masked input.
    routed_small = {101: outgoing[101].ciphertexts[100], 102: outgoing[102].ciphertexts[100]}
    with pytest.raises(TooFewParticipantsError, match="threshold t=4"):
        rnd.clients[100].masked_input(routed_small, rnd.values[100])


def test_client_refuses_fewer_than_t_survivors() -> None:
    rnd = make_round(4, 3)
    rnd.setup()
    rnd.share_keys()
    rnd.masked_input()
    with pytest.raises(TooFewParticipantsError):
        rnd.clients[100].consistency([100, 101])
    assert rnd.clients[100].stage == Stage.CONSISTENCY


def test_too_few_consistency_signatures_stop_the_round() -> None:
    rnd = make_round(5, 3)
    rnd.setup()
    rnd.share_keys()
    rnd.masked_input()
    signed = {n: rnd.clients[n].consistency(rnd.survivors) for n in (100, 101)}
    with pytest.raises(TooFewParticipantsError, match=r"2 survivors signed.*t=3"):
        rnd.server.receive_signatures(signed)
    assert rnd.server.stage == Stage.CONSISTENCY


# ---------------------------------------------------------------------------------------------
# Privacy of individual vectors (see test_secagg_active.py for the key-dependence tests)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [32, 64])
def test_server_never_sees_unmasked_vectors(bits: int) -> None:
    rnd = make_round(6, 4, bits=bits, dim=16, seed=11)
    rnd.run(absent_masked=[101])
    assert set(rnd.received) == set(rnd.survivors)
    mask = (1 << bits) - 1
    for n, masked in rnd.received.items():
        value = rnd.values[n]
        assert not np.array_equal(masked, value)
        offset = [(int(m) - int(v)) & mask for m, v in zip(masked, value, strict=True)]
        assert any(offset)


def _chi_square_uniform(bytes_: npt.NDArray[np.uint64]) -> float:
    counts = np.bincount(bytes_.astype(np.int64), minlength=256)
    return float(chisquare(counts).pvalue)


@pytest.mark.parametrize("pattern", ["zeros", "constant"])
def test_masked_vector_is_indistinguishable_from_uniform(pattern: str) -> None:
    dim, bits = 20_000, 32

    def value_fn(node: int, rng: np.random.Generator) -> U64:
        fill = 0 if pattern == "zeros" else 0xDEADBEEF
        return np.full(dim, fill, dtype=np.uint64)

    rnd = make_round(3, 2, bits=bits, dim=dim, seed=5, value_fn=value_fn)
    rnd.run()
    for masked in rnd.received.values():
        assert int(masked.max()) < 2**bits
        top = (masked >> np.uint64(bits - 8)) & np.uint64(0xFF)
        low = masked & np.uint64(0xFF)
        assert _chi_square_uniform(top) > 1e-4
        assert _chi_square_uniform(low) > 1e-4


# ---------------------------------------------------------------------------------------------
# Faulty or malicious messages (the active attacks are in test_secagg_active.py)
# ---------------------------------------------------------------------------------------------


def _round_at_unmask(k: int = 4, t: int = 3, *, absent_masked: Iterable[int] = ()) -> Round:
    rnd = make_round(k, t)
    rnd.setup()
    rnd.share_keys()
    rnd.masked_input(absent=absent_masked)
    rnd.consistency()
    return rnd


def test_client_refuses_node_in_both_survivors_and_dropped() -> None:
    rnd = _round_at_unmask(absent_masked=[103])
    with pytest.raises(ProtocolError, match=r"\[101\].*both"):
        rnd.clients[100].unmask([100, 101, 102], [101, 103], signatures=rnd.signatures)
    # The refusal leaves the client able to answer an honest request.
    assert rnd.clients[100].stage == Stage.UNMASK
    shares = rnd.clients[100].unmask([100, 101, 102], [103], signatures=rnd.signatures)
    assert set(shares) == {100, 101, 102, 103}


@pytest.mark.parametrize(
    ("survivors", "dropped", "match"),
    [
        ([100, 101, 102, 999], [103], "not in U2"),
        ([101, 102], [100, 103], "both|differ from the survivor set"),
        ([100, 101, 102], [], "neither survivors nor dropped"),
        ([100, 100, 101, 102], [103], "more than once"),
    ],
)
def test_client_unmask_validates_lists(
    survivors: list[int], dropped: list[int], match: str
) -> None:
    rnd = _round_at_unmask(absent_masked=[103])
    with pytest.raises(ProtocolError, match=match):
        rnd.clients[100].unmask(survivors, dropped, signatures=rnd.signatures)


def test_client_answers_unmask_once() -> None:
    rnd = _round_at_unmask(absent_masked=[103])
    rnd.clients[100].unmask([100, 101, 102], [103], signatures=rnd.signatures)
    with pytest.raises(StageOrderError):
        rnd.clients[100].unmask([100, 101, 102, 103], [], signatures=rnd.signatures)


def test_client_signs_the_survivor_set_once() -> None:
    rnd = make_round(4, 3)
    rnd.setup()
    rnd.share_keys()
    rnd.masked_input()
    rnd.clients[100].consistency(rnd.survivors)
    with pytest.raises(StageOrderError, match="consistency"):
        rnd.clients[100].consistency(rnd.survivors[:3])


def test_tampered_ciphertext_is_rejected() -> None:
    rnd = make_round(4, 3)
    rnd.setup()
    rnd.share_keys()
    cts = dict(rnd.routed[100])
    bad = bytearray(cts[101])
    bad[20] ^= 0x01
    cts[101] = bytes(bad)
    with pytest.raises(ProtocolError, match="node 101 to node 100 failed authentication"):
        rnd.clients[100].masked_input(cts, rnd.values[100])
    assert rnd.clients[100].stage == Stage.MASKED_INPUT


def test_misrouted_ciphertext_is_rejected() -> None:
    rnd = make_round(4, 3)
    rnd.setup()
    rnd.share_keys()
    # The ciphertext 101 -> 102 delivered to 100 as if it came from 101.
    cts = dict(rnd.routed[100])
    cts[101] = rnd.routed[102][101]
    with pytest.raises(ProtocolError, match="failed authentication"):
        rnd.clients[100].masked_input(cts, rnd.values[100])
    # The ciphertext 101 -> 100 relabelled as coming from 102.
    cts = dict(rnd.routed[100])
    cts[102] = rnd.routed[100][101]
    with pytest.raises(ProtocolError, match="failed authentication"):
        rnd.clients[100].masked_input(cts, rnd.values[100])


def test_server_discards_malformed_unmask_responses() -> None:
    rnd = _round_at_unmask(5, 3, absent_masked=[104])
    responses = rnd.responses()
    assert len(responses) == 4
    bad: dict[int, Any] = {r: dict(s) for r, s in responses.items()}
    bad[100][101], bad[101][101] = bad[101][101], bad[100][101]  # swapped share indices
    del bad[102][104]  # incomplete
    bad[103] = "not a mapping"
    bad[104] = responses[100]  # not a signer: ignored
    with pytest.raises(TooFewParticipantsError, match=r"valid shares per node.*t=3"):
        rnd.server.unmask(bad)
    rejected = rnd.server.rejected
    assert "Shamir index" in rejected[100] and "Shamir index" in rejected[101]
    assert "share of node 104" in rejected[102]
    assert "not a mapping" in rejected[103]
    assert 104 not in rejected
    short = {r: dict(s) for r, s in responses.items()}
    short[100][101] = short[100][101][: SHARE_BYTES - 1]
    # Three complete responses remain: the round finishes without the short share.
    np.testing.assert_array_equal(rnd.server.unmask(short), rnd.expected())


def test_server_drops_bad_public_keys() -> None:
    rnd = make_round(5, 3)
    keys = {n: c.setup() for n, c in rnd.clients.items()}
    copied = dict(keys)
    # Node 101 announces 100's mask key under its own valid signature: both are dropped,
    # since the coordinator cannot tell which of them copied.
    forged = PublicKeys(
        enc_pk=keys[101].enc_pk,
        mask_pk=keys[100].mask_pk,
        name=keys[101].name,
        sign_pk=keys[101].sign_pk,
        signature=rnd.identities[101].sign(
            PublicKeys(
                enc_pk=keys[101].enc_pk,
                mask_pk=keys[100].mask_pk,
                name=keys[101].name,
                sign_pk=keys[101].sign_pk,
                signature=b"",
            ).message(node=101, config=rnd.config)
        ),
    )
    copied[101] = forged
    copied[7] = keys[102]  # a stranger: ignored
    u1 = rnd.server.receive_public_keys(copied)
    assert sorted(u1) == [102, 103, 104]
    assert set(rnd.server.rejected) == {100, 101}
    with pytest.raises(ProtocolError, match="expected 32"):
        PublicKeys(
            enc_pk=b"x" * 31, mask_pk=keys[100].mask_pk, name="a", sign_pk=b"k" * 32, signature=b""
        )
    with pytest.raises(ProtocolError, match="low-order"):
        PublicKeys(
            enc_pk=bytes(32), mask_pk=keys[100].mask_pk, name="a", sign_pk=b"k" * 32, signature=b""
        )


def test_client_rejects_altered_own_keys() -> None:
    rnd = make_round(4, 3)
    keys = {n: c.setup() for n, c in rnd.clients.items()}
    forged = dict(keys)
    forged[100] = keys[101]
    forged[101] = keys[100]
    with pytest.raises(ProtocolError, match="lacks or alters this node's keys"):
        rnd.clients[100].share_keys(forged)
    without_self = {n: k for n, k in keys.items() if n != 100}
    with pytest.raises(ProtocolError, match="lacks or alters"):
        rnd.clients[100].share_keys(without_self)
    assert rnd.clients[100].stage == Stage.SHARE_KEYS


def test_server_route_shares_drops_bad_senders() -> None:
    rnd = make_round(4, 3)
    rnd.setup(absent=[103])
    outgoing = {n: rnd.clients[n].share_keys(rnd.u1) for n in rnd.u1}
    assert set(outgoing[100].commitments) == {100, 101, 102}
    missing = dict(outgoing)
    missing[100] = KeyShares(
        ciphertexts={101: outgoing[100].ciphertexts[101]}, commitments=outgoing[100].commitments
    )
    short_commit = dict(outgoing[101].commitments)
    short_commit[101] = short_commit[101][:10]
    missing[101] = KeyShares(ciphertexts=outgoing[101].ciphertexts, commitments=short_commit)
    missing[103] = outgoing[102]  # not in U1: ignored
    with pytest.raises(TooFewParticipantsError, match="1 nodes shared keys"):
        rnd.server.route_shares(missing)
    rejected = rnd.server.rejected
    assert "expected U1 minus itself" in rejected[100]
    assert "bytes, expected 64" in rejected[101]
    routed = rnd.server.route_shares(outgoing)
    assert set(routed) == {100, 101, 102}
    assert set(routed[100]) == {101, 102}


# ---------------------------------------------------------------------------------------------
# Stage order and submission errors
# ---------------------------------------------------------------------------------------------


def test_client_stage_order() -> None:
    rnd = make_round(3, 2)
    client = rnd.clients[100]
    assert client.stage == "setup"
    with pytest.raises(StageOrderError, match=r"share_keys\(\) called in stage 'setup'"):
        client.share_keys({})
    with pytest.raises(StageOrderError, match="expected stage 'masked_input'"):
        client.masked_input({}, rnd.values[100])
    with pytest.raises(StageOrderError, match="expected stage 'consistency'"):
        client.consistency([100])
    with pytest.raises(StageOrderError):
        client.unmask([100], [], signatures={})
    client.setup()
    with pytest.raises(StageOrderError, match="expected stage 'setup'"):
        client.setup()


def test_server_stage_order() -> None:
    rnd = make_round(3, 2)
    server = rnd.server
    assert server.stage == "setup"
    with pytest.raises(StageOrderError, match="expected stage 'share_keys'"):
        server.route_shares({})
    with pytest.raises(StageOrderError):
        server.receive_masked_input(100, rnd.values[100])
    with pytest.raises(StageOrderError):
        server.close_masked_inputs()
    with pytest.raises(StageOrderError, match="expected stage 'consistency'"):
        server.receive_signatures({})
    with pytest.raises(StageOrderError, match="expected stage 'unmask'"):
        server.unmask({})
    rnd.setup()
    with pytest.raises(StageOrderError, match="expected stage 'setup'"):
        server.receive_public_keys(rnd.u1)


def test_submission_errors() -> None:
    rnd = make_round(4, 3, bits=32, dim=8)
    rnd.setup()
    rnd.share_keys()
    masked = {n: rnd.clients[n].masked_input(rnd.routed[n], rnd.values[n]) for n in rnd.routed}
    server = rnd.server
    server.receive_masked_input(100, masked[100])
    with pytest.raises(DuplicateSubmissionError, match="node 100"):
        server.receive_masked_input(100, masked[100])
    with pytest.raises(ProtocolError, match="not in U2"):
        server.receive_masked_input(7, masked[101])
    with pytest.raises(ShapeError, match=r"shape \(7,\), expected \(8,\)"):
        server.receive_masked_input(101, masked[101][:7])
    with pytest.raises(ShapeError, match="uint64"):
        server.receive_masked_input(101, masked[101].astype(np.int64))
    too_big = masked[101].copy()
    too_big[3] = np.uint64(2**32)
    with pytest.raises(FieldRangeError, match="4294967296"):
        server.receive_masked_input(101, too_big)
    server.receive_masked_input(101, masked[101])
    server.receive_masked_input(102, masked[102])
    rnd.survivors, rnd.dropped = server.close_masked_inputs()
    assert rnd.dropped == [103]
    with pytest.raises(LateSubmissionError, match="node 103"):
        server.receive_masked_input(103, masked[103])
    rnd.consistency()
    np.testing.assert_array_equal(server.unmask(rnd.responses()), rnd.expected())


def test_client_validates_value() -> None:
    rnd = make_round(3, 2, bits=32, dim=4)
    rnd.setup()
    rnd.share_keys()
    client = rnd.clients[100]
    with pytest.raises(ShapeError):
        client.masked_input(rnd.routed[100], np.zeros(5, dtype=np.uint64))
    with pytest.raises(FieldRangeError):
        client.masked_input(rnd.routed[100], np.full(4, 2**32, dtype=np.uint64))
    with pytest.raises(ProtocolError, match="not in U1"):
        client.masked_input({**rnd.routed[100], 555: b"x"}, rnd.values[100])
    assert client.stage == Stage.MASKED_INPUT
    client.masked_input(rnd.routed[100], rnd.values[100])


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 1}, r"threshold t=1.*K=4"),
        ({"threshold": 5}, r"threshold t=5.*K=4"),
        ({"node_ids": (1, 2, 2, 3)}, "distinct"),
        ({"node_ids": (1,), "threshold": 2}, "at least 2"),
        ({"node_ids": (1, -2, 3)}, r"node_ids\[1\]=-2"),
        ({"node_ids": (1, 2, 2**64)}, r"node_ids\[2\]"),
        ({"bits": 8}, "bits=8"),
        ({"dim": 0}, "dim=0"),
        ({"session_id": ""}, "session_id"),
    ],
)
def test_config_validation(kwargs: dict[str, Any], match: str) -> None:
    base: dict[str, Any] = {
        "session_id": "s",
        "node_ids": (1, 2, 3, 4),
        "threshold": 3,
        "bits": 32,
        "dim": 3,
    }
    base.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        SecAggConfig(**base)


def test_config_dict_round_trip() -> None:
    cfg = SecAggConfig(session_id="r-1", node_ids=(5, 2**64 - 1, 3), threshold=2, bits=48, dim=9)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert SecAggConfig.from_dict(data) == cfg
    assert SecAggConfig.from_dict(data).digest() == cfg.digest()
    other = SecAggConfig(session_id="r-1", node_ids=(5, 2**64 - 1, 3), threshold=3, bits=48, dim=9)
    assert other.digest() != cfg.digest()
    with pytest.raises(ConfigError, match="missing"):
        SecAggConfig.from_dict({"session_id": "x"})
    as_list: Any = [1, 2, 3]
    assert SecAggConfig("s", as_list, 2, 32, 1).node_ids == (1, 2, 3)


def test_client_requires_membership() -> None:
    rnd = make_round(3, 2, node_ids=(1, 2, 3))
    with pytest.raises(ConfigError, match="node_id=9"):
        SecAggClient(9, rnd.config, identity=rnd.identities[1], roster=rnd.roster)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# State export
# ---------------------------------------------------------------------------------------------


def _through_config_record(state: Mapping[str, object]) -> dict[str, object]:
    """Round-trip a state through a Flower ConfigRecord and its protobuf form."""
    record = ConfigRecord(dict(state))  # type: ignore[arg-type]
    return dict(config_record_from_proto(config_record_to_proto(record)))


@pytest.mark.parametrize("restore_at", ["share_keys", "masked_input", "consistency", "unmask"])
def test_export_state_round_trip(restore_at: str) -> None:
    ids = (3, 2**64 - 2, 17, 2**63 + 5)
    rnd = make_round(4, 3, bits=64, dim=12, seed=9, node_ids=ids)

    def restore_all() -> None:
        for n in list(rnd.clients):
            state = rnd.clients[n].export_state()
            assert not any(
                isinstance(v, bytes) and rnd.identities[n].public_key in v for v in state.values()
            )
            rnd.clients[n] = SecAggClient.from_state(
                _through_config_record(state),
                identity=rnd.identities[n],
                roster=rnd.roster,  # type: ignore[arg-type]
            )
            # The dropped node never signs, so it stays in the consistency stage.
            expected = "consistency" if restore_at == "unmask" and n == 17 else restore_at
            assert rnd.clients[n].stage == expected

    rnd.setup()
    if restore_at == "share_keys":
        restore_all()
    rnd.share_keys()
    if restore_at == "masked_input":
        restore_all()
    rnd.masked_input(absent=[17])
    if restore_at == "consistency":
        restore_all()
    rnd.consistency()
    if restore_at == "unmask":
        restore_all()
    result = rnd.server.unmask(rnd.responses())
    np.testing.assert_array_equal(result, rnd.expected())


def test_from_state_rejects_malformed() -> None:
    rnd = make_round(3, 2)
    rnd.setup()
    rnd.share_keys()
    state = rnd.clients[100].export_state()
    ident, roster = rnd.identities[100], rnd.roster
    assert roster is not None

    def restore(data: Mapping[str, object]) -> SecAggClient:
        return SecAggClient.from_state(data, identity=ident, roster=roster)

    for key in ("mask_sk", "stage", "share_owners", "u1_signatures"):
        broken = {k: v for k, v in state.items() if k != key}
        with pytest.raises(ProtocolError, match=key):
            restore(broken)
    with pytest.raises(ProtocolError, match="stage"):
        restore({**state, "stage": "bogus"})
    with pytest.raises(ProtocolError, match="b_seed"):
        restore({**state, "b_seed": b"short"})
    other = rnd.clients[101].export_state()
    with pytest.raises(ProtocolError, match="do not match"):
        restore({**state, "enc_sk": other["enc_sk"]})
    # A state whose key set the pinned roster does not vouch for is refused.
    moved = Roster({**roster.members, "holder-101": HolderIdentity.generate("x").public_key})
    with pytest.raises(KeyAuthenticationError, match="node 101"):
        SecAggClient.from_state(state, identity=ident, roster=moved)


def test_keys_signed_under_other_task_terms_are_refused() -> None:
    """One session id, one node set and t, but a victim holding other task terms (another
    manifest): it refuses the peers' keys, and the peers refuse its key."""
    rnd = make_round(3, 2)
    victim = rnd.config.node_ids[0]
    other = dataclasses.replace(rnd.config, terms="ab" * 32)
    assert other.digest() != rnd.config.digest()
    rnd.clients[victim] = SecAggClient(
        victim, other, identity=rnd.identities[victim], roster=rnd.roster
    )
    keys = {n: c.setup() for n, c in rnd.clients.items()}
    with pytest.raises(KeyAuthenticationError, match="signature"):
        rnd.clients[victim].share_keys(keys)
    peer = rnd.config.node_ids[1]
    with pytest.raises(KeyAuthenticationError, match=f"node {victim}"):
        rnd.clients[peer].share_keys(keys)
    # The state a holder persists between stages keeps its terms.
    restored = SecAggClient.from_state(
        rnd.clients[victim].export_state(), identity=rnd.identities[victim], roster=rnd.roster
    )
    assert restored.config.terms == "ab" * 32
