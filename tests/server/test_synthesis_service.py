"""The Synthesis gRPC service over TLS with a bearer token, on 127.0.0.1, with the tiny model."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from safetensors import safe_open
from synthesis_harness import (
    OTHER_TOKEN,
    TOKEN,
    Pki,
    make_pki,
    make_test_release,
    save_store,
    secure_channel,
    write_token_file,
)
from typer.testing import CliRunner

from fedsynth.protocol.errors import (
    AuthenticationError,
    CertificateError,
    ConfigError,
    ModelMismatchError,
    RateLimitError,
    UnknownReleaseError,
)
from fedsynth.protocol.models import LoadedModel, load_model
from fedsynth.protocol.wire import synthesis_pb2 as pb
from fedsynth.server.backends import TransformersBackend, as_backend
from fedsynth.server.generation import GenerationConfig
from fedsynth.server.release import load_release, save_release
from fedsynth.server.snr import steering_snr
from fedsynth.server.synthesis_client import (
    SynthesisClient,
    read_token_file,
    synthesis_app,
    token_id,
)
from fedsynth.server.synthesis_service import (
    DEFAULT_STRENGTH,
    RateLimiter,
    ReleaseStore,
    SynthesisLimits,
    SynthesisServer,
    TokenBucket,
    check_bearer,
    generated_samples,
    label_seed,
    serve,
    server_credentials,
    serving_sample_burst,
    split_counts,
    status_code_for,
    validate_generate_request,
)
from fedsynth.server.synthesize import SHOT_POOL, iter_release_samples

pytestmark = pytest.mark.usefixtures("single_torch_thread")

LIMITS = SynthesisLimits(
    max_samples=50, sample_burst=10_000, request_burst=10_000, max_calls_per_token=64
)
GENERATION = GenerationConfig(max_new_tokens=4, batch_size=4)


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, llama: LoadedModel) -> Path:
    return save_store(tmp_path_factory.mktemp("releases"), llama)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_token_file(tmp_path_factory.mktemp("tokens") / "tokens", TOKEN, OTHER_TOKEN)


@pytest.fixture(scope="module")
def client_token(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_token_file(tmp_path_factory.mktemp("client") / "token", TOKEN)


def start(
    store: Path,
    llama: LoadedModel,
    pki: Pki,
    tokens: Path,
    *,
    limits: SynthesisLimits = LIMITS,
    generation: GenerationConfig = GENERATION,
    reader: Callable[[], LoadedModel] | None = None,
    vocabulary: str = "release",
    contrast: float = 1.0,
) -> SynthesisServer:
    return serve(
        releases=store,
        loaded=llama,
        token_file=tokens,
        tls_cert=pki.cert,
        tls_key=pki.key,
        limits=limits,
        generation=generation,
        reader=reader,
        vocabulary=vocabulary,
        contrast=contrast,
    )


@pytest.fixture(scope="module")
def server(store: Path, llama: LoadedModel, pki: Pki, tokens: Path) -> Iterator[SynthesisServer]:
    with start(store, llama, pki, tokens) as running:
        yield running


@pytest.fixture()
def client(server: SynthesisServer, pki: Pki) -> Iterator[SynthesisClient]:
    with SynthesisClient(server.address, token=TOKEN, ca_cert=pki.ca, timeout=60) as opened:
        yield opened


def status_of(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        result = call()
        if not isinstance(result, pb.ListReleasesResponse | pb.PrivacyReport | tuple | list):
            list(result)  # a stream fails when read
    error: Any = caught.value
    return error.code(), error.details()


# ---------------------------------------------------------------------------------------------
# Through TLS with a token
# ---------------------------------------------------------------------------------------------


def test_list_shows_only_the_verified_release_with_its_terms(
    client: SynthesisClient, store: Path
) -> None:
    releases = client.list_releases()
    # release-2.safetensors was altered after it was written: its digest fails, it is not offered.
    assert [r.release_id for r in releases] == ["release-1"]
    info = releases[0]
    path = store / "release-1.safetensors"
    release = load_release(path)
    with safe_open(str(path), framework="numpy") as handle:
        assert info.digest == handle.metadata()["digest"]
    assert info.digest.startswith("sha256:")
    assert info.method == pb.METHOD_VECTOR
    assert (info.epsilon, info.delta) == (2.0, 1e-5)
    assert info.trust_mode == pb.TRUST_MODE_DISTRIBUTED
    assert list(info.labels) == ["pos", "neg", "mix"]
    assert info.model_fingerprint == release.manifest.model_fingerprint
    assert info.created.ToNanoseconds() == path.stat().st_mtime_ns


def test_privacy_report_is_the_stored_report(client: SynthesisClient, store: Path) -> None:
    info, report = client.privacy_report("release-1")
    release = load_release(store / "release-1.safetensors")
    assert report == release.report
    assert info.release_id == "release-1"
    assert report["epsilon"] == info.epsilon
    # The steering report is the rule Generate applies, at the service's default strength.
    steering = client.steering("release-1")
    expected = steering_snr(release).to_dict(strength=DEFAULT_STRENGTH)
    assert steering == json.loads(json.dumps(expected))
    assert set(steering["classes"]) == set(release.labels)
    for entry in steering["classes"].values():
        assert 0.0 <= entry["factor"] <= 1.0
        assert entry["effective_strength"] == pytest.approx(DEFAULT_STRENGTH * entry["factor"])


def test_a_store_change_is_seen_and_a_tampered_file_never_offered(
    tmp_path: Path, llama: LoadedModel, pki: Pki, tokens: Path
) -> None:
    with start(tmp_path, llama, pki, tokens) as running:
        servicer = running.servicer
        assert servicer.store.scan() == {}
        path = save_release(
            make_test_release(llama, release_id="late"), tmp_path / "late.safetensors"
        )
        assert list(servicer.store.scan()) == ["late"]
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x01
        path.write_bytes(bytes(data))
        os.utime(path, ns=(1, 1))  # a changed mtime forces a reload
        assert servicer.store.scan() == {}
        # Two valid files claiming one release id: neither is offered.
        save_release(make_test_release(llama, release_id="dup"), tmp_path / "a.safetensors")
        save_release(make_test_release(llama, release_id="dup"), tmp_path / "b.safetensors")
        assert "dup" not in servicer.store.scan()


def test_a_release_of_another_model_is_not_offered(
    tmp_path: Path, llama: LoadedModel, pki: Pki, tokens: Path
) -> None:
    other = load_model("tiny-gpt2")
    save_release(make_test_release(other, release_id="gpt2"), tmp_path / "gpt2.safetensors")
    save_release(make_test_release(llama, release_id="mine"), tmp_path / "mine.safetensors")
    with start(tmp_path, llama, pki, tokens) as running:
        assert list(running.servicer.store.scan()) == ["mine"]


def test_a_release_the_backend_cannot_apply_is_not_offered(
    tmp_path: Path, llama: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    save_release(make_test_release(llama, release_id="a"), tmp_path / "a.safetensors")
    save_release(make_test_release(llama, release_id="b"), tmp_path / "b.safetensors")

    def accepts(release: Any) -> None:
        if release.release_id == "b":
            raise ModelMismatchError("this backend cannot steer block 0")

    store = ReleaseStore(tmp_path, model_fingerprint=llama.fingerprint, accepts=accepts)
    with caplog.at_level("WARNING"):
        assert list(store.scan()) == ["a"]
    assert "not offering b.safetensors: this backend cannot steer block 0" in caplog.text


def test_a_release_with_a_class_count_of_zero_is_not_offered(
    tmp_path: Path, llama: LoadedModel, pki: Pki, tokens: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = make_test_release(llama, release_id="good")
    zero = make_test_release(llama, release_id="zero")
    counts = good.counts.copy()
    counts[1] = 0.0
    save_release(good, tmp_path / "good.safetensors")
    save_release(dataclasses.replace(zero, counts=counts), tmp_path / "zero.safetensors")
    with start(tmp_path, llama, pki, tokens) as running, caplog.at_level("WARNING"):
        # Refused when the store loads it, not after a consumer's stream was charged.
        assert list(running.servicer.store.scan()) == ["good"]
        assert "not offering zero.safetensors" in caplog.text and "noisy count" in caplog.text
        with SynthesisClient(running.address, token=TOKEN, ca_cert=pki.ca, timeout=30) as c:
            code, _ = status_of(lambda: c.generate("zero", 2))
            assert code == grpc.StatusCode.NOT_FOUND


def test_a_release_whose_vectors_or_text_cannot_be_served_is_not_offered(
    tmp_path: Path, llama: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    """A vector that is not finite failed every stream after its charge; a label protobuf
    cannot carry (a lone surrogate) made ListReleases fail for every consumer."""
    good = make_test_release(llama, release_id="good")
    nan = make_test_release(llama, release_id="nan")
    vectors = nan.vectors.copy()
    vectors[0, 0, 0] = np.nan
    save_release(good, tmp_path / "good.safetensors")
    save_release(dataclasses.replace(nan, vectors=vectors), tmp_path / "nan.safetensors")
    odd = make_test_release(llama, release_id="odd")
    manifest = dataclasses.replace(odd.manifest, model_name="\ud800")
    save_release(dataclasses.replace(odd, manifest=manifest), tmp_path / "odd.safetensors")
    store = ReleaseStore(tmp_path, model_fingerprint=good.manifest.model_fingerprint)
    with caplog.at_level("WARNING"):
        assert list(store.scan()) == ["good"]
    assert "not offering nan.safetensors" in caplog.text and "not finite" in caplog.text
    assert "not offering odd.safetensors" in caplog.text


def test_a_fifo_in_the_release_directory_is_skipped_not_opened(
    tmp_path: Path, llama: LoadedModel
) -> None:
    """Opening a FIFO without a writer blocks (holding the GIL inside safetensors), which froze
    every call of the service. Run in a child process, so a regression fails, not hangs."""
    save_release(make_test_release(llama, release_id="good"), tmp_path / "good.safetensors")
    os.mkfifo(tmp_path / "stuck.safetensors")
    fingerprint = load_release(tmp_path / "good.safetensors").manifest.model_fingerprint
    code = (
        "import sys; from pathlib import Path\n"
        "from fedsynth.server.synthesis_service import ReleaseStore\n"
        f"store = ReleaseStore(Path({str(tmp_path)!r}), model_fingerprint={fingerprint!r})\n"
        "print(sorted(store.scan())); print(sorted(store.scan()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["['good']", "['good']"]
    assert done.stderr.count("stuck.safetensors: not a regular file") == 1  # logged once


def _with_prior_vocabulary(release: Any, vocabulary: str) -> Any:
    manifest = dataclasses.replace(release.manifest, extra={"prior_vocabulary": vocabulary})
    return dataclasses.replace(release, manifest=manifest)


def test_each_release_is_sampled_from_its_prior_vocabulary_unless_told(
    tmp_path: Path, llama: LoadedModel, pki: Pki, tokens: Path, caplog: pytest.LogCaptureFixture
) -> None:
    latin = _with_prior_vocabulary(make_test_release(llama, release_id="latin"), "latin")
    unknown = _with_prior_vocabulary(make_test_release(llama, release_id="odd"), "cuneiform")
    save_release(latin, tmp_path / "latin.safetensors")
    save_release(unknown, tmp_path / "odd.safetensors")
    save_release(make_test_release(llama, release_id="old"), tmp_path / "old.safetensors")

    def local(release: Any, vocabulary: str) -> list[str]:
        config = dataclasses.replace(GENERATION, vocabulary=vocabulary)
        samples = iter_release_samples(
            llama, release, n_per_label=3, strength=0.5, config=config, seed=label_seed(3, "pos"),
            labels=("pos",), shots=0,
        )  # fmt: skip
        return [s.text for s in samples]

    def served(address: str, release_id: str) -> list[str]:
        with SynthesisClient(address, token=TOKEN, ca_cert=pki.ca, timeout=60) as c:
            got = c.generate(release_id, 3, label="pos", seed=3, strength=0.5, shots=0)
            return [s.text for s in got]

    assert local(latin, "latin") != local(latin, "full")
    with caplog.at_level("WARNING"), start(tmp_path, llama, pki, tokens) as running:
        # A prior vocabulary this version does not know is refused when loaded, not mid-stream.
        assert sorted(running.servicer.store.scan()) == ["latin", "old"]
        assert "not offering odd.safetensors" in caplog.text and "'cuneiform'" in caplog.text
        assert served(running.address, "latin") == local(latin, "latin")
        assert served(running.address, "old") == local(latin, "full")  # recorded nothing: full
        assert "steering is slightly off" not in caplog.text
    caplog.clear()
    fixed = start(tmp_path, llama, pki, tokens, vocabulary="full")
    with caplog.at_level("WARNING"), fixed as running:
        assert sorted(running.servicer.store.scan()) == ["latin", "odd", "old"]
        for _ in range(2):
            assert served(running.address, "latin") == local(latin, "full")
        cautions = [r.getMessage() for r in caplog.records if "slightly off" in r.getMessage()]
        assert len(cautions) == 1 and "latin" in cautions[0]  # once per release


def test_the_service_steers_with_its_class_contrast(
    tmp_path: Path, llama: LoadedModel, pki: Pki, tokens: Path
) -> None:
    release = make_test_release(llama, release_id="c")
    save_release(release, tmp_path / "c.safetensors")

    def local(contrast: float) -> list[str]:
        samples = iter_release_samples(
            llama, release, n_per_label=3, strength=0.5, contrast=contrast, config=GENERATION,
            seed=label_seed(5, "neg"), labels=("neg",), shots=0,
        )  # fmt: skip
        return [s.text for s in samples]

    assert local(3.0) != local(1.0)
    running = start(tmp_path, llama, pki, tokens, contrast=3.0)
    with running, SynthesisClient(running.address, token=TOKEN, ca_cert=pki.ca, timeout=60) as c:
        got = c.generate("c", 3, label="neg", seed=5, strength=0.5, shots=0)
        assert [s.text for s in got] == local(3.0)
        expected = steering_snr(release, contrast=3.0).to_dict(strength=DEFAULT_STRENGTH)
        assert c.steering("c") == json.loads(json.dumps(expected))
    with pytest.raises(ConfigError, match="contrast=nan"):
        start(tmp_path, llama, pki, tokens, contrast=math.nan)


def test_an_error_while_generating_ends_the_stream_with_its_status(
    server: SynthesisServer, client: SynthesisClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsynth.server import synthesis_service

    def failing(*_args: Any, **_kwargs: Any) -> Iterator[Any]:
        raise ConfigError("generation: the model refused this release")
        yield  # a generator, as the real one

    monkeypatch.setattr(synthesis_service, "iter_release_samples", failing)
    code, details = status_of(lambda: client.generate("release-1", 2))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "generation: the model refused this release"


def _expected(
    llama: LoadedModel, release: Any, label: str, count: int, *, seed: int, **kwargs: Any
) -> list[str]:
    """The texts synthesize.py makes for one label of a request at strength 0.5."""
    samples = iter_release_samples(
        llama,
        release,
        n_per_label=count,
        strength=0.5,
        config=GENERATION,
        seed=label_seed(seed, label),
        labels=(label,),
        **kwargs,
    )
    return [s.text for s in samples]


def test_generate_streams_the_release_samples(
    client: SynthesisClient, llama: LoadedModel, store: Path
) -> None:
    release = load_release(store / "release-1.safetensors")
    files_before = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}
    samples = list(client.generate("release-1", 5, seed=7, strength=0.5))
    assert [s.label for s in samples] == ["pos", "pos", "neg", "neg", "mix"]
    assert [s.index for s in samples] == [0, 1, 2, 3, 4]
    assert {s.release_id for s in samples} == {"release-1"}
    # Exactly the steered samples synthesize.py makes, at the requested strength and seed, with
    # the server's default shots unless the request names them.
    plain = list(client.generate("release-1", 5, seed=7, strength=0.5, shots=0))
    for label, count in (("pos", 2), ("neg", 2), ("mix", 1)):
        for got, shots in ((samples, LIMITS.default_shots), (plain, 0)):
            expected = _expected(llama, release, label, count, seed=7, shots=shots)
            assert [s.text for s in got if s.label == label] == expected
    assert LIMITS.default_shots == 1 and [s.text for s in plain] != [s.text for s in samples]
    again = [s.text for s in client.generate("release-1", 5, seed=7, strength=0.5)]
    assert again == [s.text for s in samples]
    weaker = [s.text for s in client.generate("release-1", 5, seed=7, strength=0.0)]
    assert weaker != again
    only = list(client.generate("release-1", 6, label="neg", seed=1))
    assert [s.label for s in only] == ["neg"] * 6
    # Post-processing: nothing in the coordinator's store (no ledger row, no file) changed.
    assert {p.name: p.stat().st_mtime_ns for p in store.iterdir()} == files_before


def test_a_request_asks_with_its_instruction_variants(
    client: SynthesisClient, llama: LoadedModel, store: Path
) -> None:
    release = load_release(store / "release-1.safetensors")
    variants = ("A {label} note:\n", "Some {label} words:\n")
    got = list(client.generate("release-1", 5, seed=7, strength=0.5, variants=variants))
    for label, count in (("pos", 2), ("neg", 2), ("mix", 1)):
        expected = _expected(
            llama, release, label, count, seed=7, shots=LIMITS.default_shots, variants=variants
        )
        assert [s.text for s in got if s.label == label] == expected
    plain = [s.text for s in client.generate("release-1", 5, seed=7, strength=0.5)]
    assert plain != [s.text for s in got]
    # The long variant of the status table fits without shots.
    alone = client.generate("release-1", 1, seed=7, shots=0, variants=["{label}" + " x" * 96])
    assert len(list(alone)) == 1


def test_variants_are_held_to_the_servers_limits() -> None:
    params = validate_generate_request(
        request(variants=["A {label} note:"]), release_labels=LABELS, limits=LIMITS
    )
    assert params.variants == ("A {label} note:",)
    assert validate_generate_request(request(), release_labels=LABELS, limits=LIMITS).variants == ()
    one = dataclasses.replace(LIMITS, max_variants=1)
    with pytest.raises(ConfigError, match="variants: 2 given, this server takes at most 1"):
        validate_generate_request(
            request(variants=["A {label}", "B {label}"]), release_labels=LABELS, limits=one
        )
    with pytest.raises(ConfigError, match="201 characters, the limit is 200"):
        validate_generate_request(
            request(variants=["{label}" + "x" * 194]), release_labels=LABELS, limits=LIMITS
        )
    with pytest.raises(ConfigError, match=re.escape("its only slot must be {label}")):
        validate_generate_request(
            request(variants=["A {label} of {film}"]), release_labels=LABELS, limits=LIMITS
        )
    with pytest.raises(ConfigError, match="max_variants=-1: must be >= 0"):
        SynthesisLimits(max_variants=-1)


def test_selected_stream_is_the_best_of_each_batch(
    client: SynthesisClient, server: SynthesisServer, llama: LoadedModel, store: Path
) -> None:
    release = load_release(store / "release-1.safetensors")
    before = server.servicer.stats.generated
    got = list(client.generate("release-1", 10, seed=3, strength=0.5, select=0.5))
    assert [s.index for s in got] == list(range(10))
    assert [s.label for s in got] == ["pos"] * 4 + ["neg"] * 3 + ["mix"] * 3
    # Each label's samples are the best GENERATION.batch_size of every twice as many.
    assert server.servicer.stats.generated - before == 20
    for label, count in (("pos", 4), ("neg", 3), ("mix", 3)):
        expected = _expected(
            llama,
            release,
            label,
            count,
            seed=3,
            shots=LIMITS.default_shots,
            select=0.5,
            select_chunk=GENERATION.batch_size,
        )
        assert [s.text for s in got if s.label == label] == expected
    unselected = [s.text for s in client.generate("release-1", 10, seed=3, strength=0.5)]
    assert unselected != [s.text for s in got]


def test_selection_without_a_reader_is_refused_and_a_reader_loads_once(
    store: Path, llama: LoadedModel, pki: Pki, tokens: Path
) -> None:
    class OtherBackend:
        """The tiny model behind a backend that cannot read samples (as llama.cpp)."""

        backend = "other"

        def __init__(self, loaded: LoadedModel) -> None:
            self._inner = as_backend(loaded)

        def __getattr__(self, name: str) -> Any:
            if name == "loaded":  # no transformers model to be found behind it
                raise AttributeError(name)
            return getattr(self._inner, name)

    other: Any = OtherBackend(llama)
    loads: list[int] = []

    def reader() -> LoadedModel:
        loads.append(1)
        return llama

    for factory in (None, reader):
        with (
            start(store, other, pki, tokens, reader=factory) as running,
            SynthesisClient(running.address, token=TOKEN, ca_cert=pki.ca) as c,
        ):
            assert len(list(c.generate("release-1", 3, seed=1))) == 3  # no selection: fine
            if factory is None:
                code, details = status_of(lambda c=c: c.generate("release-1", 3, select=0.5))
                assert code == grpc.StatusCode.INVALID_ARGUMENT
                assert "select=0.5: this server generates on other" in details
            else:
                for _ in range(2):
                    assert len(list(c.generate("release-1", 3, seed=1, select=0.5))) == 3
    assert loads == [1]


def test_selection_is_charged_for_what_it_generates() -> None:
    limits = SynthesisLimits(max_samples=50, sample_burst=60, request_burst=100)
    params = validate_generate_request(
        request(n=30, select=0.5, shots=0), release_labels=LABELS, limits=limits, batch_size=4
    )
    assert generated_samples(params, batch=4) == 60  # 10 per label, in batches of 4, 4, 2
    with pytest.raises(
        ConfigError, match=r"n=31 with select=0\.5, shots=0: 62 samples to generate"
    ):
        validate_generate_request(
            request(n=31, select=0.5, shots=0), release_labels=LABELS, limits=limits, batch_size=4
        )
    assert generated_samples(dataclasses.replace(params, select=1.0), batch=4) == 30
    with pytest.raises(ConfigError, match="min_select=0"):
        SynthesisLimits(min_select=0)


def test_serving_burst_covers_what_selection_generates() -> None:
    assert serving_sample_burst(10_000, 1.0) == 50_000  # never below the default burst
    assert serving_sample_burst(40_000, 0.5) == 80_000
    assert serving_sample_burst(40_000, 0.3) == 133_334  # rounded up, not down
    for bad in (0.0, 1.5, math.nan):
        with pytest.raises(ConfigError, match=r"min_select=.*must be a fraction"):
            serving_sample_burst(10, bad)


def test_shot_pools_are_charged_too() -> None:
    # With shots each label first generates its pool: as many as the label, at most 64.
    params = validate_generate_request(
        request(n=30, shots=1), release_labels=LABELS, limits=LIMITS, batch_size=4
    )
    assert generated_samples(params, batch=4) == 30 + 3 * 10
    assert generated_samples(dataclasses.replace(params, select=0.5), batch=4) == 60 + 3 * 20
    big = dataclasses.replace(params, n=600)
    assert generated_samples(big, batch=4) == 600 + 3 * SHOT_POOL
    assert generated_samples(dataclasses.replace(big, shots=0), batch=4) == 600
    limits = SynthesisLimits(max_samples=50, sample_burst=60, request_burst=100)
    with pytest.raises(ConfigError, match=r"n=40 with select=1\.0, shots=1: 80 samples"):
        validate_generate_request(
            request(n=40, shots=1), release_labels=LABELS, limits=limits, batch_size=4
        )


def test_wrong_or_missing_token_is_unauthenticated(server: SynthesisServer, pki: Pki) -> None:
    with SynthesisClient(server.address, token="not-the-token-0000000000", ca_cert=pki.ca) as bad:
        for call in (
            bad.list_releases,
            lambda: bad.privacy_report("release-1"),
            lambda: bad.generate("release-1", 1),
        ):
            code, details = status_of(call)
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert "not valid" in details
    channel = secure_channel(server.address, pki.ca)
    stub = channel.unary_unary("/fedsynth.synthesis.v1.Synthesis/ListReleases")
    code, details = status_of(lambda: stub(b"", timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "0 headers" in details
    basic = (("authorization", f"Basic {TOKEN}"),)
    code, _ = status_of(lambda: stub(b"", metadata=basic, timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    channel.close()


def _silent_calls(
    address: str, ca: Path, count: int, *, token: str | None = None
) -> tuple[grpc.Channel, threading.Event, list[Any]]:
    """``count`` Generate calls that send their headers and then never their request."""
    channel = secure_channel(address, ca)
    release = threading.Event()

    def never() -> Iterator[bytes]:
        release.wait(30)
        return
        yield b""  # a generator that sends nothing until released

    method = channel.stream_stream("/fedsynth.synthesis.v1.Synthesis/Generate")
    metadata = None if token is None else (("authorization", f"Bearer {token}"),)
    calls = [method(never(), metadata=metadata, timeout=30) for _ in range(count)]
    return channel, release, calls


def test_calls_without_a_token_cannot_hold_the_servers_slots(
    store: Path, llama: LoadedModel, pki: Pki, tokens: Path
) -> None:
    # Every slot taken by a caller that sends headers without a token, then nothing: each is
    # refused from its headers at once, not left waiting for a request message.
    limits = dataclasses.replace(LIMITS, max_concurrent_rpcs=4)
    with start(store, llama, pki, tokens, limits=limits) as running:
        channel, release, calls = _silent_calls(running.address, pki.ca, 4)
        try:
            began = time.monotonic()
            assert [c.code() for c in calls] == [grpc.StatusCode.UNAUTHENTICATED] * 4
            assert time.monotonic() - began < 10
            with SynthesisClient(running.address, token=TOKEN, ca_cert=pki.ca, timeout=10) as c:
                assert [r.release_id for r in c.list_releases()] == ["release-1"]
        finally:
            release.set()
            channel.close()


def _await_open_calls(limiter: Any, token: str, count: int) -> int:
    """The token's open calls once they reach ``count`` (or after 10 s, whatever they are)."""
    deadline = time.monotonic() + 10
    while limiter.open_calls(token_id(token)) != count and time.monotonic() < deadline:
        time.sleep(0.02)
    opened: int = limiter.open_calls(token_id(token))
    return opened


def test_one_token_cannot_hold_every_slot(
    store: Path, llama: LoadedModel, pki: Pki, tokens: Path
) -> None:
    limits = dataclasses.replace(LIMITS, max_concurrent_rpcs=4, max_calls_per_token=2)
    with start(store, llama, pki, tokens, limits=limits) as running:
        # Two calls of TOKEN stay open (a reader that never sends or reads on): its limit.
        channel, release, _calls = _silent_calls(running.address, pki.ca, 2, token=TOKEN)
        try:
            limiter = running.servicer._limiter
            assert _await_open_calls(limiter, TOKEN, 2) == 2
            with SynthesisClient(running.address, token=TOKEN, ca_cert=pki.ca, timeout=10) as c:
                code, details = status_of(c.list_releases)
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert details.startswith(f"calls: token {token_id(TOKEN)} has 2 calls open")
            with SynthesisClient(
                running.address, token=OTHER_TOKEN, ca_cert=pki.ca, timeout=10
            ) as other:
                assert [r.release_id for r in other.list_releases()] == ["release-1"]
                assert len(list(other.generate("release-1", 2))) == 2
        finally:
            release.set()
            channel.close()
        # Once its calls end the token may call again.
        assert _await_open_calls(limiter, TOKEN, 0) == 0
        with SynthesisClient(running.address, token=TOKEN, ca_cert=pki.ca, timeout=10) as c:
            assert [r.release_id for r in c.list_releases()] == ["release-1"]


def test_a_token_holder_that_never_sends_its_request_is_cut_off(
    store: Path, llama: LoadedModel, pki: Pki, tokens: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A consumer with a valid token sends its headers and then nothing: the call is cancelled
    # after request_timeout_s, which frees the token's call for its next request.
    limits = dataclasses.replace(LIMITS, max_calls_per_token=1, request_timeout_s=1.0)
    with caplog.at_level("INFO"), start(store, llama, pki, tokens, limits=limits) as running:
        channel, release, calls = _silent_calls(running.address, pki.ca, 1, token=TOKEN)
        try:
            began = time.monotonic()
            assert calls[0].code() == grpc.StatusCode.CANCELLED
            assert time.monotonic() - began < 10  # not the call's own 30 s deadline
            said = "GenerateRequest: no request message within 1 s"
            deadline = time.monotonic() + 10  # the handler logs once its wait has ended
            while said not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.02)
            assert said in caplog.text
            assert _await_open_calls(running.servicer._limiter, TOKEN, 0) == 0
            with SynthesisClient(running.address, token=TOKEN, ca_cert=pki.ca, timeout=10) as c:
                assert [r.release_id for r in c.list_releases()] == ["release-1"]
                assert len(list(c.generate("release-1", 2))) == 2  # in time: served as before
        finally:
            release.set()
            channel.close()
    with pytest.raises(ConfigError, match="request_timeout_s=0"):
        SynthesisLimits(request_timeout_s=0)


def test_tls_is_required_and_checked(server: SynthesisServer, pki: Pki) -> None:
    with SynthesisClient(server.address, token=TOKEN, ca_cert=pki.other_ca, timeout=10) as c:
        code, _ = status_of(c.list_releases)
        assert code == grpc.StatusCode.UNAVAILABLE
    with SynthesisClient(server.address, token=TOKEN, insecure=True, timeout=10) as c:
        code, _ = status_of(c.list_releases)
        assert code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("kwargs", "code", "words"),
    [
        ({"release_id": "nope", "n": 1}, grpc.StatusCode.NOT_FOUND, ["release_id='nope'"]),
        (
            {"release_id": "release-2", "n": 1},  # the tampered file's release
            grpc.StatusCode.NOT_FOUND,
            ["release-2"],
        ),
        ({"release_id": "release-1", "n": 0}, grpc.StatusCode.INVALID_ARGUMENT, ["n=0", "50"]),
        ({"release_id": "release-1", "n": -3}, grpc.StatusCode.INVALID_ARGUMENT, ["n=-3"]),
        (
            {"release_id": "release-1", "n": 51},
            grpc.StatusCode.INVALID_ARGUMENT,
            ["n=51", "max_samples=50"],
        ),
        (
            {"release_id": "release-1", "n": 1, "label": "other"},
            grpc.StatusCode.INVALID_ARGUMENT,
            ["label='other'", "pos, neg, mix"],
        ),
        (
            {"release_id": "release-1", "n": 1, "strength": 1.5},
            grpc.StatusCode.INVALID_ARGUMENT,
            ["strength=1.5", "max_strength=1.0"],
        ),
        (
            {"release_id": "release-1", "n": 1, "strength": -0.1},
            grpc.StatusCode.INVALID_ARGUMENT,
            ["strength=-0.1"],
        ),
        (
            {"release_id": "release-1", "n": 1, "shots": 9},
            grpc.StatusCode.INVALID_ARGUMENT,
            ["shots=9", "max_shots=8"],
        ),
        (
            {"release_id": "release-1", "n": 1, "shots": -1},
            grpc.StatusCode.INVALID_ARGUMENT,
            ["shots=-1"],
        ),
        (
            {"release_id": "release-1", "n": 1, "variants": ["A {label} note:", "A note:"]},
            grpc.StatusCode.INVALID_ARGUMENT,
            ["variant='A note:'", "lacks a {label} slot"],
        ),
        (
            # Fits alone, not with two shots before it in the tiny model's 256 positions.
            {"release_id": "release-1", "n": 1, "shots": 2, "variants": ["{label}" + " x" * 96]},
            grpc.StatusCode.INVALID_ARGUMENT,
            ["variants: a ", "with 2 shots", "context of 256 tokens"],
        ),
    ],
)
def test_bad_generate_requests_get_clear_statuses(
    client: SynthesisClient, kwargs: dict[str, Any], code: grpc.StatusCode, words: list[str]
) -> None:
    release_id, n = kwargs.pop("release_id"), kwargs.pop("n")
    got, details = status_of(lambda: client.generate(release_id, n, **kwargs))
    assert got == code
    for word in words:
        assert word in details


def test_unknown_release_report_is_not_found(client: SynthesisClient) -> None:
    code, details = status_of(lambda: client.privacy_report("release-9"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "release-9" in details


def test_an_oversized_request_is_refused_and_the_server_keeps_serving(
    client: SynthesisClient,
) -> None:
    code, details = status_of(lambda: client.generate("x" * 10_000, 1))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "4096" in details
    code, details = status_of(lambda: client.generate("y" * 300, 1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "300 characters" in details
    assert [r.release_id for r in client.list_releases()] == ["release-1"]


# ---------------------------------------------------------------------------------------------
# Back-pressure and cancellation
# ---------------------------------------------------------------------------------------------


class ModelCalls:
    """Counts the samples the model actually generates (below the service's own counters)."""

    def __init__(self) -> None:
        self.samples = 0
        self.lock = threading.Lock()

    def settle(self, *, quiet: float = 1.0, limit: float = 30.0) -> int:
        """The count once it has not changed for ``quiet`` seconds."""
        deadline = time.monotonic() + limit
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            with self.lock:
                now = self.samples
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return now
            time.sleep(0.05)
        raise AssertionError(f"generation never settled (at {last} samples)")


@pytest.fixture()
def model_calls(monkeypatch: pytest.MonkeyPatch) -> ModelCalls:
    calls = ModelCalls()
    real = TransformersBackend.generate

    def counting(self: TransformersBackend, prompts: list[str], **kwargs: Any) -> list[str]:
        texts = real(self, prompts, **kwargs)
        with calls.lock:
            calls.samples += len(texts)
        return texts

    monkeypatch.setattr(TransformersBackend, "generate", counting)
    return calls


def test_a_stalled_reader_holds_generation_at_one_batch_and_cancel_stops_it(
    tmp_path: Path,
    store: Path,
    llama: LoadedModel,
    pki: Pki,
    tokens: Path,
    model_calls: ModelCalls,
) -> None:
    batch, n = 4, 2000
    generation = GenerationConfig(max_new_tokens=16, batch_size=batch, stop_at_newline=False)
    limits = SynthesisLimits(max_samples=n, sample_burst=n)
    # The client advertises a small, fixed HTTP/2 window: what the transport may hold in flight.
    window = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    with (
        start(store, llama, pki, tokens, limits=limits, generation=generation) as running,
        SynthesisClient(running.address, token=TOKEN, ca_cert=pki.ca, options=window) as client,
    ):
        # Without shots: a shot pool (at most 64 texts, made before the first sample) would add
        # a fixed cost to what the model does for this reader.
        stream = client.generate("release-1", n, label="pos", shots=0)
        first = next(stream)
        assert first.index == 0
        stalled = model_calls.settle()
        stats = running.servicer.stats
        # The model stopped long before n: at most one batch beyond what the transport took.
        assert stalled < 200, f"{stalled} samples generated for a reader that took one"
        assert stalled - stats.sent <= batch
        assert stats.generated == stalled
        assert stats.active_streams == 1
        stream.cancel()
        deadline = time.monotonic() + 10
        while stats.active_streams and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stats.active_streams == 0
        assert stats.streams_stopped == 1
        after = model_calls.settle(quiet=0.5)
        assert after <= stalled + batch
        time.sleep(0.5)
        assert model_calls.samples == after


# ---------------------------------------------------------------------------------------------
# Rate limits
# ---------------------------------------------------------------------------------------------


def test_rate_limits_are_per_token(store: Path, llama: LoadedModel, pki: Pki, tokens: Path) -> None:
    limits = SynthesisLimits(
        max_samples=10,
        request_burst=4,
        requests_per_second=0.01,
        sample_burst=10,
        samples_per_second=0.01,
    )
    with start(store, llama, pki, tokens, limits=limits) as running:
        with SynthesisClient(running.address, token=TOKEN, ca_cert=pki.ca, timeout=60) as first:
            # Request 1 takes every sample (no shots: no shot pool to charge as well).
            assert len(list(first.generate("release-1", 10, shots=0))) == 10
            code, details = status_of(lambda: first.generate("release-1", 1, shots=0))  # 2
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert details.startswith("samples: n=1 asked, 0 left")
            first.list_releases()  # request 3
            first.list_releases()  # request 4
            code, details = status_of(first.list_releases)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert details.startswith("requests:")
            assert TOKEN not in details
            assert token_id(TOKEN) in details
        with SynthesisClient(running.address, token=OTHER_TOKEN, ca_cert=pki.ca) as second:
            assert len(list(second.generate("release-1", 3))) == 3


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------


def run_load(
    address: str, ca: Path, *, streams: int, n: int
) -> tuple[float, list[float], list[int]]:
    """``streams`` concurrent Generate calls: (wall seconds, first-sample latencies, counts)."""
    latencies = [float("inf")] * streams
    counts = [0] * streams
    barrier = threading.Barrier(streams)

    def one(i: int) -> None:
        with SynthesisClient(address, token=TOKEN, ca_cert=ca, timeout=120) as client:
            client.list_releases()  # connect before the clock starts
            barrier.wait()
            began = time.monotonic()
            for _sample in client.generate("release-1", n, seed=i):
                if counts[i] == 0:
                    latencies[i] = time.monotonic() - began
                counts[i] += 1

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    start_time = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=150)
    return time.monotonic() - start_time, latencies, counts


def test_load_32_concurrent_streams_all_complete(
    store: Path, llama: LoadedModel, pki: Pki, tokens: Path
) -> None:
    streams, n = 32, 4
    with start(store, llama, pki, tokens) as running:
        _wall, latencies, counts = run_load(running.address, pki.ca, streams=streams, n=n)
        assert counts == [n] * streams  # every stream completed, none starved
        assert all(math.isfinite(t) for t in latencies)  # each got its first sample
        # The server closes a stream's books just after its last sample went out.
        stats = running.servicer.stats
        deadline = time.monotonic() + 30
        while stats.active_streams and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stats.streams_completed == streams
        assert stats.active_streams == 0
    # Speed is a benchmark's business (benchmarks/bench_synthesis.py), not this test's.


# ---------------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------------

LABELS = {"r": ("a", "b", "c")}


def request(**fields: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(**{"release_id": "r", "n": 3, **fields})


def test_validation_accepts_and_fills_defaults() -> None:
    params = validate_generate_request(request(seed=9), release_labels=LABELS, limits=LIMITS)
    assert (params.release_id, params.n, params.labels, params.seed) == ("r", 3, ("a", "b", "c"), 9)
    assert params.strength == LIMITS.default_strength == 0.03
    params = validate_generate_request(
        request(label="b", strength=0.0, n=50), release_labels=LABELS, limits=LIMITS
    )
    assert (params.labels, params.strength, params.n) == (("b",), 0.0, 50)
    assert validate_generate_request(request(), release_labels=LABELS, limits=LIMITS).shots == 1
    for shots in (0, 8):
        params = validate_generate_request(
            request(shots=shots), release_labels=LABELS, limits=LIMITS
        )
        assert params.shots == shots


@pytest.mark.parametrize(
    ("fields", "error", "words"),
    [
        ({"release_id": ""}, ConfigError, "release_id: empty"),
        ({"release_id": "z" * 257}, ConfigError, "257 characters, the limit is 256"),
        ({"release_id": "q"}, UnknownReleaseError, "release_id='q'"),
        ({"n": 0}, ConfigError, r"n=0: must be in \[1, max_samples=50\]"),
        ({"n": 51}, ConfigError, "n=51"),
        ({"n": -(2**63)}, ConfigError, "n=-9223372036854775808"),
        ({"label": "d"}, ConfigError, "label='d': not a label of release 'r'"),
        ({"strength": float("nan")}, ConfigError, "strength=nan"),
        ({"strength": float("inf")}, ConfigError, "strength=inf"),
        ({"strength": 1.0000001}, ConfigError, "max_strength=1.0"),
        ({"shots": 9}, ConfigError, r"shots=9: must be in \[0, max_shots=8\]"),
        ({"shots": -(2**63)}, ConfigError, "shots=-9223372036854775808"),
        ({"select": 0.2}, ConfigError, r"select=0.2: must be in \[min_select=0.25, 1\]"),
        ({"select": 1.5}, ConfigError, "select=1.5"),
        ({"select": float("nan")}, ConfigError, "select=nan"),
    ],
)
def test_validation_refuses_naming_the_field(
    fields: dict[str, Any], error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words):
        validate_generate_request(request(**fields), release_labels=LABELS, limits=LIMITS)


def test_status_codes() -> None:
    assert status_code_for(AuthenticationError("x")) == grpc.StatusCode.UNAUTHENTICATED
    assert status_code_for(RateLimitError("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_code_for(UnknownReleaseError("x")) == grpc.StatusCode.NOT_FOUND
    assert status_code_for(ConfigError("x")) == grpc.StatusCode.INVALID_ARGUMENT


def test_split_counts_and_label_seeds() -> None:
    assert split_counts(5, 3) == [2, 2, 1]
    assert split_counts(2, 3) == [1, 1, 0]
    assert split_counts(9, 3) == [3, 3, 3]
    assert len({label_seed(0, x) for x in "abc"} | {label_seed(1, "a")}) == 4
    assert label_seed(5, "a") == label_seed(5, "a") < 2**32


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(capacity=10, rate=2.0, now=0.0)
    assert bucket.wait_for(10, 0.0) == 0.0
    bucket.take(10, 0.0)
    assert bucket.wait_for(1, 0.0) == pytest.approx(0.5)
    assert bucket.available(1.0) == pytest.approx(2.0)
    assert bucket.available(100.0) == 10  # capped at capacity


def test_rate_limiter_refuses_without_charging_and_refills() -> None:
    clock = [0.0]
    limiter = RateLimiter(
        SynthesisLimits(
            max_samples=5,
            request_burst=2,
            requests_per_second=1,
            sample_burst=5,
            samples_per_second=1,
        ),
        clock=lambda: clock[0],
    )
    limiter.take_request("a")
    limiter.take_samples("a", 5)
    with pytest.raises(RateLimitError, match=r"samples: n=1 asked, 0 left .* retry in 1\.0 s"):
        limiter.take_samples("a", 1)
    limiter.take_request("a")
    with pytest.raises(RateLimitError, match="requests: token a"):
        limiter.take_request("a")
    limiter.take_request("b")  # another token has its own allowance
    clock[0] = 1.0
    limiter.take_request("a")
    limiter.take_samples("a", 1)


def test_bearer_check() -> None:
    tokens = [TOKEN, OTHER_TOKEN]
    assert check_bearer([("authorization", f"Bearer {OTHER_TOKEN}")], tokens) == token_id(
        OTHER_TOKEN
    )
    assert check_bearer([("Authorization", f"bearer {TOKEN}".encode())], tokens) == token_id(TOKEN)
    for metadata in (
        [],
        [("authorization", TOKEN)],
        [("authorization", f"Bearer {TOKEN[:-1]}")],
        [("authorization", f"Bearer {TOKEN}x")],
        [("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}")],
    ):
        with pytest.raises(AuthenticationError):
            check_bearer(metadata, tokens)


def test_token_file_must_be_private_and_strong(tmp_path: Path) -> None:
    good = write_token_file(tmp_path / "good", TOKEN, OTHER_TOKEN)
    assert read_token_file(good) == [TOKEN, OTHER_TOKEN]
    loose = write_token_file(tmp_path / "loose", TOKEN, mode=0o644)
    with pytest.raises(ConfigError, match=r"mode 0644 .* must be 0600"):
        read_token_file(loose)
    with pytest.raises(ConfigError, match="has 5 characters"):
        read_token_file(write_token_file(tmp_path / "short", "short"))
    with pytest.raises(ConfigError, match="no token"):
        read_token_file(write_token_file(tmp_path / "empty", ""))
    with pytest.raises(ConfigError, match="token_file="):
        read_token_file(tmp_path / "missing")


def test_bad_certificates_are_refused_by_name(
    pki: Pki, store: Path, llama: LoadedModel, tokens: Path
) -> None:
    with pytest.raises(CertificateError, match=r"expired\.pem: valid from"):
        server_credentials(pki.expired_cert, pki.key)
    with pytest.raises(CertificateError, match=r"wrong\.key is not the key of"):
        server_credentials(pki.cert, pki.wrong_key)
    with pytest.raises(CertificateError, match="not a PEM certificate"):
        server_credentials(pki.key, pki.key)
    with pytest.raises(ConfigError, match="tls_cert and tls_key: both required"):
        serve(releases=store, loaded=llama, token_file=tokens, tls_cert=pki.cert)
    with pytest.raises(ConfigError, match="choose one"):
        serve(
            releases=store,
            loaded=llama,
            token_file=tokens,
            tls_cert=pki.cert,
            tls_key=pki.key,
            insecure=True,
        )


def test_insecure_is_explicit_and_logged(
    store: Path, llama: LoadedModel, tokens: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        serve(releases=store, loaded=llama, token_file=tokens, insecure=True) as running,
        SynthesisClient(running.address, token=TOKEN, insecure=True) as client,
    ):
        assert [r.release_id for r in client.list_releases()] == ["release-1"]
    assert "WITHOUT TLS" in caplog.text


def test_limits_are_validated() -> None:
    with pytest.raises(ConfigError, match="sample_burst=5: must be >= max_samples=10"):
        SynthesisLimits(max_samples=10, sample_burst=5)
    with pytest.raises(ConfigError, match="max_samples=0"):
        SynthesisLimits(max_samples=0)
    with pytest.raises(ConfigError, match="requests_per_second=nan"):
        SynthesisLimits(requests_per_second=float("nan"))
    with pytest.raises(ConfigError, match=r"default_strength=2\.0"):
        SynthesisLimits(default_strength=2.0)
    with pytest.raises(ConfigError, match=r"default_shots=3: must be in \[0, max_shots=2\]"):
        SynthesisLimits(default_shots=3, max_shots=2)
    with pytest.raises(ConfigError, match="default_shots=-1"):
        SynthesisLimits(default_shots=-1)


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def test_pull_writes_json_lines_with_plain_progress(
    server: SynthesisServer, pki: Pki, client_token: Path, client: SynthesisClient, tmp_path: Path
) -> None:
    out = tmp_path / "out" / "samples.jsonl"
    common = ["--server", server.address, "--ca", str(pki.ca), "--token-file", str(client_token)]
    result = CliRunner().invoke(
        synthesis_app,
        ["pull", "--release", "release-1", "--n", "7", "--out", str(out), "--seed", "3", *common],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 7
    assert [r["label"] for r in rows] == ["pos"] * 3 + ["neg"] * 2 + ["mix"] * 2
    assert all(set(r) == {"text", "label", "release_id"} for r in rows)
    assert {r["release_id"] for r in rows} == {"release-1"}
    assert "pulled 7/7 samples (100%)" in result.output  # not a TTY: plain lines
    assert list(out.parent.iterdir()) == [out]  # no temporary file left
    # --shots goes to the server: what it streams for that request, refused above its limit.
    plain = tmp_path / "plain.jsonl"
    pull = ["pull", "--release", "release-1", "--n", "3", "--seed", "3", *common]
    result = CliRunner().invoke(synthesis_app, [*pull, "--out", str(plain), "--shots", "0"])
    assert result.exit_code == 0, result.output
    expected = [s.text for s in client.generate("release-1", 3, seed=3, shots=0)]
    assert [json.loads(line)["text"] for line in plain.read_text().splitlines()] == expected
    assert expected != [s.text for s in client.generate("release-1", 3, seed=3)]
    refused = CliRunner().invoke(synthesis_app, [*pull, "--out", str(plain), "--shots", "9"])
    assert refused.exit_code == 2 and "max_shots=8" in refused.output
    # --variant too, a typed \n read as a line break.
    varied = tmp_path / "varied.jsonl"
    asked = ["--variant", "A {label} note:\\n", "--variant", "Some {label} words:\\n"]
    result = CliRunner().invoke(synthesis_app, [*pull, "--out", str(varied), *asked])
    assert result.exit_code == 0, result.output
    variants = ("A {label} note:\n", "Some {label} words:\n")
    expected = [s.text for s in client.generate("release-1", 3, seed=3, variants=variants)]
    assert [json.loads(line)["text"] for line in varied.read_text().splitlines()] == expected

    listed = CliRunner().invoke(synthesis_app, ["list", *common])
    assert listed.exit_code == 0, listed.output
    assert "release-1" in listed.output and "TRUST_MODE_DISTRIBUTED" in listed.output
    assert "release-2" not in listed.output
    report = CliRunner().invoke(synthesis_app, ["report", "release-1", *common])
    assert report.exit_code == 0, report.output
    assert json.loads(report.output)["trust_mode"] == "distributed"
    steering = CliRunner().invoke(synthesis_app, ["report", "release-1", "--steering", *common])
    assert steering.exit_code == 0, steering.output
    assert set(json.loads(steering.output)["classes"]) == {"pos", "neg", "mix"}


def test_pull_errors_leave_no_file(server: SynthesisServer, pki: Pki, tmp_path: Path) -> None:
    wrong = write_token_file(tmp_path / "wrong", "wrong-token-0000000000000")
    out = tmp_path / "samples.jsonl"
    base = ["pull", "--release", "release-1", "--out", str(out), "--server", server.address]
    cases = [
        (["--n", "2", "--ca", str(pki.ca), "--token-file", str(wrong)], "UNAUTHENTICATED"),
        (["--n", "51", "--ca", str(pki.ca), "--token-file", str(wrong)], "UNAUTHENTICATED"),
        (["--n", "0", "--ca", str(pki.ca), "--token-file", str(wrong)], "n=0"),
        (["--n", "2", "--token-file", str(wrong)], "ca_cert"),
        (["--n", "2", "--ca", str(pki.other_ca), "--token-file", str(wrong)], "UNAVAILABLE"),
        # Beyond the wire's int64: refused by the option, not a traceback from protobuf.
        (["--n", str(2**63), "--ca", str(pki.ca), "--token-file", str(wrong)], "--n"),
        (
            ["--n", "2", "--shots", str(2**63), "--ca", str(pki.ca), "--token-file", str(wrong)],
            "--shots",
        ),
    ]
    for extra, words in cases:
        result = CliRunner().invoke(synthesis_app, [*base, *extra])
        assert result.exit_code == 2, result.output
        assert words in result.output
        assert not out.exists()
    assert list(tmp_path.iterdir()) == [wrong]


def test_serve_refuses_a_bad_contrast_or_request_timeout(tmp_path: Path) -> None:
    serve = ["serve", "--releases", str(tmp_path), "--model", "no-such-model"]
    serve += ["--token-file", str(tmp_path / "t"), "--insecure"]
    for option, value, said in (
        ("--contrast", "nan", "contrast=nan"),
        ("--request-timeout", "0", "request_timeout_s=0"),
    ):
        result = CliRunner().invoke(synthesis_app, [*serve, option, value])
        assert result.exit_code == 2, result.output
        assert said in result.output


@pytest.mark.parametrize("min_select", ["0", "nan", "1.5"])
def test_serve_refuses_a_bad_min_select_by_name(tmp_path: Path, min_select: str) -> None:
    serve = ["serve", "--releases", str(tmp_path), "--model", "no-such-model"]
    serve += ["--token-file", str(tmp_path / "t"), "--insecure", "--min-select", min_select]
    result = CliRunner().invoke(synthesis_app, serve)
    assert result.exit_code == 2, result.output
    assert f"min_select={min_select}" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_serve_passes_its_limits_to_the_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsynth.server import synthesis_service

    seen: list[SynthesisLimits] = []
    contrasts: list[float] = []

    def fake_serve(**kwargs: Any) -> None:
        seen.append(kwargs["limits"])
        contrasts.append(kwargs["contrast"])
        raise ConfigError("stopped before serving")

    monkeypatch.setattr(synthesis_service, "serve", fake_serve)
    serve = ["serve", "--releases", str(tmp_path), "--model", "tiny-llama", "--insecure"]
    serve += ["--token-file", str(tmp_path / "t"), "--max-calls-per-token", "3"]
    serve += ["--min-select", "0.5", "--max-samples", "40000", "--request-timeout", "5"]
    result = CliRunner().invoke(synthesis_app, [*serve, "--contrast", "2"])
    assert result.exit_code == 2 and "stopped before serving" in result.output
    (limits,) = seen
    assert contrasts == [2.0]
    assert limits.max_calls_per_token == 3 and limits.request_timeout_s == 5.0
    assert limits.min_select == 0.5 and limits.max_samples == 40_000
    assert limits.sample_burst == 80_000  # a request may generate 1 / min_select its samples


def test_serve_command_runs_a_real_server_process(
    store: Path, pki: Pki, tokens: Path, client_token: Path, tmp_path: Path
) -> None:
    code = "from fedsynth.server.synthesis_client import synthesis_app; synthesis_app()"
    command = [
        sys.executable,
        "-c",
        code,
        "serve",
        "--releases",
        str(store),
        "--model",
        "tiny-llama",
        "--port",
        "0",
        "--tls-cert",
        str(pki.cert),
        "--tls-key",
        str(pki.key),
        "--token-file",
        str(tokens),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        assert process.stdout is not None
        line = ""
        deadline = time.monotonic() + 120
        while "listening on" not in line and time.monotonic() < deadline:
            line = process.stdout.readline().decode()
            assert line or process.poll() is None, "the server exited before listening"
        address = line.split("listening on ")[1].split()[0]
        assert "(1 releases)" in line
        out = tmp_path / "pulled.jsonl"
        result = CliRunner().invoke(
            synthesis_app,
            [
                "pull",
                "--release",
                "release-1",
                "--n",
                "3",
                "--out",
                str(out),
                "--label",
                "mix",
                "--server",
                address,
                "--ca",
                str(pki.ca),
                "--token-file",
                str(client_token),
            ],
        )
        assert result.exit_code == 0, result.output
        assert [json.loads(x)["label"] for x in out.read_text().splitlines()] == ["mix"] * 3
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert process.returncode == 0


# ---------------------------------------------------------------------------------------------
# Generated code
# ---------------------------------------------------------------------------------------------


def test_generated_wire_code_is_up_to_date(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    subprocess.run(
        [sys.executable, str(root / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    committed = root / "protocol" / "wire"
    fresh = sorted(p.name for p in tmp_path.iterdir())
    assert fresh == sorted(p.name for p in committed.iterdir() if p.is_file())
    assert {"__init__.py", "synthesis_pb2.py", "synthesis_pb2.pyi", "synthesis_pb2_grpc.py"} <= set(
        fresh
    )
    for name in fresh:
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), (
            f"protocol/wire/{name} is not what proto/ generates: run python scripts/gen_proto.py "
            "(with the grpcio-tools version of the dev extra)"
        )


def test_serve_defaults_are_the_services() -> None:
    import inspect

    from fedsynth.server import synthesis_service
    from fedsynth.server.synthesis_client import serve_command

    defaults = {n: p.default for n, p in inspect.signature(serve_command).parameters.items()}
    assert defaults["shots"] == synthesis_service.DEFAULT_SHOTS
    assert defaults["max_shots"] == synthesis_service.DEFAULT_MAX_SHOTS
    assert defaults["max_samples"] == synthesis_service.DEFAULT_MAX_SAMPLES
    assert defaults["min_select"] == synthesis_service.DEFAULT_MIN_SELECT
    assert defaults["max_calls_per_token"] == synthesis_service.DEFAULT_MAX_CALLS_PER_TOKEN
    assert defaults["request_timeout"] == synthesis_service.DEFAULT_REQUEST_TIMEOUT_S
    assert defaults["contrast"] == 1.0
    assert (
        synthesis_service.SynthesisLimits().max_calls_per_token == defaults["max_calls_per_token"]
    )


def test_an_unknown_label_error_lists_a_few_labels_and_counts_the_rest() -> None:
    """A release of thousands of labels made the error longer than gRPC's header limit, so the
    consumer saw RESOURCE_EXHAUSTED instead of the reason."""
    from fedsynth.server.synthesis_service import _listed

    labels = [f"label-{i}" for i in range(3000)]
    shown = _listed(labels)
    assert shown.startswith("label-0, label-1,") and shown.endswith("and 2992 more")
    assert len(shown) < 200
    assert _listed(["pos", "neg"]) == "pos, neg"
