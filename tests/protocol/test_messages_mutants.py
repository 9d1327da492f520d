"""The wire helpers every stage uses, where mutation testing found them unchecked.

``scripts/mutmut.sh protocol/messages.py`` left alive: an integer upload inflated without a
limit (a crafted noise upload of a few kilobytes could make the coordinator allocate hundreds
of megabytes before the length check refused it), decoded integers handed back as floats,
node ids of more than 20 digits accepted, a request stamped with a deadline but no send time
left unjudged, a deadline below one second refused, the 32-bit field's wire width, an empty
integer upload, the size limits' inclusive edges, and the refusals' texts.
"""

from __future__ import annotations

import tracemalloc
import zlib

import numpy as np
import pytest
from flwr.app import RecordDict

from fedsynth.protocol import messages
from fedsynth.protocol.errors import ClockSkewError, ProtocolError, ShapeError
from fedsynth.protocol.messages import (
    Envelope,
    blobs_from_fields,
    check_clock,
    field_from_bytes,
    field_to_bytes,
    ints_from_bytes,
    ints_from_field,
    ints_to_bytes,
    keys_from_fields,
    pack,
    vector_from_bytes,
)


def _stamped(sent_at: float | None = None, deadline_s: float | None = None) -> RecordDict:
    return pack(Envelope("t", "setup", sent_at=sent_at, deadline_s=deadline_s), {})


def test_a_crafted_integer_upload_is_never_inflated_beyond_its_length() -> None:
    """64 MiB of zeros compress to about 64 KiB; decoding them as 10 integers must stop after
    10 values' worth of output, not inflate the whole stream and then refuse it."""
    bomb = bytes([8]) + zlib.compress(bytes(64 * 1024 * 1024), 9)
    assert len(bomb) < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(ShapeError) as caught:
            ints_from_bytes(bomb, length=10, name="excess")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(caught.value) == "excess: does not hold exactly 10 integers of 8 bytes"
    assert peak < 4 * 1024 * 1024


def test_decoded_integers_are_int64_and_an_empty_upload_round_trips() -> None:
    values = np.array([-3, 0, 7], dtype=np.int64)
    decoded = ints_from_bytes(ints_to_bytes(values), length=3)
    assert decoded.dtype == np.int64 and decoded.tolist() == [-3, 0, 7]
    empty = ints_to_bytes(np.array([], dtype=np.int64))
    assert empty[0] == 1
    assert ints_from_bytes(empty, length=0).tolist() == []


def test_integer_uploads_are_refused_by_name() -> None:
    with pytest.raises(ShapeError) as caught:
        ints_from_bytes(None, length=1)
    assert str(caught.value) == "integers: expected non-empty bytes, got NoneType"
    with pytest.raises(ShapeError) as caught:
        ints_from_bytes(b"", length=1, name="excess")
    assert str(caught.value) == "excess: expected non-empty bytes, got bytes"


def test_the_upload_size_limits_are_inclusive(monkeypatch: pytest.MonkeyPatch) -> None:
    upload = ints_to_bytes(np.arange(4, dtype=np.int64))
    monkeypatch.setattr(messages, "MAX_VECTOR_BYTES", len(upload))
    assert ints_from_bytes(upload, length=4).tolist() == [0, 1, 2, 3]
    monkeypatch.setattr(messages, "MAX_VECTOR_BYTES", len(upload) - 1)
    with pytest.raises(ShapeError) as caught:
        ints_from_bytes(upload, length=4)
    assert str(caught.value) == (
        f"integers: {len(upload)} bytes exceeds the {len(upload) - 1}-byte limit"
    )


def test_a_field_of_32_bits_travels_in_4_bytes_and_wider_ones_in_8() -> None:
    values = np.array([1, 2**31 + 5], dtype=np.uint64)
    assert len(field_to_bytes(values, bits=32)) == 8
    assert len(field_to_bytes(values, bits=33)) == 16
    back = field_from_bytes(field_to_bytes(values, bits=32), bits=32, length=2)
    assert back.dtype == np.uint64 and back.tolist() == [1, 2**31 + 5]
    with pytest.raises(ShapeError) as caught:
        field_from_bytes(b"\x00" * 7, bits=32, length=2)
    assert str(caught.value) == "masked: 7 bytes != 2 x 4 bytes (shape (2,))"
    with pytest.raises(ShapeError) as caught:
        vector_from_bytes("text", dtype="float32", length=1)
    assert str(caught.value) == "vector: expected bytes, got str"


def test_node_ids_have_at_most_20_digits() -> None:
    largest = str(2**64 - 1)  # 20 digits
    assert ints_from_field([largest], name="survivors") == [2**64 - 1]
    assert list(blobs_from_fields("sh:", {f"sh:{largest}": b"x"})) == [2**64 - 1]
    long = "1" * 21
    with pytest.raises(ProtocolError) as caught:
        ints_from_field([long], name="survivors")
    assert str(caught.value) == f"survivors: {long!r} is not a node id"
    with pytest.raises(ProtocolError) as caught:
        blobs_from_fields("sh:", {f"sh:{long}": b"x"})
    assert str(caught.value) == f"field 'sh:{long}' does not name a node id"
    shown = "9" * 45
    with pytest.raises(ProtocolError) as caught:
        ints_from_field([shown], name="dropped")
    assert str(caught.value) == f"dropped: {shown[:40]!r} is not a node id"


def test_public_key_entries_are_refused_by_name() -> None:
    with pytest.raises(ProtocolError) as caught:
        keys_from_fields({"pk:5": [b"a", b"b", b"c", b"d", "name"]})
    assert str(caught.value) == "public key entry 'pk:5' must hold only bytes"
    with pytest.raises(ProtocolError) as caught:
        keys_from_fields({"pk:5": [b"a", b"b", b"c", b"d", b"\xff"]})
    assert str(caught.value) == "public key entry 'pk:5' has a non-UTF-8 name"


def test_a_stamp_needs_both_times_and_a_positive_deadline() -> None:
    with pytest.raises(ProtocolError) as caught:
        check_clock(_stamped(deadline_s=30.0), now=1000.0)
    assert str(caught.value) == "a request's sent_at and deadline_s must both be numbers"
    with pytest.raises(ProtocolError):
        check_clock(_stamped(sent_at=1000.0), now=1000.0)
    check_clock(_stamped(sent_at=1000.0, deadline_s=0.5), now=1000.2)  # under a second is fine
    with pytest.raises(ClockSkewError, match=r"1 s behind this node's clock"):
        check_clock(_stamped(sent_at=1000.0, deadline_s=0.5), now=1000.8)
    with pytest.raises(ClockSkewError, match=r"1 s ahead of this node's clock"):
        check_clock(_stamped(sent_at=1000.0, deadline_s=0.5), now=999.2)


def test_a_message_without_its_record_is_named() -> None:
    with pytest.raises(ProtocolError) as caught:
        messages.unpack(RecordDict(), stage="setup")
    assert str(caught.value) == "message lacks the 'fedsynth' config record"
