"""Wire codec of the dataset-vector protocol: typed stage messages <-> Flower RecordDicts.

Every message carries the task id and the stage name, so a reply to a stale round or stage is
recognized and rejected. The coordinator's requests also carry its clock and the stage deadline:
a holder whose clock disagrees by more than the deadline says so instead of timing out.
Vectors travel as raw little-endian bytes with their dtype and shape checked on decode;
nothing else is trusted from the wire.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedsynth.protocol.errors import (
    ClockSkewError,
    KeyAuthenticationError,
    LateSubmissionError,
    ProtocolError,
    ShapeError,
)
from fedsynth.protocol.secagg import ROUND_STAGES, PublicKeys

STAGES = tuple(stage.value for stage in ROUND_STAGES)
"""Wire names of the stages that exchange messages, in order."""
MAX_VECTOR_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class Envelope:
    """Header of every stage message; requests also state when they were sent and the deadline."""

    task_id: str
    stage: str
    sent_at: float | None = None
    deadline_s: float | None = None

    def check(self, *, task_id: str, stage: str) -> None:
        """Reject a message for another task (stale or replayed) or another stage."""
        if self.task_id != task_id:
            raise LateSubmissionError(
                f"task_id={self.task_id!r} is not the current task {task_id!r} (stale or replay)"
            )
        if self.stage != stage:
            raise ProtocolError(f"stage={self.stage!r} where {stage!r} was expected")


def _record(content: RecordDict) -> ConfigRecord:
    try:
        record = content.config_records["fedsynth"]
    except KeyError:
        raise ProtocolError("message lacks the 'fedsynth' config record") from None
    return record


def pack(envelope: Envelope, fields: Mapping[str, Any]) -> RecordDict:
    """Build a RecordDict from a header and ConfigRecord-compatible fields."""
    body: dict[str, Any] = {"task_id": envelope.task_id, "stage": envelope.stage}
    if envelope.sent_at is not None:
        body["sent_at"] = float(envelope.sent_at)
    if envelope.deadline_s is not None:
        body["deadline_s"] = float(envelope.deadline_s)
    for key, value in fields.items():
        body[key] = value
    return RecordDict({"fedsynth": ConfigRecord(body)})


def unpack(content: RecordDict, *, task_id: str | None = None, stage: str) -> dict[str, Any]:
    """Read a message, checking its header; returns the remaining fields."""
    record = _record(content)
    try:
        envelope = Envelope(task_id=str(record["task_id"]), stage=str(record["stage"]))
    except KeyError as exc:
        raise ProtocolError(f"message header lacks {exc}") from None
    if task_id is not None:
        envelope.check(task_id=task_id, stage=stage)
    elif envelope.stage != stage:
        raise ProtocolError(f"stage={envelope.stage!r} where {stage!r} was expected")
    return {k: record[k] for k in record if k not in ("stage",)}


def check_clock(content: RecordDict, *, now: float) -> None:
    """Refuse a request whose sender's clock is further from ``now`` than its stage deadline.

    The coordinator stamps each request with its wall clock (``sent_at``) and the stage
    deadline (``deadline_s``). A skew beyond the deadline means one of the two machines keeps
    the wrong time; the holder says so plainly instead of answering into a round whose deadlines
    it cannot judge. A request without the stamps (an older coordinator, a test) is not judged.

    Raises:
        ClockSkewError: ``|now - sent_at| > deadline_s`` (names both clocks and the deadline).
        ProtocolError: The stamps are present but not finite numbers (deadline not positive).
    """
    record = _record(content)
    if "sent_at" not in record and "deadline_s" not in record:
        return
    try:
        sent_at = float(record["sent_at"])  # type: ignore[arg-type]
        deadline = float(record["deadline_s"])  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("a request's sent_at and deadline_s must both be numbers") from None
    if not (np.isfinite(sent_at) and np.isfinite(deadline) and deadline > 0):
        raise ProtocolError(
            f"sent_at={sent_at!r}, deadline_s={deadline!r}: not a time and a positive deadline"
        )
    skew = now - sent_at
    if abs(skew) > deadline:
        direction = "behind" if skew > 0 else "ahead of"
        raise ClockSkewError(
            f"clock skew: the coordinator stamped this request sent_at={sent_at:.0f} (unix s), "
            f"{abs(skew):.0f} s {direction} this node's clock ({now:.0f}); that is beyond the "
            f"stage deadline of {deadline:g} s. Check that both machines keep time (NTP)."
        )


def vector_to_bytes(array: np.ndarray) -> bytes:
    """Little-endian raw bytes of a 1-D array."""
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()


def vector_from_bytes(data: Any, *, dtype: str, length: int, name: str = "vector") -> np.ndarray:
    """Decode raw bytes into a 1-D array of exactly ``length`` elements of ``dtype``."""
    if not isinstance(data, bytes):
        raise ShapeError(f"{name}: expected bytes, got {type(data).__name__}")
    if len(data) > MAX_VECTOR_BYTES:
        raise ShapeError(f"{name}: {len(data)} bytes exceeds the {MAX_VECTOR_BYTES}-byte limit")
    item = np.dtype(dtype).newbyteorder("<")
    if len(data) != length * item.itemsize:
        raise ShapeError(
            f"{name}: {len(data)} bytes != {length} x {item.itemsize} bytes (shape ({length},))"
        )
    return np.frombuffer(data, dtype=item).astype(np.dtype(dtype))


_INT_WIDTHS = (1, 2, 4, 8)


def ints_to_bytes(values: np.ndarray) -> bytes:
    """Signed integers compactly, for vectors of small values such as a noise upload.

    One byte naming the narrowest width that holds them all (1, 2, 4 or 8 bytes), then their
    little-endian bytes, zlib-compressed (level 1, fast).
    """
    values = np.asarray(values, dtype=np.int64).reshape(-1)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    width = next(w for w in _INT_WIDTHS if -(2 ** (8 * w - 1)) <= low and high < 2 ** (8 * w - 1))
    raw = values.astype(np.dtype(f"<i{width}")).tobytes()
    return bytes([width]) + zlib.compress(raw, 1)


def ints_from_bytes(data: Any, *, length: int, name: str = "integers") -> np.ndarray:
    """Inverse of :func:`ints_to_bytes`: exactly ``length`` int64 values, or ShapeError.

    Decompresses at most the bytes ``length`` values can take, so a crafted upload cannot
    make the coordinator inflate more than that.
    """
    if not isinstance(data, bytes) or not data:
        raise ShapeError(f"{name}: expected non-empty bytes, got {type(data).__name__}")
    if len(data) > MAX_VECTOR_BYTES:
        raise ShapeError(f"{name}: {len(data)} bytes exceeds the {MAX_VECTOR_BYTES}-byte limit")
    width = data[0]
    if width not in _INT_WIDTHS:
        raise ShapeError(f"{name}: integer width {width} is not one of {list(_INT_WIDTHS)}")
    expected = length * width
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(data[1:], max(expected, 1))  # 0 would mean no limit
    except zlib.error as exc:
        raise ShapeError(f"{name}: not a zlib stream ({exc})") from None
    if len(raw) != expected or not inflater.eof or inflater.unused_data:
        raise ShapeError(f"{name}: does not hold exactly {length} integers of {width} bytes")
    return np.frombuffer(raw, dtype=np.dtype(f"<i{width}")).astype(np.int64)


def field_dtype(bits: int) -> str:
    """The narrowest unsigned dtype holding elements of Z_{2^bits} (uint32 or uint64)."""
    return "uint32" if bits <= 32 else "uint64"


def field_to_bytes(values: np.ndarray, *, bits: int) -> bytes:
    """Masked field elements on the wire: 4 bytes each for bits <= 32, else 8."""
    return vector_to_bytes(np.asarray(values).astype(field_dtype(bits)))


def field_from_bytes(data: Any, *, bits: int, length: int, name: str = "masked") -> np.ndarray:
    """Inverse of :func:`field_to_bytes`; always returns uint64 field elements."""
    return vector_from_bytes(data, dtype=field_dtype(bits), length=length, name=name).astype(
        np.uint64
    )


def keys_to_fields(keys: Mapping[int, PublicKeys]) -> dict[str, list[bytes]]:
    """Signed public keys of many nodes as ``{"pk:<node>": [enc, mask, sign_pk, sig, name]}``."""
    return {
        f"pk:{node}": [pk.enc_pk, pk.mask_pk, pk.sign_pk, pk.signature, pk.name.encode("utf-8")]
        for node, pk in keys.items()
    }


def _node_of(key: str, prefix: str) -> int:
    """The node id in a field name ``prefix + str(node)`` (ProtocolError if not decimal)."""
    digits = key[len(prefix) :]
    if not digits.isdigit() or not digits.isascii() or len(digits) > 20:
        raise ProtocolError(f"field {key!r} does not name a node id")
    return int(digits)


def keys_from_fields(fields: Mapping[str, Any]) -> dict[int, PublicKeys]:
    """Inverse of :func:`keys_to_fields` (other fields are ignored).

    Raises:
        KeyAuthenticationError: If an entry carries no signature (only the two X25519 keys).
        ProtocolError: If an entry is malformed.
    """
    out: dict[int, PublicKeys] = {}
    for key, value in fields.items():
        if key.startswith("pk:"):
            node = _node_of(key, "pk:")
            if isinstance(value, list) and len(value) == 2:
                raise KeyAuthenticationError(f"public key entry {key!r} is unsigned")
            if not isinstance(value, list) or len(value) != 5:
                raise ProtocolError(f"public key entry {key!r} is malformed")
            if not all(isinstance(item, bytes) for item in value):
                raise ProtocolError(f"public key entry {key!r} must hold only bytes")
            try:
                name = value[4].decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError(f"public key entry {key!r} has a non-UTF-8 name") from None
            out[node] = PublicKeys(
                enc_pk=value[0], mask_pk=value[1], name=name, sign_pk=value[2], signature=value[3]
            )
    return out


def public_keys_from_reply(fields: Mapping[str, Any]) -> PublicKeys:
    """A setup reply's signed keys.

    The reply holds the fields ``enc_pk``, ``mask_pk``, ``name``, ``sign_pk`` and
    ``signature`` (see :meth:`PublicKeys.to_dict`).

    Raises:
        KeyAuthenticationError: If the signature fields are missing.
        ProtocolError: If a field is malformed.
    """
    return PublicKeys.from_dict(fields)


def blobs_to_fields(prefix: str, blobs: Mapping[int, bytes]) -> dict[str, bytes]:
    """{node: bytes} as {prefix + str(node): bytes}."""
    return {f"{prefix}{node}": blob for node, blob in blobs.items()}


def blobs_from_fields(prefix: str, fields: Mapping[str, Any]) -> dict[int, bytes]:
    """Inverse of :func:`blobs_to_fields`."""
    out: dict[int, bytes] = {}
    for key, value in fields.items():
        if key.startswith(prefix):
            if not isinstance(value, bytes):
                raise ProtocolError(f"entry {key!r} is not bytes")
            out[_node_of(key, prefix)] = value
    return out


def ints_field(values: Sequence[int]) -> list[str]:
    """Node ids (up to 2^64) as decimal strings, safe in any ConfigRecord."""
    return [str(v) for v in values]


def ints_from_field(values: Any, *, name: str) -> list[int]:
    """Inverse of :func:`ints_field`."""
    if not isinstance(values, list):
        raise ProtocolError(f"{name}: expected a list")
    out: list[int] = []
    for value in values:
        text = str(value)
        if not text.isdigit() or not text.isascii() or len(text) > 20:
            raise ProtocolError(f"{name}: {text[:40]!r} is not a node id")
        out.append(int(text))
    return out
