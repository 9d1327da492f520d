"""The Synthesis gRPC service: consumers list releases, read privacy reports, stream samples.

Everything served is post-processing of differentially private releases: generating costs no
privacy and nothing here reads or writes the privacy ledger. What the service does protect is
the coordinator itself: TLS and a bearer token on every call (``insecure=True`` is an explicit,
logged choice), a small request-size limit, a per-request sample limit, a per-token rate limit,
and back-pressure: samples are generated in small batches only as the stream is read, so a slow
or stalled reader holds at most one batch on the server, and a cancelled stream stops generating.

Layout: pure pieces (request validation, the token bucket, label splitting, status mapping) are
plain functions and small classes tested directly; the store, the servicer and :func:`serve` are
the I/O edge. Methods are registered with raw-bytes handlers and parsed here, so a malformed
request gets INVALID_ARGUMENT naming the message instead of gRPC's generic INTERNAL.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import functools
import hashlib
import hmac
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NoReturn, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf.message import DecodeError, Message
from safetensors import safe_open

from fedsynth.protocol.errors import (
    AuthenticationError,
    CertificateError,
    ConfigError,
    FedSynthError,
    RateLimitError,
    UnknownReleaseError,
)
from fedsynth.protocol.models import LoadedModel
from fedsynth.protocol.wire import synthesis_pb2 as pb
from fedsynth.server.backends import GenerationBackend, as_backend, check_release_backend
from fedsynth.server.generation import GenerationConfig
from fedsynth.server.release import Release, check_contrast, load_release
from fedsynth.server.selection import selection_chunks
from fedsynth.server.snr import check_release_counts, steering_snr
from fedsynth.server.synthesis_client import read_token_file, token_id
from fedsynth.server.synthesize import (
    SHOT_POOL,
    check_variants,
    check_variants_fit,
    iter_release_samples,
    shot_pool_size,
    transformers_model,
)
from fedsynth.server.vocabulary import (
    FOLLOW_RELEASE,
    check_vocabulary_choice,
    release_vocabulary,
)

logger = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Synthesis"]
DEFAULT_MAX_SAMPLES = 10_000  # per Generate request
DEFAULT_MAX_REQUEST_BYTES = 4096  # every request message is a few ids and numbers
DEFAULT_STRENGTH = 0.03  # the CLI's and the task file's default steering strength
DEFAULT_MAX_STRENGTH = 1.0  # a delta as large as the residual itself: beyond that, noise
DEFAULT_BATCH_SIZE = 8  # samples generated per model call: the most a slow reader keeps waiting
DEFAULT_SHOTS = 1  # own samples shown per sample, as `fedsynth generate`'s default
DEFAULT_MAX_SHOTS = 8  # each shot lengthens every prompt by about one sample
DEFAULT_MIN_SELECT = 0.25  # a request may make the server generate at most 4x what it streams
DEFAULT_MAX_CALLS_PER_TOKEN = 16  # calls one consumer may have open at once
DEFAULT_REQUEST_TIMEOUT_S = 30.0  # an admitted call sends its request message within this
DEFAULT_SAMPLE_BURST = 50_000  # samples a token may request at once, refilled over time
MAX_ID_CHARS = 256  # release ids and labels are short names
DEFAULT_MAX_VARIANTS = 16  # instruction variants one request may ask with
DEFAULT_MAX_VARIANT_CHARS = 200  # characters of each: an instruction, not a document
TRUST_MODES = {
    "distributed": pb.TRUST_MODE_DISTRIBUTED,
    "central": pb.TRUST_MODE_CENTRAL,
    "local": pb.TRUST_MODE_LOCAL,
}


@dataclass(frozen=True)
class SynthesisLimits:
    """What one consumer may ask of the service; every limit is enforced per request or token."""

    max_samples: int = DEFAULT_MAX_SAMPLES
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_strength: float = DEFAULT_MAX_STRENGTH
    default_strength: float = DEFAULT_STRENGTH
    default_shots: int = DEFAULT_SHOTS
    max_shots: int = DEFAULT_MAX_SHOTS
    min_select: float = DEFAULT_MIN_SELECT  # 1: requests cannot ask for selection
    max_variants: int = DEFAULT_MAX_VARIANTS  # 0: requests cannot ask with variants
    max_variant_chars: int = DEFAULT_MAX_VARIANT_CHARS
    request_burst: int = 60  # requests a token may make at once ...
    requests_per_second: float = 2.0  # ... and refilled at this rate
    sample_burst: int = DEFAULT_SAMPLE_BURST  # samples a token may request at once ...
    samples_per_second: float = 500.0  # ... and refilled at this rate
    max_concurrent_rpcs: int = 64  # beyond this, gRPC answers RESOURCE_EXHAUSTED
    # Calls one token may have open at once (a stalled reader keeps its call open): one
    # consumer cannot hold every one of max_concurrent_rpcs.
    max_calls_per_token: int = DEFAULT_MAX_CALLS_PER_TOKEN
    # Seconds an admitted call may take to send its one request message: a consumer that sends
    # its headers and then nothing holds one of its calls this long, not until keepalive.
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S

    def __post_init__(self) -> None:
        for name in (
            "max_samples",
            "max_request_bytes",
            "request_burst",
            "max_concurrent_rpcs",
            "max_calls_per_token",
            "max_variant_chars",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.max_variants < 0:
            raise ConfigError(f"max_variants={self.max_variants}: must be >= 0")
        for name in (
            "requests_per_second",
            "samples_per_second",
            "max_strength",
            "request_timeout_s",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name}={value}: must be a finite number > 0")
        if not 0 <= self.default_strength <= self.max_strength:
            raise ConfigError(
                f"default_strength={self.default_strength}: must be in [0, "
                f"max_strength={self.max_strength}]"
            )
        if not 0 <= self.default_shots <= self.max_shots:
            raise ConfigError(
                f"default_shots={self.default_shots}: must be in [0, max_shots={self.max_shots}]"
            )
        check_min_select(self.min_select)
        if self.sample_burst < self.max_samples:
            raise ConfigError(
                f"sample_burst={self.sample_burst}: must be >= max_samples={self.max_samples}, "
                "or a request of max_samples could never be served"
            )


def check_min_select(min_select: float) -> None:
    """Refuse a least kept fraction outside (0, 1], naming it."""
    if not (math.isfinite(min_select) and 0 < min_select <= 1):
        raise ConfigError(f"min_select={min_select}: must be a fraction in (0, 1]")


def serving_sample_burst(max_samples: int, min_select: float) -> int:
    """The samples a token may request at once for a server with these limits.

    A request may generate up to 1 / ``min_select`` times its samples, so the burst covers
    that, and never falls below the default.
    """
    check_min_select(min_select)  # before it divides
    return max(DEFAULT_SAMPLE_BURST, math.ceil(max_samples / min_select))


# ---------------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateParams:
    """A validated Generate request."""

    release_id: str
    n: int
    labels: tuple[str, ...]  # the labels to generate, in order (all of the release's if none named)
    seed: int
    strength: float
    shots: int = DEFAULT_SHOTS
    select: float = 1.0
    variants: tuple[str, ...] = ()


def _shown(value: str) -> str:
    """A request string as it may appear in an error: quoted, at most 64 characters."""
    return repr(value if len(value) <= 64 else value[:61] + "...")


def _listed(labels: Sequence[str], most: int = 8) -> str:
    """The first ``most`` labels and how many more (an error's text travels in a header)."""
    shown = ", ".join(labels[:most])
    return shown if len(labels) <= most else f"{shown} and {len(labels) - most} more"


def validate_generate_request(
    request: pb.GenerateRequest,
    *,
    release_labels: Mapping[str, Sequence[str]],
    limits: SynthesisLimits,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> GenerateParams:
    """Check a Generate request against the releases on offer and the limits.

    Args:
        request: the parsed request.
        release_labels: release id -> its labels, for every release the service offers.
        limits: the service's limits.
        batch_size: samples per model call (selection picks within each batch).

    Raises:
        UnknownReleaseError: the release id is not on offer (gRPC NOT_FOUND).
        ConfigError: a field is empty, too long or out of range; the message names the field,
            the value and the limit (gRPC INVALID_ARGUMENT).
    """
    release_id = request.release_id
    if not release_id:
        raise ConfigError("release_id: empty; name one of the releases ListReleases returns")
    if len(release_id) > MAX_ID_CHARS:
        raise ConfigError(f"release_id: {len(release_id)} characters, the limit is {MAX_ID_CHARS}")
    if release_id not in release_labels:
        raise UnknownReleaseError(f"release_id={_shown(release_id)}: no such release on offer")
    if not 1 <= request.n <= limits.max_samples:
        raise ConfigError(f"n={request.n}: must be in [1, max_samples={limits.max_samples}]")
    labels = tuple(release_labels[release_id])
    if request.label:
        if request.label not in labels:
            raise ConfigError(
                f"label={_shown(request.label)}: not a label of release {_shown(release_id)} "
                f"(labels: {_listed(labels)})"
            )
        labels = (request.label,)
    strength = limits.default_strength
    if request.HasField("strength"):
        strength = request.strength
        if not (math.isfinite(strength) and 0 <= strength <= limits.max_strength):
            raise ConfigError(
                f"strength={strength}: must be in [0, max_strength={limits.max_strength}]"
            )
    shots = limits.default_shots
    if request.HasField("shots"):
        shots = request.shots
        if not 0 <= shots <= limits.max_shots:
            raise ConfigError(f"shots={shots}: must be in [0, max_shots={limits.max_shots}]")
    select = 1.0
    if request.HasField("select"):
        select = request.select
        if not (math.isfinite(select) and limits.min_select <= select <= 1):
            raise ConfigError(
                f"select={select}: must be in [min_select={limits.min_select}, 1] "
                "(1 keeps every sample)"
            )
    variants = tuple(request.variants)
    if len(variants) > limits.max_variants:
        raise ConfigError(
            f"variants: {len(variants)} given, this server takes at most {limits.max_variants}"
        )
    for variant in variants:
        if len(variant) > limits.max_variant_chars:
            raise ConfigError(
                f"variant={_shown(variant)}: {len(variant)} characters, the limit is "
                f"{limits.max_variant_chars}"
            )
    check_variants(variants)
    params = GenerateParams(
        release_id=release_id,
        n=request.n,
        labels=labels,
        seed=request.seed,
        strength=strength,
        shots=shots,
        select=select,
        variants=variants,
    )
    generated = generated_samples(params, batch=batch_size)
    if generated > limits.sample_burst:
        raise ConfigError(
            f"n={params.n} with select={select}, shots={shots}: {generated} samples to generate "
            f"(shot pools included), more than a token's allowance of {limits.sample_burst}; ask "
            "for fewer, keep a larger fraction or ask for shots=0"
        )
    return params


def generated_samples(params: GenerateParams, *, batch: int, pool_size: int = SHOT_POOL) -> int:
    """Samples the server generates for ``params``, all charged to the token.

    n, more where ``select`` < 1 (each label's samples are selected a ``batch`` at a time, so
    that a stream holds back at most one batch: :func:`fedsynth.server.selection.
    selection_chunks`), and with ``shots`` each label's shot pool: as many plain samples as the
    label generates, at most ``pool_size`` (:func:`fedsynth.server.synthesize.iter_label_texts`).
    """
    total = 0
    for count in split_counts(params.n, len(params.labels)):
        made = sum(generated for _, generated in selection_chunks(count, params.select, batch))
        total += made + shot_pool_size(made, params.shots, pool_size)
    return total


def split_counts(n: int, parts: int) -> list[int]:
    """``n`` split into ``parts`` shares as even as possible, the larger shares first."""
    if parts < 1:
        raise ConfigError(f"parts={parts}: must be >= 1")
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def steering_report(
    release: Release, *, strength: float, contrast: float = 1.0
) -> dict[str, object]:
    """How Generate steers with ``release`` at ``strength`` and the service's ``contrast``.

    Per label and layer the SNR and the shrink factor (the rule generation applies), or why
    the release cannot steer.
    """
    try:
        return steering_snr(release, contrast=contrast).to_dict(strength=strength)
    except FedSynthError as exc:
        return {"unavailable": str(exc)}


def label_seed(seed: int, label: str) -> int:
    """A 32-bit generation seed for one label of a request: distinct labels, distinct streams."""
    digest = hashlib.sha256(f"fedsynth.synthesis.seed:{seed}:{label}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


class TokenBucket:
    """``capacity`` tokens, refilled continuously at ``rate`` per second (not thread-safe)."""

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self._level = capacity
        self._updated = now

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._updated)
        self._level = min(self.capacity, self._level + elapsed * self.rate)
        self._updated = now

    def available(self, now: float) -> float:
        """Tokens available at ``now``."""
        self._refill(now)
        return self._level

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` tokens are available (0.0: available now); takes nothing."""
        self._refill(now)
        return max(0.0, (amount - self._level) / self.rate)

    def take(self, amount: float, now: float) -> None:
        """Remove ``amount`` tokens; the caller checked :meth:`wait_for` first."""
        self._refill(now)
        self._level -= amount


class RateLimiter:
    """Per-token request and sample allowances (two token buckets per consumer token)."""

    def __init__(self, limits: SynthesisLimits, clock: Callable[[], float] = time.monotonic):
        self._limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[TokenBucket, TokenBucket]] = {}
        self._open: collections.Counter[str] = collections.Counter()

    def open_call(self, who: str) -> None:
        """Count one more open call of token ``who``; :meth:`close_call` when it ends.

        Raises:
            RateLimitError: the token already has ``max_calls_per_token`` calls open.
        """
        with self._lock:
            if self._open[who] >= self._limits.max_calls_per_token:
                raise RateLimitError(
                    f"calls: token {who} has {self._open[who]} calls open, at most "
                    f"{self._limits.max_calls_per_token} at once; finish or cancel one first"
                )
            self._open[who] += 1

    def close_call(self, who: str) -> None:
        """One call of token ``who`` ended (completed, cancelled or failed)."""
        with self._lock:
            self._open[who] -= 1
            if self._open[who] <= 0:
                del self._open[who]

    def open_calls(self, who: str) -> int:
        """Calls of token ``who`` open now."""
        with self._lock:
            return self._open[who]

    def _pair(self, who: str, now: float) -> tuple[TokenBucket, TokenBucket]:
        pair = self._buckets.get(who)
        if pair is None:
            limits = self._limits
            pair = (
                TokenBucket(limits.request_burst, limits.requests_per_second, now),
                TokenBucket(limits.sample_burst, limits.samples_per_second, now),
            )
            self._buckets[who] = pair
        return pair

    def take_request(self, who: str) -> None:
        """Charge one request to token ``who`` (every request, valid or not, counts).

        Raises:
            RateLimitError: naming the allowance and when to retry.
        """
        with self._lock:
            now = self._clock()
            requests = self._pair(who, now)[0]
            wait = requests.wait_for(1, now)
            if wait > 0:
                raise RateLimitError(
                    f"requests: token {who} used its allowance ({self._limits.request_burst} at "
                    f"once, {self._limits.requests_per_second}/s); retry in {wait:.1f} s"
                )
            requests.take(1, now)

    def take_samples(self, who: str, samples: int) -> None:
        """Charge ``samples`` samples to token ``who``: the whole n, when a stream is accepted.

        Raises:
            RateLimitError: naming what was asked, what is left and when to retry.
        """
        with self._lock:
            now = self._clock()
            bucket = self._pair(who, now)[1]
            wait = bucket.wait_for(samples, now)
            if wait > 0:
                raise RateLimitError(
                    f"samples: n={samples} asked, {int(bucket.available(now))} left for token "
                    f"{who} ({self._limits.samples_per_second}/s); retry in {wait:.1f} s"
                )
            bucket.take(samples, now)


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status a refused request gets."""
    if isinstance(exc, AuthenticationError):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(exc, RateLimitError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, UnknownReleaseError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, ConfigError | DecodeError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def check_bearer(metadata: Sequence[tuple[str, str | bytes]], tokens: Sequence[str]) -> str:
    """The id of the token in ``authorization: Bearer <token>``; compared in constant time.

    Every known token is compared (no early exit), so timing does not tell which one is close.

    Raises:
        AuthenticationError: no authorization header, not a bearer token, or an unknown token.
    """
    values = [v for k, v in metadata if k.lower() == "authorization"]
    if len(values) != 1:
        raise AuthenticationError(
            f"authorization: {len(values)} headers, expected one 'Bearer <token>'"
        )
    value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
    scheme, _, presented = value.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise AuthenticationError("authorization: expected 'Bearer <token>'")
    candidate = presented.strip().encode()
    match = None
    for token in tokens:
        if hmac.compare_digest(candidate, token.encode()):
            match = token
    if match is None:
        raise AuthenticationError("authorization: the bearer token is not valid for this service")
    return token_id(match)


# ---------------------------------------------------------------------------------------------
# The release store
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredRelease:
    """A verified release file the service can generate from."""

    release: Release
    path: Path
    digest: str
    published_ns: int  # the file's modification time: when save_release renamed it into place

    def info(self) -> pb.ReleaseInfo:
        """The release as ListReleases shows it."""
        manifest = self.release.manifest
        created = pb.ReleaseInfo().created
        created.FromNanoseconds(self.published_ns)
        return pb.ReleaseInfo(
            release_id=self.release.release_id,
            created=created,
            method=pb.METHOD_VECTOR,  # release files hold per-label steering vectors
            epsilon=manifest.privacy.epsilon,
            delta=manifest.privacy.delta,
            trust_mode=TRUST_MODES.get(manifest.privacy.mode, pb.TRUST_MODE_UNSPECIFIED),
            labels=list(self.release.labels),
            digest=self.digest,
            model_name=manifest.model_name,
            model_fingerprint=manifest.model_fingerprint,
        )


class ReleaseStore:
    """The coordinator's release directory: verified files only, reloaded when they change.

    Every ``*.safetensors`` file is loaded with :func:`load_release` (digest and report checked)
    when first seen or after it changes; a file that fails, or was made with another model than
    the one this service generates with, is logged once and not offered. Two valid files that
    claim one release id are both withheld: a consumer must never get one when it asked for the
    other.
    """

    def __init__(
        self,
        directory: Path,
        *,
        model_fingerprint: str,
        accepts: Callable[[Release], None] | None = None,
    ) -> None:
        """Offer the verified releases of ``directory`` made with ``model_fingerprint``.

        ``accepts`` raises a :class:`FedSynthError` for a release the generation backend cannot
        apply (llama.cpp: a release that steers a block it cannot steer); such a release is
        logged once and not offered, instead of failing a consumer's stream.
        """
        if not directory.is_dir():
            raise ConfigError(f"releases={directory}: not a directory")
        self.directory = directory
        self.model_fingerprint = model_fingerprint
        self.accepts = accepts
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[tuple[int, int, int], StoredRelease | None]] = {}

    def _load(self, path: Path) -> StoredRelease | None:
        try:
            before = path.stat()
            release = load_release(path)
            with safe_open(str(path), framework="numpy") as handle:
                digest = (handle.metadata() or {}).get("digest", "")
        except (FedSynthError, OSError) as exc:
            logger.warning("release store: not offering %s: %s", path.name, exc)
            return None
        if release.manifest.model_fingerprint != self.model_fingerprint:
            logger.warning(
                "release store: not offering %s: made with model %s (%s), this service "
                "generates with %s",
                path.name,
                release.manifest.model_name,
                release.manifest.model_fingerprint,
                self.model_fingerprint,
            )
            return None
        try:
            # A count <= 0 (a file not decoded by fedsynth, or altered) would fail only once a
            # consumer's stream had started and been charged.
            check_release_counts(release)
            if self.accepts is not None:
                self.accepts(release)
            stored = StoredRelease(release, path, digest, before.st_mtime_ns)
            stored.info().SerializeToString()  # text protobuf cannot carry fails here, not per call
        except (FedSynthError, ValueError) as exc:
            logger.warning("release store: not offering %s: %s", path.name, exc)
            return None
        return stored

    def scan(self) -> dict[str, StoredRelease]:
        """Release id -> verified release, for every valid file in the directory now."""
        with self._lock:
            current: set[Path] = set()
            by_id: dict[str, list[StoredRelease]] = collections.defaultdict(list)
            for path in sorted(self.directory.glob("*.safetensors")):
                try:
                    stat = path.stat()
                except OSError:
                    continue  # removed while listing
                key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
                current.add(path)
                cached = self._cache.get(path)
                if cached is None or cached[0] != key:
                    entry = self._load(path)
                    after = path.stat() if path.exists() else None
                    if after is None or (after.st_mtime_ns, after.st_size, after.st_ino) != key:
                        continue  # replaced while loading: look again next time
                    cached = (key, entry)
                    self._cache[path] = cached
                if cached[1] is not None:
                    by_id[cached[1].release.release_id].append(cached[1])
            for gone in set(self._cache) - current:
                del self._cache[gone]
        offered: dict[str, StoredRelease] = {}
        for release_id, entries in by_id.items():
            if len(entries) > 1:
                logger.error(
                    "release store: release id %r is claimed by %s; offering neither",
                    release_id,
                    ", ".join(e.path.name for e in entries),
                )
                continue
            offered[release_id] = entries[0]
        return offered


# ---------------------------------------------------------------------------------------------
# The servicer
# ---------------------------------------------------------------------------------------------


class FairLock:
    """A lock granted in arrival order, so no stream waits behind others indefinitely."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()
        self._held = False

    def __enter__(self) -> None:
        ticket = object()
        with self._condition:
            self._queue.append(ticket)
            while self._held or self._queue[0] is not ticket:
                self._condition.wait()
            self._queue.popleft()
            self._held = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._condition:
            self._held = False
            self._condition.notify_all()


@dataclass
class ServiceStats:
    """Counters a test or an operator reads to see what the service is doing."""

    generated: int = 0  # samples the model produced
    sent: int = 0  # samples handed to gRPC for sending
    streams_started: int = 0
    streams_completed: int = 0
    streams_stopped: int = 0  # ended early: cancelled, timed out, or the connection dropped
    active_streams: int = 0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        """Add to several counters at once."""
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


M = TypeVar("M", bound=Message)


class SynthesisServicer:
    """The three RPCs over a :class:`ReleaseStore`, one loaded model and a set of tokens."""

    def __init__(
        self,
        *,
        store: ReleaseStore,
        loaded: LoadedModel | GenerationBackend,
        tokens: Sequence[str],
        limits: SynthesisLimits,
        generation: GenerationConfig,
        clock: Callable[[], float] = time.monotonic,
        reader: Callable[[], LoadedModel] | None = None,
        vocabulary: str = FOLLOW_RELEASE,
        contrast: float = 1.0,
    ) -> None:
        """Serve ``store``'s releases with ``loaded``.

        ``reader`` loads the `transformers` model that reads samples for ``select`` when the
        backend is another one; it is called at the first such request, not before.
        ``vocabulary`` (:data:`~fedsynth.server.vocabulary.FOLLOW_RELEASE`: each release's
        prior's) replaces ``generation.vocabulary``; a fixed one that is not a release's
        prior's is logged once for that release. ``contrast`` is the class contrast every
        release is steered with (:meth:`Release.directions`; 1: the class vectors themselves).
        """
        if not tokens:
            raise ConfigError("tokens: at least one bearer token is required")
        check_vocabulary_choice(vocabulary)
        self.contrast = check_contrast(contrast)
        self.store = store
        self.loaded = loaded
        self.limits = limits
        self.generation = generation
        self.vocabulary = vocabulary
        self._cautioned: set[str] = set()
        self.stats = ServiceStats()
        self._tokens = tuple(tokens)
        self._limiter = RateLimiter(limits, clock)
        self._model_lock = FairLock()  # steering hooks are per model: one batch at a time
        self._reader_factory = reader
        self._reader: LoadedModel | None = transformers_model(loaded)
        self._reader_lock = threading.Lock()

    def _sample_reader(self, select: float) -> LoadedModel | None:
        """The model that reads samples for ``select`` < 1 (loaded on first use); else None.

        Raises:
            ConfigError: the backend cannot read samples and no reader was configured.
        """
        if select >= 1:
            return None
        with self._reader_lock:
            if self._reader is None and self._reader_factory is not None:
                logger.info("loading the transformers model that reads samples for select")
                self._reader = self._reader_factory()
            if self._reader is None:
                raise ConfigError(
                    f"select={select}: this server generates on {as_backend(self.loaded).backend} "
                    "and has no transformers model to read samples with; ask without select"
                )
            return self._reader

    def handler(self) -> grpc.GenericRpcHandler:
        """Raw-bytes method handlers: requests are parsed (and refused clearly) here.

        Clients call every method with one request message (unary requests); the server reads
        it as a stream so that it checks the caller's token from the headers *before* it waits
        for that message: a caller without a token cannot hold a call, and a worker thread,
        open by never sending it.
        """
        methods = {
            "ListReleases": grpc.stream_unary_rpc_method_handler(
                self.list_releases, response_serializer=pb.ListReleasesResponse.SerializeToString
            ),
            "GetPrivacyReport": grpc.stream_unary_rpc_method_handler(
                self.get_privacy_report, response_serializer=pb.PrivacyReport.SerializeToString
            ),
            "Generate": grpc.stream_stream_rpc_method_handler(
                self.generate, response_serializer=pb.Sample.SerializeToString
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE.full_name, methods)

    def _admit(self, context: grpc.ServicerContext) -> str:
        """Authenticate a call, charge it and count it open until it ends.

        Returns the token's id (never the token itself), for logs and error messages.
        """
        who = check_bearer(context.invocation_metadata(), self._tokens)
        self._limiter.take_request(who)
        self._limiter.open_call(who)
        if not context.add_callback(lambda: self._limiter.close_call(who)):
            self._limiter.close_call(who)  # the call is already over
        return who

    def _read(self, kind: type[M], requests: Iterator[bytes], context: grpc.ServicerContext) -> M:
        """The call's one request message, parsed (read only once the caller was admitted).

        A call whose message does not arrive within ``limits.request_timeout_s`` is cancelled,
        which ends the wait: an authenticated consumer cannot keep a call (one of its
        ``max_calls_per_token``) open by sending nothing.
        """
        waited = self.limits.request_timeout_s
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            context.cancel()

        timer = threading.Timer(waited, expire)
        timer.daemon = True
        timer.start()
        try:
            raw = next(requests, None)
        except grpc.RpcError:  # the call was cancelled while it waited
            raw = None
        finally:
            timer.cancel()
        if raw is None:
            if expired.is_set():
                logger.info(
                    "%s: no request message within %g s after the headers; call cancelled",
                    kind.DESCRIPTOR.name,
                    waited,
                )
                raise ConfigError(
                    f"request: no {kind.DESCRIPTOR.name} message within {waited:g} s: call "
                    "cancelled"
                )
            raise ConfigError(f"request: the call ended before its {kind.DESCRIPTOR.name} message")
        return self._parse(kind, raw)

    @staticmethod
    def _parse(kind: type[M], raw: bytes) -> M:
        message: M = kind()
        try:
            message.ParseFromString(raw)
        except DecodeError as exc:
            raise ConfigError(
                f"request: {len(raw)} bytes that are not a valid {kind.DESCRIPTOR.name} ({exc})"
            ) from exc
        return message

    @staticmethod
    def _refuse(context: grpc.ServicerContext, exc: FedSynthError) -> NoReturn:
        context.abort(status_code_for(exc), str(exc))
        raise RuntimeError("grpc's context.abort returned instead of raising")

    def list_releases(
        self, requests: Iterator[bytes], context: grpc.ServicerContext
    ) -> pb.ListReleasesResponse:
        """ListReleases: every verified release this service can generate from."""
        try:
            self._admit(context)
            self._read(pb.ListReleasesRequest, requests, context)
        except FedSynthError as exc:
            self._refuse(context, exc)
        offered = self.store.scan()
        return pb.ListReleasesResponse(releases=[offered[k].info() for k in sorted(offered)])

    def get_privacy_report(
        self, requests: Iterator[bytes], context: grpc.ServicerContext
    ) -> pb.PrivacyReport:
        """GetPrivacyReport: a release's summary and its full report as JSON text."""
        try:
            self._admit(context)
            request = self._read(pb.GetPrivacyReportRequest, requests, context)
            offered = self.store.scan()
            if request.release_id not in offered:
                raise UnknownReleaseError(
                    f"release_id={_shown(request.release_id)}: no such release on offer"
                )
        except FedSynthError as exc:
            self._refuse(context, exc)
        stored = offered[request.release_id]
        return pb.PrivacyReport(
            release=stored.info(),
            report_json=json.dumps(stored.release.report, sort_keys=True),
            steering_json=json.dumps(
                steering_report(
                    stored.release,
                    strength=self.limits.default_strength,
                    contrast=self.contrast,
                ),
                sort_keys=True,
            ),
        )

    def generate(
        self, requests: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[pb.Sample]:
        """Generate: validate now, then return a stream that generates as it is read."""
        try:
            who = self._admit(context)
            request = self._read(pb.GenerateRequest, requests, context)
            offered = self.store.scan()
            params = validate_generate_request(
                request,
                release_labels={k: v.release.labels for k, v in offered.items()},
                limits=self.limits,
                batch_size=self.generation.batch_size,
            )
            check_variants_fit(
                self.loaded,
                offered[params.release_id].release.manifest.template,
                params.variants,
                shots=params.shots,
                new_tokens=self.generation.max_new_tokens,
            )
            reader = self._sample_reader(params.select)
            self._limiter.take_samples(
                who, generated_samples(params, batch=self.generation.batch_size)
            )
        except FedSynthError as exc:
            self._refuse(context, exc)
        logger.info(
            "generate: token %s, release %s, n=%d, labels %s, shots %d, select %g, variants %d",
            who,
            params.release_id,
            params.n,
            ",".join(params.labels),
            params.shots,
            params.select,
            len(params.variants),
        )
        stream = _StreamState(params.n)
        self.stats.add(streams_started=1, active_streams=1)

        def ended() -> None:  # gRPC runs this once the RPC is over: completed, cancelled, failed
            stream.stop.set()
            done = stream.yielded == params.n
            self.stats.add(
                active_streams=-1, streams_completed=int(done), streams_stopped=int(not done)
            )

        if not context.add_callback(ended):
            ended()  # the RPC is already over
        return self._refusing(
            self._stream(offered[params.release_id].release, params, stream, reader), context
        )

    def _refusing(
        self, samples: Iterator[pb.Sample], context: grpc.ServicerContext
    ) -> Iterator[pb.Sample]:
        """``samples``, ended with the error's own status if generating them fails.

        A :class:`FedSynthError` then reaches the consumer with its status and message, not as
        gRPC's UNKNOWN with a traceback in the server's log.
        """
        try:
            yield from samples
        except FedSynthError as exc:
            logger.warning("generate: stream stopped: %s", exc)
            self._refuse(context, exc)

    def _generation_for(self, release: Release) -> GenerationConfig:
        """The sampling settings for ``release``: the service's, in the vocabulary it asks for."""
        name, caution = release_vocabulary(self.vocabulary, release.prior_vocabulary)
        if caution is not None and release.release_id not in self._cautioned:
            self._cautioned.add(release.release_id)
            logger.warning("release %s: %s", release.release_id, caution)
        if name == self.generation.vocabulary:
            return self.generation
        return dataclasses.replace(self.generation, vocabulary=name)

    def _stream(
        self,
        release: Release,
        params: GenerateParams,
        stream: _StreamState,
        reader: LoadedModel | None = None,
    ) -> Iterator[pb.Sample]:
        """Samples generated one batch at a time, only when gRPC asks for the next sample.

        gRPC's server thread pulls the next sample only after the previous one went out under
        HTTP/2 flow control, so a slow reader holds back generation: the server keeps at most
        the rest of one batch. Once the RPC ends, the next pull (if any) generates nothing.
        With ``select`` < 1 each batch is the best of its ``batch / select`` candidates, read by
        ``reader`` in the same turn at the model.
        """
        batch = self.generation.batch_size
        generation = self._generation_for(release)
        for label, count in zip(
            params.labels, split_counts(params.n, len(params.labels)), strict=True
        ):
            samples = iter_release_samples(
                self.loaded,
                release,
                n_per_label=count,
                strength=params.strength,
                contrast=self.contrast,
                config=generation,
                seed=label_seed(params.seed, label),
                labels=(label,),
                shots=params.shots,
                select=params.select,
                scorer=reader,
                select_chunk=batch,
                variants=params.variants,
            )
            # Samples generated for each batch streamed (more than the batch with select < 1).
            generated = [made for _, made in selection_chunks(count, params.select, batch)]
            for k in range(count):
                if stream.stop.is_set():
                    return
                if k % batch == 0:  # this next() runs the model for the next batch
                    with self._model_lock:
                        if stream.stop.is_set():
                            return
                        sample = next(samples)
                    self.stats.add(generated=generated[k // batch])
                else:
                    sample = next(samples)
                self.stats.add(sent=1)
                index = stream.yielded
                stream.yielded += 1
                yield pb.Sample(
                    text=sample.text, label=sample.label, release_id=sample.release_id, index=index
                )


@dataclass
class _StreamState:
    """One Generate stream: how far it got and whether its RPC has ended."""

    n: int
    yielded: int = 0
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)


# ---------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------


def server_credentials(
    cert_path: Path, key_path: Path, *, now: dt.datetime | None = None
) -> grpc.ServerCredentials:
    """TLS credentials from PEM files, refused when expired, not yet valid or mismatched.

    Raises:
        CertificateError: naming the file and what is wrong with it.
    """
    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"tls: cannot read {exc.filename}: {exc.strerror}") from exc
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise CertificateError(f"tls_cert={cert_path}: not a PEM certificate ({exc})") from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"tls_key={key_path}: not an unencrypted PEM key ({exc})") from exc
    moment = now or dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
        raise CertificateError(
            f"tls_cert={cert_path}: valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, now is {moment:%Y-%m-%d %H:%M}"
        )
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise CertificateError(f"tls_key={key_path} is not the key of tls_cert={cert_path}")
    if key_path.stat().st_mode & 0o077:
        logger.warning("tls_key=%s is readable by other users; chmod 600 it", key_path)
    return grpc.ssl_server_credentials([(key_pem, cert_pem)])


class SynthesisServer:
    """A running Synthesis service; stop it with :meth:`stop` or by leaving a ``with`` block."""

    def __init__(self, server: grpc.Server, servicer: SynthesisServicer, host: str, port: int):
        self.server = server
        self.servicer = servicer
        self.host = host
        self.port = port

    @property
    def address(self) -> str:
        """``host:port`` the service listens on."""
        return f"{self.host}:{self.port}"

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop accepting calls, let running ones finish for ``grace`` seconds, then end them."""
        self.server.stop(grace).wait()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout``); whether it stopped."""
        return bool(self.server.wait_for_termination(timeout))

    def __enter__(self) -> SynthesisServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _check_release_applies(backend: GenerationBackend, vocabulary: str, release: Release) -> None:
    """Raise a FedSynthError for a release this service could not generate from."""
    check_release_backend(backend, release)
    release_vocabulary(vocabulary, release.prior_vocabulary)  # a prior vocabulary it cannot use


def serve(
    *,
    releases: Path,
    loaded: LoadedModel | GenerationBackend,
    token_file: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    insecure: bool = False,
    limits: SynthesisLimits | None = None,
    generation: GenerationConfig | None = None,
    reader: Callable[[], LoadedModel] | None = None,
    vocabulary: str = FOLLOW_RELEASE,
    contrast: float = 1.0,
) -> SynthesisServer:
    """Start the Synthesis service on ``host:port`` (0: a free port) and return its handle.

    TLS is required unless ``insecure=True`` is passed explicitly (tests on loopback only); the
    bearer token is always required. ``reader`` loads the model that reads samples for requests
    with ``select`` when ``loaded`` is not a `transformers` model (see :class:`SynthesisServicer`).
    ``vocabulary`` is what samples may use: each release's prior's, or one for all;
    ``contrast`` the class contrast of every release's steering.

    Raises:
        ConfigError: a missing TLS file, a bad token file, a bad releases directory, or the port
            cannot be bound.
        CertificateError: an expired, not yet valid or mismatched certificate and key.
    """
    limits = limits or SynthesisLimits()
    generation = generation or GenerationConfig(batch_size=DEFAULT_BATCH_SIZE)
    credentials: grpc.ServerCredentials | None = None
    if insecure:
        if tls_cert is not None or tls_key is not None:
            raise ConfigError("insecure=True with tls_cert/tls_key: choose one")
        logger.warning(
            "Synthesis service WITHOUT TLS on %s:%s: bearer tokens and samples travel in clear "
            "text; use this only on a trusted loopback",
            host,
            port,
        )
    elif tls_cert is None or tls_key is None:
        raise ConfigError("tls_cert and tls_key: both required (insecure=True only for tests)")
    else:
        credentials = server_credentials(tls_cert, tls_key)
    backend = as_backend(loaded)
    servicer = SynthesisServicer(
        store=ReleaseStore(
            releases,
            model_fingerprint=backend.fingerprint,
            accepts=functools.partial(_check_release_applies, backend, vocabulary),
        ),
        loaded=backend,
        tokens=read_token_file(token_file),
        limits=limits,
        generation=generation,
        reader=reader,
        vocabulary=vocabulary,
        contrast=contrast,
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=limits.max_concurrent_rpcs + 4, thread_name_prefix="synthesis"
        ),
        handlers=[servicer.handler()],
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", limits.max_request_bytes),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
            # Ping a connection with open calls every minute; a peer that does not answer in
            # 20 s is gone, and its calls end (a dead reader no longer holds a call open).
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
        ],
    )
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(target)
        else:
            bound = server.add_secure_port(target, credentials)
    except RuntimeError as exc:
        raise ConfigError(f"host={host} port={port}: cannot listen ({exc})") from exc
    if not bound:
        raise ConfigError(f"host={host} port={port}: cannot listen (in use or not an address)")
    server.start()
    logger.info("Synthesis service on %s:%d (%s)", host, bound, "insecure" if insecure else "TLS")
    return SynthesisServer(server, servicer, host, bound)
