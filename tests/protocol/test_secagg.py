"""Tests of the secure-summation protocol (coordinator and clients in one process)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from flwr.app import ConfigRecord
from flwr.common.serde import config_record_from_proto, config_record_to_proto
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from fedsynth.protocol.errors import (
    ConfigError,
    DuplicateSubmissionError,
    FieldRangeError,
    LateSubmissionError,
    ProtocolError,
    ShapeError,
    StageOrderError,
    TooFewParticipantsError,
)
from fedsynth.protocol.secagg import (
    SHARE_BYTES,
    PublicKeys,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
)

U64 = npt.NDArray[np.uint64]


def _random_field(rng: np.random.Generator, dim: int, bits: int) -> U64:
    return rng.integers(0, 2**bits, size=dim, dtype=np.uint64, endpoint=False)


def _plain_sum(values: Iterable[U64], bits: int, dim: int) -> U64:
    total = [0] * dim
    for vec in values:
        total = [t + int(v) for t, v in zip(total, vec, strict=True)]
    return np.array([t % (1 << bits) for t in total], dtype=np.uint64)


@dataclass
class Round:
    """One session driven step by step, recording what the coordinator receives."""

    config: SecAggConfig
    values: dict[int, U64]
    clients: dict[int, SecAggClient] = field(default_factory=dict)
    server: SecAggServer = field(init=False)
    u1: dict[int, PublicKeys] = field(default_factory=dict)
    routed: dict[int, dict[int, bytes]] = field(default_factory=dict)
    received: dict[int, U64] = field(default_factory=dict)
    survivors: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.server = SecAggServer(self.config)
        self.clients = {n: SecAggClient(n, self.config) for n in self.config.node_ids}

    def setup(self, absent: Iterable[int] = ()) -> None:
        skip = set(absent)
        keys = {n: c.setup() for n, c in self.clients.items() if n not in skip}
        self.u1 = self.server.receive_public_keys(keys)

    def share_keys(self, absent: Iterable[int] = ()) -> None:
        skip = set(absent)
        outgoing = {n: self.clients[n].share_keys(self.u1) for n in self.u1 if n not in skip}
        self.routed = self.server.route_shares(outgoing)

    def masked_input(self, absent: Iterable[int] = ()) -> None:
        skip = set(absent)
        for n, cts in self.routed.items():
            masked = self.clients[n].masked_input(cts, self.values[n])
            if n not in skip:
                self.received[n] = masked.copy()
                self.server.receive_masked_input(n, masked)
        self.survivors, self.dropped = self.server.close_masked_inputs()

    def responses(self, absent: Iterable[int] = ()) -> dict[int, dict[int, bytes]]:
        skip = set(absent)
        return {
            n: self.clients[n].unmask(self.survivors, self.dropped)
            for n in self.survivors
            if n not in skip
        }

    def run(
        self,
        *,
        absent_setup: Iterable[int] = (),
        absent_share: Iterable[int] = (),
        absent_masked: Iterable[int] = (),
        absent_unmask: Iterable[int] = (),
    ) -> U64:
        self.setup(absent_setup)
        self.share_keys(absent_share)
        self.masked_input(absent_masked)
        result: U64 = self.server.unmask(self.responses(absent_unmask))
        return result

    def expected(self) -> U64:
        return _plain_sum(
            (self.values[n] for n in self.survivors), self.config.bits, self.config.dim
        )


def _make_round(
    k: int,
    t: int,
    *,
    bits: int = 32,
    dim: int = 8,
    seed: int = 0,
    node_ids: tuple[int, ...] | None = None,
    value_fn: Callable[[int, np.random.Generator], U64] | None = None,
) -> Round:
    ids = node_ids if node_ids is not None else tuple(range(100, 100 + k))
    cfg = SecAggConfig(session_id=f"test-{seed}", node_ids=ids, threshold=t, bits=bits, dim=dim)
    rng = np.random.default_rng(seed)
    values = {
        n: (value_fn(n, rng) if value_fn is not None else _random_field(rng, dim, bits))
        for n in ids
    }
    return Round(cfg, values)


# ---------------------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------------------


@st.composite
def _scenarios(draw: st.DrawFn) -> tuple[SecAggConfig, dict[int, U64], list[int]]:
    k = draw(st.integers(3, 20))
    t = draw(st.integers(2, k))
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
            _random_field(rng, dim, bits)
            if pattern == "random"
            else np.full(dim, 0 if pattern == "zeros" else top, dtype=np.uint64)
        )
        for n in ids
    }
    cfg = SecAggConfig(
        session_id=f"hyp-{seed}", node_ids=tuple(ids), threshold=t, bits=bits, dim=dim
    )
    return cfg, values, dropped


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
    assert rnd.server.stage == "done"


@st.composite
def _staged_dropouts(draw: st.DrawFn) -> tuple[int, int, dict[str, list[int]]]:
    k = draw(st.integers(3, 10))
    t = draw(st.integers(2, k))
    ids = list(range(100, 100 + k))
    # Each node drops at most once, at one stage; at least t answer the unmask round.
    stages = draw(
        st.lists(
            st.sampled_from(["none", "setup", "share", "masked", "unmask"]), min_size=k, max_size=k
        )
    )
    stages = list(stages)
    for i in range(k):
        if sum(s == "none" for s in stages) >= t:
            break
        stages[i] = "none"
    plan: dict[str, list[int]] = {s: [] for s in ("setup", "share", "masked", "unmask")}
    for node, stage in zip(ids, stages, strict=True):
        if stage != "none":
            plan[stage].append(node)
    return k, t, plan


@settings(max_examples=15, deadline=None)
@given(case=_staged_dropouts(), seed=st.integers(0, 2**16))
def test_sum_exact_with_dropouts_at_every_stage(
    case: tuple[int, int, dict[str, list[int]]], seed: int
) -> None:
    k, t, plan = case
    rnd = _make_round(k, t, bits=64, dim=16, seed=seed)
    result = rnd.run(
        absent_setup=plan["setup"],
        absent_share=plan["share"],
        absent_masked=plan["masked"],
        absent_unmask=plan["unmask"],
    )
    assert set(rnd.survivors).isdisjoint(plan["setup"] + plan["share"] + plan["masked"])
    assert rnd.dropped == sorted(plan["masked"])
    np.testing.assert_array_equal(result, rnd.expected())


@pytest.mark.parametrize("drop", [None, 100, 101, 102])
def test_three_nodes_threshold_two_each_single_dropout(drop: int | None) -> None:
    rnd = _make_round(3, 2, bits=32, dim=10, seed=7)
    result = rnd.run(absent_masked=[] if drop is None else [drop])
    expected_survivors = [n for n in (100, 101, 102) if n != drop]
    assert rnd.survivors == expected_survivors
    assert rnd.dropped == ([] if drop is None else [drop])
    np.testing.assert_array_equal(
        result, _plain_sum((rnd.values[n] for n in expected_survivors), 32, 10)
    )


def test_unmask_with_more_than_threshold_responses_and_large_node_ids() -> None:
    ids = (2**64 - 1, 2**63, 0, 12345, 2**63 - 1)
    rnd = _make_round(5, 3, bits=64, dim=32, seed=3, node_ids=ids)
    result = rnd.run(absent_masked=[0])
    np.testing.assert_array_equal(result, rnd.expected())


# ---------------------------------------------------------------------------------------------
# Threshold violations
# ---------------------------------------------------------------------------------------------


def test_too_many_dropouts_at_masked_input() -> None:
    rnd = _make_round(5, 3)
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
    np.testing.assert_array_equal(rnd.server.unmask(rnd.responses()), rnd.expected())


def test_too_few_unmask_responses() -> None:
    rnd = _make_round(5, 3, seed=2)
    rnd.setup()
    rnd.share_keys()
    rnd.masked_input(absent=[104])
    responses = rnd.responses()
    partial = {n: responses[n] for n in rnd.survivors[:2]}
    with pytest.raises(TooFewParticipantsError, match=r"2 survivors answered.*t=3"):
        rnd.server.unmask(partial)
    assert rnd.server.stage == "unmask"
    np.testing.assert_array_equal(rnd.server.unmask(responses), rnd.expected())


def test_too_few_keys_and_too_few_share_senders() -> None:
    rnd = _make_round(5, 4)
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
    routed_small = {101: outgoing[101][100], 102: outgoing[102][100]}
    with pytest.raises(TooFewParticipantsError, match="threshold t=4"):
        rnd.clients[100].masked_input(routed_small, rnd.values[100])


def test_client_refuses_fewer_than_t_survivors() -> None:
    rnd = _make_round(4, 3)
    rnd.setup()
    rnd.share_keys()
    rnd.masked_input()
    with pytest.raises(TooFewParticipantsError):
        rnd.clients[100].unmask([100, 101], [102, 103])


# ---------------------------------------------------------------------------------------------
# Privacy of individual vectors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [32, 64])
def test_server_never_sees_unmasked_vectors(bits: int) -> None:
    rnd = _make_round(6, 4, bits=bits, dim=16, seed=11)
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

    rnd = _make_round(3, 2, bits=bits, dim=dim, seed=5, value_fn=value_fn)
    rnd.run()
    for masked in rnd.received.values():
        assert int(masked.max()) < 2**bits
        top = (masked >> np.uint64(bits - 8)) & np.uint64(0xFF)
        low = masked & np.uint64(0xFF)
        assert _chi_square_uniform(top) > 1e-4
        assert _chi_square_uniform(low) > 1e-4


# ---------------------------------------------------------------------------------------------
# Malicious or buggy coordinator / clients
# ---------------------------------------------------------------------------------------------


def _round_at_unmask(k: int = 4, t: int = 2, *, absent_masked: Iterable[int] = ()) -> Round:
    rnd = _make_round(k, t)
    rnd.setup()
    rnd.share_keys()
    rnd.masked_input(absent=absent_masked)
    return rnd


def test_client_refuses_node_in_both_survivors_and_dropped() -> None:
    rnd = _round_at_unmask(absent_masked=[103])
    with pytest.raises(ProtocolError, match=r"\[101\].*both"):
        rnd.clients[100].unmask([100, 101, 102], [101, 103])
    # The refusal leaves the client able to answer an honest request.
    assert rnd.clients[100].stage == "unmask"
    shares = rnd.clients[100].unmask([100, 101, 102], [103])
    assert set(shares) == {100, 101, 102, 103}


@pytest.mark.parametrize(
    ("survivors", "dropped", "match"),
    [
        ([100, 101, 102, 999], [103], "not in U2"),
        ([101, 102], [100, 103], "both|not listed among the survivors"),
        ([100, 101, 102], [], "neither survivors nor dropped"),
        ([100, 100, 101, 102], [103], "more than once"),
    ],
)
def test_client_unmask_validates_lists(
    survivors: list[int], dropped: list[int], match: str
) -> None:
    rnd = _round_at_unmask(absent_masked=[103])
    with pytest.raises(ProtocolError, match=match):
        rnd.clients[100].unmask(survivors, dropped)


def test_client_answers_unmask_once() -> None:
    rnd = _round_at_unmask(absent_masked=[103])
    rnd.clients[100].unmask([100, 101, 102], [103])
    with pytest.raises(StageOrderError):
        rnd.clients[100].unmask([100, 101, 102, 103], [])


def test_tampered_ciphertext_is_rejected() -> None:
    rnd = _make_round(4, 3)
    rnd.setup()
    rnd.share_keys()
    cts = dict(rnd.routed[100])
    bad = bytearray(cts[101])
    bad[20] ^= 0x01
    cts[101] = bytes(bad)
    with pytest.raises(ProtocolError, match="node 101 to node 100 failed authentication"):
        rnd.clients[100].masked_input(cts, rnd.values[100])
    assert rnd.clients[100].stage == "masked_input"


def test_misrouted_ciphertext_is_rejected() -> None:
    rnd = _make_round(4, 3)
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


def test_tampered_unmask_share_names_owner() -> None:
    rnd = _round_at_unmask(5, 3, absent_masked=[104])
    responses = rnd.responses()
    first = min(responses)
    for owner in (102, 104):  # a survivor's b-share and a dropped node's key share
        tampered = {r: dict(s) for r, s in responses.items()}
        share = bytearray(tampered[first][owner])
        share[10] ^= 0x40  # inside the first 16-byte chunk, after the 4-byte index
        tampered[first][owner] = bytes(share)
        with pytest.raises(ProtocolError, match=f"node {owner}"):
            rnd.server.unmask(tampered)
    np.testing.assert_array_equal(rnd.server.unmask(responses), rnd.expected())


def test_server_checks_unmask_responses() -> None:
    rnd = _round_at_unmask(5, 3, absent_masked=[104])
    responses = rnd.responses()
    bad = {r: dict(s) for r, s in responses.items()}
    bad[100][101], bad[101][101] = bad[101][101], bad[100][101]  # swapped share indices
    with pytest.raises(ProtocolError, match="Shamir index"):
        rnd.server.unmask(bad)
    incomplete = {r: dict(s) for r, s in responses.items()}
    del incomplete[100][104]
    with pytest.raises(ProtocolError, match="covers"):
        rnd.server.unmask(incomplete)
    stranger = {**responses, 104: responses[100]}
    with pytest.raises(ProtocolError, match="not a survivor"):
        rnd.server.unmask(stranger)
    short = {r: dict(s) for r, s in responses.items()}
    short[100][101] = short[100][101][: SHARE_BYTES - 1]
    with pytest.raises(ProtocolError, match="bytes"):
        rnd.server.unmask(short)


def test_server_rejects_bad_public_keys() -> None:
    rnd = _make_round(4, 2)
    keys = {n: c.setup() for n, c in rnd.clients.items()}
    with pytest.raises(ProtocolError, match="node 7 is not a participant"):
        rnd.server.receive_public_keys({**keys, 7: keys[100]})
    copied = dict(keys)
    copied[101] = PublicKeys(enc_pk=keys[101].enc_pk, mask_pk=keys[100].mask_pk)
    with pytest.raises(ProtocolError, match="already used by node 100"):
        rnd.server.receive_public_keys(copied)
    with pytest.raises(ProtocolError, match="expected 32"):
        PublicKeys(enc_pk=b"x" * 31, mask_pk=b"y" * 32)
    assert rnd.server.stage == "public_keys"


def test_client_rejects_altered_own_keys() -> None:
    rnd = _make_round(4, 2)
    keys = {n: c.setup() for n, c in rnd.clients.items()}
    forged = dict(keys)
    forged[100] = keys[101]
    forged[101] = PublicKeys(enc_pk=keys[100].enc_pk, mask_pk=keys[100].mask_pk)
    with pytest.raises(ProtocolError, match="alters this node's keys"):
        rnd.clients[100].share_keys(forged)
    without_self = {n: k for n, k in keys.items() if n != 100}
    with pytest.raises(ProtocolError, match="lacks or alters"):
        rnd.clients[100].share_keys(without_self)


def test_server_route_shares_validates_senders() -> None:
    rnd = _make_round(4, 2)
    rnd.setup(absent=[103])
    outgoing = {n: rnd.clients[n].share_keys(rnd.u1) for n in rnd.u1}
    with pytest.raises(ProtocolError, match="not in U1"):
        rnd.server.route_shares({**outgoing, 103: outgoing[100]})
    missing = {n: dict(v) for n, v in outgoing.items()}
    del missing[100][101]
    with pytest.raises(ProtocolError, match="expected U1 minus itself"):
        rnd.server.route_shares(missing)
    routed = rnd.server.route_shares({n: outgoing[n] for n in (100, 101)})
    assert set(routed) == {100, 101}
    assert set(routed[100]) == {101}


# ---------------------------------------------------------------------------------------------
# Stage order and submission errors
# ---------------------------------------------------------------------------------------------


def test_client_stage_order() -> None:
    rnd = _make_round(3, 2)
    client = rnd.clients[100]
    assert client.stage == "setup"
    with pytest.raises(StageOrderError, match=r"share_keys\(\) called in stage 'setup'"):
        client.share_keys({})
    with pytest.raises(StageOrderError, match="expected stage 'masked_input'"):
        client.masked_input({}, rnd.values[100])
    with pytest.raises(StageOrderError):
        client.unmask([100], [])
    client.setup()
    with pytest.raises(StageOrderError, match="expected stage 'setup'"):
        client.setup()


def test_server_stage_order() -> None:
    rnd = _make_round(3, 2)
    server = rnd.server
    assert server.stage == "public_keys"
    with pytest.raises(StageOrderError, match="expected stage 'route_shares'"):
        server.route_shares({})
    with pytest.raises(StageOrderError):
        server.receive_masked_input(100, rnd.values[100])
    with pytest.raises(StageOrderError):
        server.close_masked_inputs()
    with pytest.raises(StageOrderError, match="expected stage 'unmask'"):
        server.unmask({})
    rnd.setup()
    with pytest.raises(StageOrderError, match="expected stage 'public_keys'"):
        server.receive_public_keys(rnd.u1)


def test_submission_errors() -> None:
    rnd = _make_round(4, 2, bits=32, dim=8)
    rnd.setup()
    rnd.share_keys(absent=[103])
    masked = {n: rnd.clients[n].masked_input(rnd.routed[n], rnd.values[n]) for n in rnd.routed}
    server = rnd.server
    server.receive_masked_input(100, masked[100])
    with pytest.raises(DuplicateSubmissionError, match="node 100"):
        server.receive_masked_input(100, masked[100])
    with pytest.raises(ProtocolError, match="not in U2"):
        server.receive_masked_input(103, masked[101])
    with pytest.raises(ShapeError, match=r"shape \(7,\), expected \(8,\)"):
        server.receive_masked_input(101, masked[101][:7])
    with pytest.raises(ShapeError, match="uint64"):
        server.receive_masked_input(101, masked[101].astype(np.int64))
    too_big = masked[101].copy()
    too_big[3] = np.uint64(2**32)
    with pytest.raises(FieldRangeError, match="4294967296"):
        server.receive_masked_input(101, too_big)
    server.receive_masked_input(101, masked[101])
    rnd.survivors, rnd.dropped = server.close_masked_inputs()
    assert rnd.dropped == [102]
    with pytest.raises(LateSubmissionError, match="node 102"):
        server.receive_masked_input(102, masked[102])
    np.testing.assert_array_equal(server.unmask(rnd.responses()), rnd.expected())


def test_client_validates_value() -> None:
    rnd = _make_round(3, 2, bits=32, dim=4)
    rnd.setup()
    rnd.share_keys()
    client = rnd.clients[100]
    with pytest.raises(ShapeError):
        client.masked_input(rnd.routed[100], np.zeros(5, dtype=np.uint64))
    with pytest.raises(FieldRangeError):
        client.masked_input(rnd.routed[100], np.full(4, 2**32, dtype=np.uint64))
    with pytest.raises(ProtocolError, match="not in U1"):
        client.masked_input({**rnd.routed[100], 555: b"x"}, rnd.values[100])
    assert client.stage == "masked_input"
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
        "threshold": 2,
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
    with pytest.raises(ConfigError, match="missing"):
        SecAggConfig.from_dict({"session_id": "x"})
    as_list: Any = [1, 2, 3]
    assert SecAggConfig("s", as_list, 2, 32, 1).node_ids == (1, 2, 3)


def test_client_requires_membership() -> None:
    cfg = SecAggConfig(session_id="s", node_ids=(1, 2, 3), threshold=2, bits=32, dim=1)
    with pytest.raises(ConfigError, match="node_id=9"):
        SecAggClient(9, cfg)


# ---------------------------------------------------------------------------------------------
# State export
# ---------------------------------------------------------------------------------------------


def _through_config_record(state: Mapping[str, object]) -> dict[str, object]:
    """Round-trip a state through a Flower ConfigRecord and its protobuf form."""
    record = ConfigRecord(dict(state))  # type: ignore[arg-type]
    return dict(config_record_from_proto(config_record_to_proto(record)))


@pytest.mark.parametrize("restore_at", ["share_keys", "masked_input", "unmask"])
def test_export_state_round_trip(restore_at: str) -> None:
    ids = (3, 2**64 - 2, 17, 2**63 + 5)
    rnd = _make_round(4, 3, bits=64, dim=12, seed=9, node_ids=ids)

    def restore_all() -> None:
        for n in list(rnd.clients):
            state = rnd.clients[n].export_state()
            rnd.clients[n] = SecAggClient.from_state(_through_config_record(state))
            assert rnd.clients[n].stage == restore_at

    rnd.setup()
    if restore_at == "share_keys":
        restore_all()
    rnd.share_keys()
    if restore_at == "masked_input":
        restore_all()
    rnd.masked_input(absent=[17])
    if restore_at == "unmask":
        restore_all()
    result = rnd.server.unmask(rnd.responses())
    np.testing.assert_array_equal(result, rnd.expected())


def test_from_state_rejects_malformed() -> None:
    rnd = _make_round(3, 2)
    rnd.setup()
    rnd.share_keys()
    state = rnd.clients[100].export_state()
    for key in ("mask_sk", "stage", "share_owners"):
        broken = {k: v for k, v in state.items() if k != key}
        with pytest.raises(ProtocolError, match=key):
            SecAggClient.from_state(broken)
    with pytest.raises(ProtocolError, match="stage"):
        SecAggClient.from_state({**state, "stage": "bogus"})
    with pytest.raises(ProtocolError, match="b_seed"):
        SecAggClient.from_state({**state, "b_seed": b"short"})
    other = rnd.clients[101].export_state()
    with pytest.raises(ProtocolError, match="do not match"):
        SecAggClient.from_state({**state, "enc_sk": other["enc_sk"]})
