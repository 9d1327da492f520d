"""Tests of the wire codec: stage messages through Flower RecordDicts (and their protobuf form)."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsynth.protocol import messages
from fedsynth.protocol.errors import (
    ClockSkewError,
    KeyAuthenticationError,
    LateSubmissionError,
    ProtocolError,
    ShapeError,
)
from fedsynth.protocol.messages import (
    Envelope,
    blobs_from_fields,
    blobs_to_fields,
    check_clock,
    ints_field,
    ints_from_bytes,
    ints_from_field,
    ints_to_bytes,
    keys_from_fields,
    keys_to_fields,
    pack,
    unpack,
    vector_from_bytes,
    vector_to_bytes,
)
from fedsynth.protocol.secagg import PublicKeys

NODE_IDS = st.integers(min_value=0, max_value=2**64 - 1)
X25519_PUBLIC = st.binary(min_size=32, max_size=32).map(
    lambda raw: X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()
)
KEYS = st.builds(
    PublicKeys,
    enc_pk=X25519_PUBLIC,
    mask_pk=X25519_PUBLIC,
    name=st.from_regex(r"[a-z0-9][a-z0-9.@_-]{0,20}", fullmatch=True),
    sign_pk=st.binary(min_size=32, max_size=32),
    signature=st.binary(min_size=64, max_size=64),
)


def _over_the_wire(content: RecordDict) -> RecordDict:
    """What the receiving side sees after Flower serializes the message."""
    return recorddict_from_proto(recorddict_to_proto(content))


@settings(max_examples=50, deadline=None)
@given(keys=st.dictionaries(NODE_IDS, KEYS, max_size=6))
def test_keys_round_trip(keys: dict[int, PublicKeys]) -> None:
    content = pack(Envelope("t", "share_keys"), keys_to_fields(keys))
    fields = unpack(_over_the_wire(content), task_id="t", stage="share_keys")
    assert keys_from_fields(fields) == keys


@settings(max_examples=50, deadline=None)
@given(
    blobs=st.dictionaries(NODE_IDS, st.binary(max_size=80), max_size=6),
    other=st.dictionaries(NODE_IDS, st.binary(max_size=8), max_size=3),
)
def test_blobs_round_trip_and_prefixes_do_not_mix(
    blobs: dict[int, bytes], other: dict[int, bytes]
) -> None:
    content = pack(
        Envelope("t", "unmask"), {**blobs_to_fields("ct:", blobs), **blobs_to_fields("sh:", other)}
    )
    fields = unpack(_over_the_wire(content), task_id="t", stage="unmask")
    assert blobs_from_fields("ct:", fields) == blobs
    assert blobs_from_fields("sh:", fields) == other


@settings(max_examples=50, deadline=None)
@given(values=st.lists(NODE_IDS, max_size=10))
def test_ints_round_trip(values: list[int]) -> None:
    content = pack(Envelope("t", "unmask"), {"survivors": ints_field(values)})
    fields = unpack(_over_the_wire(content), task_id="t", stage="unmask")
    assert ints_from_field(fields["survivors"], name="survivors") == values


@settings(max_examples=50, deadline=None)
@given(
    dtype=st.sampled_from(["uint64", "float32", "int64"]),
    seed=st.integers(0, 2**32 - 1),
    length=st.integers(0, 50),
)
def test_vector_round_trip(dtype: str, seed: int, length: int) -> None:
    rng = np.random.default_rng(seed)
    if dtype == "uint64":
        vec = rng.integers(0, 2**64, size=length, dtype=np.uint64, endpoint=False)
    elif dtype == "int64":
        vec = rng.integers(-(2**63), 2**63, size=length, dtype=np.int64, endpoint=False)
    else:
        vec = rng.normal(size=length).astype(np.float32)
    content = pack(Envelope("t", "masked_input"), {"masked": vector_to_bytes(vec)})
    fields = unpack(_over_the_wire(content), task_id="t", stage="masked_input")
    back = vector_from_bytes(fields["masked"], dtype=dtype, length=length)
    assert back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, vec)


def test_vector_bytes_are_little_endian() -> None:
    big = np.array([1, 2**40], dtype=">u8")
    assert vector_to_bytes(big) == np.array([1, 2**40], dtype="<u8").tobytes()
    back = vector_from_bytes(vector_to_bytes(big), dtype="uint64", length=2)
    assert back.tolist() == [1, 2**40]


@pytest.mark.parametrize("length", [3, 5])
def test_vector_from_bytes_rejects_wrong_length(length: int) -> None:
    data = vector_to_bytes(np.zeros(4, dtype=np.uint64))
    with pytest.raises(ShapeError, match=r"masked.*32 bytes"):
        vector_from_bytes(data, dtype="uint64", length=length, name="masked")
    with pytest.raises(ShapeError):
        vector_from_bytes(data[:-1], dtype="uint64", length=4)


@pytest.mark.parametrize("data", ["abc", [1, 2], bytearray(8), None, 7])
def test_vector_from_bytes_rejects_non_bytes(data: Any) -> None:
    with pytest.raises(ShapeError, match="expected bytes"):
        vector_from_bytes(data, dtype="uint64", length=1)


def test_vector_from_bytes_rejects_oversize(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(messages, "MAX_VECTOR_BYTES", 64)
    vector_from_bytes(bytes(64), dtype="uint64", length=8)
    with pytest.raises(ShapeError, match="exceeds"):
        vector_from_bytes(bytes(72), dtype="uint64", length=9)


def test_unpack_rejects_another_task() -> None:
    content = pack(Envelope("old-task", "masked_input"), {"masked": b""})
    with pytest.raises(LateSubmissionError, match="old-task"):
        unpack(content, task_id="new-task", stage="masked_input")


def test_unpack_rejects_another_stage() -> None:
    content = pack(Envelope("t", "share_keys"), {})
    with pytest.raises(ProtocolError, match="share_keys") as info:
        unpack(content, task_id="t", stage="unmask")
    assert not isinstance(info.value, LateSubmissionError)
    # Without a task id (a client's first message) the stage is still checked.
    with pytest.raises(ProtocolError, match="share_keys"):
        unpack(content, stage="setup")


def test_unpack_returns_the_fields_and_task_id() -> None:
    content = pack(Envelope("t", "setup"), {"manifest": "{}", "n": 3})
    assert unpack(content, stage="setup") == {"task_id": "t", "manifest": "{}", "n": 3}


def test_a_request_stamped_beyond_its_deadline_from_this_clock_is_refused() -> None:
    sent = 1_800_000_000.0
    content = _over_the_wire(pack(Envelope("t", "setup", sent_at=sent, deadline_s=60.0), {}))
    for now in (sent - 60.0, sent, sent + 59.5, sent + 60.0):  # within the deadline: accepted
        check_clock(content, now=now)
    for now, direction in ((sent + 61.0, "behind"), (sent - 3600.0, "ahead of")):
        with pytest.raises(ClockSkewError, match=f"clock skew.*s {direction} this node") as info:
            check_clock(content, now=now)
        assert "deadline of 60 s" in str(info.value) and "NTP" in str(info.value)
        assert isinstance(info.value, ProtocolError)  # refused as a protocol error
    # An unstamped request (a hand-built one) is not judged; a half or broken stamp is refused.
    check_clock(pack(Envelope("t", "setup"), {}), now=sent)
    half = pack(Envelope("t", "setup", sent_at=sent), {})
    with pytest.raises(ProtocolError, match="sent_at and deadline_s"):
        check_clock(half, now=sent)
    for bad in (float("nan"), float("inf")):
        broken = pack(Envelope("t", "setup", sent_at=bad, deadline_s=60.0), {})
        with pytest.raises(ProtocolError, match="positive deadline"):
            check_clock(broken, now=sent)
    never = pack(Envelope("t", "setup", sent_at=sent, deadline_s=0.0), {})
    with pytest.raises(ProtocolError, match="positive deadline"):
        check_clock(never, now=sent)


def test_unpack_rejects_message_without_record_or_header() -> None:
    with pytest.raises(ProtocolError, match="'fedsynth'"):
        unpack(RecordDict(), task_id="t", stage="setup")
    other = RecordDict({"something": ConfigRecord({"task_id": "t", "stage": "setup"})})
    with pytest.raises(ProtocolError, match="'fedsynth'"):
        unpack(other, task_id="t", stage="setup")
    headless = RecordDict({"fedsynth": ConfigRecord({"task_id": "t"})})
    with pytest.raises(ProtocolError, match="header"):
        unpack(headless, task_id="t", stage="setup")


def test_malformed_entries_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="pk:5"):
        keys_from_fields({"pk:5": [b"x" * 32]})
    with pytest.raises(ProtocolError, match="ct:5"):
        blobs_from_fields("ct:", {"ct:5": "text"})
    with pytest.raises(ProtocolError, match="survivors"):
        ints_from_field("1,2", name="survivors")
    # An entry with only the two X25519 keys is an unsigned key, refused as such.
    with pytest.raises(KeyAuthenticationError, match="unsigned"):
        keys_from_fields({"pk:5": [b"x" * 32, b"y" * 32]})
    # Field names and list entries that are not node ids are protocol errors, not ValueError.
    with pytest.raises(ProtocolError, match="node id"):
        keys_from_fields({"pk:abc": [b"x" * 32] * 5})
    for bad in ("ct:-1", "ct:1e3", "ct:"):
        with pytest.raises(ProtocolError, match="node id"):
            blobs_from_fields("ct:", {bad: b"x"})
    with pytest.raises(ProtocolError, match="node id"):
        ints_from_field(["1", "x"], name="survivors")
    with pytest.raises(ProtocolError, match="low-order"):
        keys_from_fields({"pk:5": [bytes(32), b"y" * 32, b"k" * 32, b"s" * 64, b"name"]})
    # Other fields are ignored.
    assert keys_from_fields({"task_id": "t", "n": 3}) == {}
    assert blobs_from_fields("ct:", {"sh:1": b"x"}) == {}


@pytest.mark.parametrize(
    ("low", "high", "width"),
    [(-128, 127, 1), (-129, 5, 2), (0, 32_768, 4), (-(2**31), 2**31 - 1, 4), (0, 2**31, 8)],
)
def test_small_integers_round_trip_in_the_narrowest_width(low: int, high: int, width: int) -> None:
    values = np.array([low, 0, high, -1, 1] * 50, dtype=np.int64)
    data = ints_to_bytes(values)
    assert data[0] == width
    np.testing.assert_array_equal(ints_from_bytes(data, length=values.size), values)
    extremes = np.array([-(2**63), 2**63 - 1], dtype=np.int64)
    np.testing.assert_array_equal(ints_from_bytes(ints_to_bytes(extremes), length=2), extremes)


def test_a_noise_sized_upload_is_a_fraction_of_the_field_vector() -> None:
    noise = np.random.default_rng(0).normal(0, 250, 65_537).round().astype(np.int64)
    data = ints_to_bytes(noise)
    assert data[0] == 2 and len(data) < 0.25 * 8 * noise.size
    np.testing.assert_array_equal(ints_from_bytes(data, length=noise.size), noise)


def test_malformed_integer_uploads_are_refused() -> None:
    good = ints_to_bytes(np.arange(10, dtype=np.int64))
    bomb = bytes([8]) + zlib.compress(bytes(8 * 10**6), 9)  # 8 MB of zeros in ~8 kB
    for data, why in [
        ("text", "expected non-empty bytes"),
        (b"", "expected non-empty bytes"),
        (bytes([3]) + good[1:], "integer width 3"),
        (bytes([1]) + b"\x00" * 5, "not a zlib stream"),
        (good[:-2], "does not hold exactly 10 integers"),  # truncated stream
        (good + b"tail", "does not hold exactly 10 integers"),
        (bomb, "does not hold exactly 10 integers"),
    ]:
        with pytest.raises(ShapeError, match=why):
            ints_from_bytes(data, length=10)
    with pytest.raises(ShapeError, match="does not hold exactly 11 integers"):
        ints_from_bytes(good, length=11)
