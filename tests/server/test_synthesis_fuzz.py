"""Fuzzing the Synthesis service: request validation, and raw malformed bytes on the wire."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synthesis_harness import (
    TOKEN,
    make_pki,
    raw_call,
    save_store,
    secure_channel,
    write_token_file,
)

from fedsynth.protocol.errors import ConfigError, UnknownReleaseError
from fedsynth.protocol.models import load_model
from fedsynth.protocol.wire import synthesis_pb2 as pb
from fedsynth.server.generation import GenerationConfig
from fedsynth.server.synthesis_service import (
    SynthesisLimits,
    SynthesisServer,
    serve,
    validate_generate_request,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")

LIMITS = SynthesisLimits(max_samples=3, sample_burst=1_000_000, request_burst=1_000_000)
LABELS = {"r": ("a", "b"), "release-1": ("pos", "neg", "mix")}
FUZZ = settings(
    derandomize=True,
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
WIRE = settings(FUZZ, max_examples=40)
CLEAR = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

names = st.one_of(st.sampled_from(["", "r", "a", "b", "release-1", "pos"]), st.text(max_size=300))
requests = st.builds(
    dict,
    release_id=names,
    n=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    label=names,
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    strength=st.none() | st.floats(allow_nan=True, allow_infinity=True),
)


@FUZZ
@given(fields=requests)
def test_validation_accepts_only_in_range_requests_and_names_the_field(
    fields: dict[str, Any],
) -> None:
    strength = fields.pop("strength")
    request = pb.GenerateRequest(**fields)
    if strength is not None:
        request.strength = strength
    try:
        params = validate_generate_request(request, release_labels=LABELS, limits=LIMITS)
    except UnknownReleaseError as exc:
        assert str(exc).startswith("release_id=")
        assert request.release_id not in LABELS
        return
    except ConfigError as exc:
        assert str(exc).split("=")[0].split(":")[0] in {"release_id", "n", "label", "strength"}
        return
    assert params.release_id in LABELS
    assert 1 <= params.n <= LIMITS.max_samples
    assert set(params.labels) <= set(LABELS[params.release_id])
    assert params.labels == ((request.label,) if request.label else LABELS[params.release_id])
    assert math.isfinite(params.strength) and 0 <= params.strength <= LIMITS.max_strength


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SynthesisServer, Path]]:
    root = tmp_path_factory.mktemp("fuzz")
    llama = load_model("tiny-llama")
    pki = make_pki(root / "pki")
    running = serve(
        releases=save_store(root / "releases", llama),
        loaded=llama,
        token_file=write_token_file(root / "tokens", TOKEN),
        tls_cert=pki.cert,
        tls_key=pki.key,
        limits=LIMITS,
        generation=GenerationConfig(max_new_tokens=2, batch_size=2),
    )
    yield running, pki.ca
    running.stop()


@pytest.fixture(scope="module")
def channel(served: tuple[SynthesisServer, Path]) -> Iterator[grpc.Channel]:
    opened = secure_channel(served[0].address, served[1])
    yield opened
    opened.close()


VALID = pb.GenerateRequest(release_id="release-1", n=2, label="neg", seed=5, strength=0.1)
VALID_BYTES = VALID.SerializeToString()

payloads = st.one_of(
    st.binary(max_size=256),  # garbage
    st.integers(min_value=0, max_value=len(VALID_BYTES) - 1).map(lambda k: VALID_BYTES[:k]),
    st.tuples(
        st.integers(min_value=0, max_value=len(VALID_BYTES) - 1), st.integers(0, 255)
    ).map(  # one byte changed
        lambda t: VALID_BYTES[: t[0]] + bytes([t[1]]) + VALID_BYTES[t[0] + 1 :]
    ),
    st.binary(min_size=4097, max_size=5000),  # over the request-size limit
    st.binary(max_size=64).map(lambda tail: VALID_BYTES + tail),  # trailing junk
)


def assert_clear_or_ok(channel: grpc.Channel, method: str, payload: bytes) -> None:
    try:
        raw_call(channel, method, payload)
    except grpc.RpcError as exc:
        error: Any = exc
        assert error.code() in CLEAR, (error.code(), error.details())
        assert error.details()
        if len(payload) > LIMITS.max_request_bytes:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@WIRE
@given(payload=payloads)
def test_malformed_generate_bytes_get_a_clear_status(channel: grpc.Channel, payload: bytes) -> None:
    assert_clear_or_ok(channel, "Generate", payload)


@WIRE
@given(payload=payloads, method=st.sampled_from(["ListReleases", "GetPrivacyReport"]))
def test_malformed_unary_bytes_get_a_clear_status(
    channel: grpc.Channel, payload: bytes, method: str
) -> None:
    assert_clear_or_ok(channel, method, payload)


def test_known_bad_bytes_and_the_server_keeps_serving(channel: grpc.Channel) -> None:
    cases = {
        b"\x0a\xff": "not a valid GenerateRequest",  # truncated length-delimited field
        b"\x0a\x02\xff\xfe\x10\x01": "not a valid GenerateRequest",  # invalid UTF-8 string
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff": "not a valid GenerateRequest",
        VALID_BYTES[:-3]: "not a valid GenerateRequest",
    }
    for payload, words in cases.items():
        with pytest.raises(grpc.RpcError) as caught:
            raw_call(channel, "Generate", payload)
        error: Any = caught.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in error.details()
    samples = raw_call(channel, "Generate", VALID_BYTES)
    assert isinstance(samples, list)
    assert [pb.Sample.FromString(s).label for s in samples] == ["neg", "neg"]
    listed = raw_call(channel, "ListReleases", b"")
    assert isinstance(listed, bytes)
    assert [r.release_id for r in pb.ListReleasesResponse.FromString(listed).releases] == [
        "release-1"
    ]
