"""The shipped client of the Synthesis service and its commands: ``pull``, ``serve``, ``list``.

``fedsynth pull`` streams samples from a coordinator's release over TLS (the operator's CA) with
a bearer token and writes them as JSON Lines (text, label, release_id). The output appears
atomically: samples go to a temporary file next to it that is renamed only when the stream
completed, so an interrupted pull never leaves a file that looks complete.

This module imports no model code (the ``serve`` command loads it lazily), so a consumer's
``pull`` starts fast. The token-file format is defined here and shared with the service.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Annotated, Any

import grpc
import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fedsynth.protocol.cli_common import (
    BackendOption,
    LlamaHeadOption,
    PrecisionOption,
    ReleaseVocabularyOption,
    ThreadsOption,
    VariantOption,
    console,
    errors_at_the_edge,
    typed_variants,
)
from fedsynth.protocol.cli_common import fail as _fail
from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.wire import synthesis_pb2 as pb
from fedsynth.protocol.wire import synthesis_pb2_grpc as pb_grpc

INT64_MAX = 2**63 - 1  # GenerateRequest's n and shots are int64 on the wire

logger = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16  # a shorter bearer token is guessable
PLAIN_PROGRESS_SECONDS = 5.0  # without a terminal: one progress line at most this often


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------


def token_id(token: str) -> str:
    """A short public name of a token for logs and rate limits (never the token itself)."""
    return "tok-" + hashlib.sha256(token.encode()).hexdigest()[:10]


def read_token_file(path: Path) -> list[str]:
    """The bearer tokens in ``path``: one per non-empty line, the file private to its owner.

    Raises:
        ConfigError: the file is missing, readable or writable by others (it must be 0600 or
            stricter), empty, or holds a token shorter than ``MIN_TOKEN_CHARS`` or with spaces.
    """
    try:
        mode = path.stat().st_mode & 0o777
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"token_file={path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"token_file={path}: not UTF-8 text") from exc
    if mode & 0o077:
        raise ConfigError(
            f"token_file={path}: mode {mode:04o} lets other users read it; it must be 0600 "
            "(chmod 600)"
        )
    tokens = [line.strip() for line in text.splitlines() if line.strip()]
    if not tokens:
        raise ConfigError(f"token_file={path}: no token in the file")
    for number, token in enumerate(tokens, start=1):
        if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
            raise ConfigError(
                f"token_file={path}: the token on non-empty line {number} has {len(token)} "
                f"characters or contains spaces; at least {MIN_TOKEN_CHARS}, no spaces"
            )
    return tokens


# ---------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------


class SynthesisClient:
    """A connection to one Synthesis service (TLS with the operator's CA, or explicit insecure)."""

    def __init__(
        self,
        server: str,
        *,
        token: str,
        ca_cert: Path | None = None,
        insecure: bool = False,
        timeout: float | None = None,
        options: list[tuple[str, Any]] | None = None,
    ) -> None:
        if insecure:
            if ca_cert is not None:
                raise ConfigError("insecure=True with ca_cert: choose one")
            logger.warning("connecting to %s WITHOUT TLS: the token travels in clear text", server)
            self.channel = grpc.insecure_channel(server, options=options)
        else:
            if ca_cert is None:
                raise ConfigError("ca_cert: the operator's CA certificate is required for TLS")
            try:
                root = ca_cert.read_bytes()
            except OSError as exc:
                raise ConfigError(f"ca={ca_cert}: {exc.strerror or exc}") from exc
            credentials = grpc.ssl_channel_credentials(root_certificates=root)
            self.channel = grpc.secure_channel(server, credentials, options=options)
        self.server = server
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._stub: Any = pb_grpc.SynthesisStub(self.channel)  # type: ignore[no-untyped-call]

    def list_releases(self) -> list[pb.ReleaseInfo]:
        """Every release the service offers."""
        response = self._stub.ListReleases(
            pb.ListReleasesRequest(), metadata=self._metadata, timeout=self.timeout
        )
        return list(response.releases)

    def _privacy_report(self, release_id: str) -> pb.PrivacyReport:
        response: pb.PrivacyReport = self._stub.GetPrivacyReport(
            pb.GetPrivacyReportRequest(release_id=release_id),
            metadata=self._metadata,
            timeout=self.timeout,
        )
        return response

    def privacy_report(self, release_id: str) -> tuple[pb.ReleaseInfo, dict[str, Any]]:
        """A release's summary and its full privacy report."""
        response = self._privacy_report(release_id)
        report: dict[str, Any] = json.loads(response.report_json)
        return response.release, report

    def steering(self, release_id: str) -> dict[str, Any]:
        """How the service steers with a release: per label and layer its SNR and shrink factor."""
        text = self._privacy_report(release_id).steering_json
        steering: dict[str, Any] = json.loads(text or "{}")
        return steering

    def generate(
        self,
        release_id: str,
        n: int,
        *,
        label: str = "",
        seed: int = 0,
        strength: float | None = None,
        shots: int | None = None,
        select: float | None = None,
        variants: Sequence[str] = (),
    ) -> Any:
        """The stream of samples (an iterator that is also a gRPC call: ``.cancel()`` stops it).

        ``strength`` and ``shots`` left at None take the server's defaults; ``select`` None
        keeps every sample; ``variants``: public instruction variants (none: the template's).
        """
        request = pb.GenerateRequest(
            release_id=release_id, n=n, label=label, seed=seed, variants=list(variants)
        )
        if strength is not None:
            request.strength = strength
        if shots is not None:
            request.shots = shots
        if select is not None:
            request.select = select
        return self._stub.Generate(request, metadata=self._metadata, timeout=self.timeout)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> SynthesisClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def rpc_error_text(exc: grpc.RpcError, server: str) -> str:
    """One line for a failed call: the status and the server's message, with a TLS hint."""
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    name = code.name if code is not None else "UNKNOWN"
    if code == grpc.StatusCode.UNAVAILABLE:
        return (
            f"{server}: UNAVAILABLE: {details} (is the service running there, is --ca the "
            "operator's CA and is its certificate valid for this host name?)"
        )
    return f"{server}: {name}: {details}"


def write_jsonl_atomically(
    out: Path, rows: Iterator[dict[str, Any]], *, expected: int, on_row: Callable[[int], None]
) -> int:
    """Write ``rows`` as JSON Lines to ``out`` through a temporary file renamed at the end.

    Raises:
        ConfigError: the stream ended with fewer rows than ``expected`` (nothing written).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    tmp = Path(tmp_name)
    written = 0
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            for row in rows:
                stream.write(json.dumps(row, ensure_ascii=False) + "\n")
                written += 1
                on_row(written)
            stream.flush()
            os.fsync(stream.fileno())
        if written != expected:
            raise ConfigError(f"n={expected}: the stream ended after {written} samples")
        tmp.replace(out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return written


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _errors_at_the_edge(server: str = "") -> Iterator[None]:
    """Turn fedsynth errors, OS errors and failed calls into one line and exit status 2."""
    with errors_at_the_edge():
        try:
            yield
        except grpc.RpcError as exc:
            _fail(rpc_error_text(exc, server))


class _PlainProgress:
    """Progress as periodic plain lines, for output that goes to a file or a log."""

    def __init__(self, total: int, every: float = PLAIN_PROGRESS_SECONDS) -> None:
        self.total = total
        self.every = every
        self._last = time.monotonic()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if done == self.total or now - self._last >= self.every:
            self._last = now
            console.print(f"pulled {done}/{self.total} samples ({100 * done // self.total}%)")


def _client(
    server: str, ca: Path | None, token_file: Path, insecure: bool, timeout: float | None = None
) -> SynthesisClient:
    tokens = read_token_file(token_file)
    if len(tokens) != 1:
        raise ConfigError(f"token_file={token_file}: {len(tokens)} tokens, a client uses one")
    return SynthesisClient(server, token=tokens[0], ca_cert=ca, insecure=insecure, timeout=timeout)


ServerOption = Annotated[str, typer.Option(help="Synthesis service address HOST:PORT.")]
CaOption = Annotated[
    Path | None,
    typer.Option(help="The operator's CA certificate (PEM); required unless --insecure."),
]
TokenOption = Annotated[Path, typer.Option(help="File holding your bearer token (mode 0600).")]
InsecureOption = Annotated[
    bool, typer.Option(help="No TLS (loopback tests only): the token travels in clear text.")
]


def pull_command(
    release: Annotated[str, typer.Option(help="Release id (see `list`).")],
    n: Annotated[int, typer.Option(help="Number of samples to pull.", max=INT64_MAX)],
    out: Annotated[Path, typer.Option(help="Output JSON Lines file (text, label, release_id).")],
    server: ServerOption,
    token_file: TokenOption,
    ca: CaOption = None,
    label: Annotated[str, typer.Option(help="One label only (default: all, split evenly).")] = "",
    seed: Annotated[int, typer.Option(help="Sampling seed (0..2^32-1).", min=0, max=2**32 - 1)] = 0,
    strength: Annotated[
        float | None, typer.Option(help="Steering strength (default: the server's).")
    ] = None,
    shots: Annotated[
        int | None,
        typer.Option(
            help="Own samples shown to each sample (0: the plain prompt; default: the server's).",
            max=INT64_MAX,
        ),
    ] = None,
    select: Annotated[
        float | None,
        typer.Option(
            help="Keep this fraction of the samples the server generates: the ones the release "
            "says carry their class best (default: keep all; see `fedsynth generate --select`)."
        ),
    ] = None,
    variant: VariantOption = None,
    insecure: InsecureOption = False,
) -> None:
    """Stream synthetic samples from a release; costs no privacy and touches no ledger."""
    with _errors_at_the_edge(server):
        if n < 1:
            raise ConfigError(f"n={n}: must be >= 1")
        with _client(server, ca, token_file, insecure) as client:
            stream = client.generate(
                release,
                n,
                label=label,
                seed=seed,
                strength=strength,
                shots=shots,
                select=select,
                variants=typed_variants(variant),
            )
            rows = ({"text": s.text, "label": s.label, "release_id": s.release_id} for s in stream)
            try:
                if console.is_terminal:
                    with Progress(
                        TextColumn("[bold]pull"),
                        BarColumn(),
                        MofNCompleteColumn(),
                        TimeElapsedColumn(),
                        TimeRemainingColumn(),
                        console=console,
                    ) as progress:
                        task = progress.add_task("pull", total=n)
                        written = write_jsonl_atomically(
                            out,
                            rows,
                            expected=n,
                            on_row=lambda done: progress.update(task, completed=done),
                        )
                else:
                    written = write_jsonl_atomically(
                        out, rows, expected=n, on_row=_PlainProgress(n)
                    )
            finally:
                stream.cancel()  # no-op when complete; stops the server's generation otherwise
    console.print(f"wrote {written} samples of release {release} to {out}")


synthesis_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="The Synthesis service: serve releases to consumers, list them, pull samples.",
    pretty_exceptions_show_locals=False,
)
synthesis_app.command("pull")(pull_command)


@synthesis_app.command("list")
def list_command(
    server: ServerOption,
    token_file: TokenOption,
    ca: CaOption = None,
    insecure: InsecureOption = False,
) -> None:
    """List the releases a Synthesis service offers (id, date, method, epsilon, delta, mode)."""
    with _errors_at_the_edge(server), _client(server, ca, token_file, insecure) as client:
        releases = client.list_releases()
    for info in releases:
        created = info.created.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        console.print(
            f"{info.release_id}\t{created}\t{pb.Method.Name(info.method)}\t"
            f"epsilon={info.epsilon}\tdelta={info.delta}\t{pb.TrustMode.Name(info.trust_mode)}\t"
            f"labels={','.join(info.labels)}\t{info.digest}",
            markup=False,
            highlight=False,
        )


@synthesis_app.command("report")
def report_command(
    release: Annotated[str, typer.Argument(help="Release id.")],
    server: ServerOption,
    token_file: TokenOption,
    ca: CaOption = None,
    insecure: InsecureOption = False,
    steering: Annotated[
        bool,
        typer.Option(
            help="Print the steering report instead: per label and layer the release's "
            "signal-to-noise ratio and the factor that multiplies the strength."
        ),
    ] = False,
) -> None:
    """Print a release's privacy report as JSON (--steering: how generation steers with it)."""
    with _errors_at_the_edge(server), _client(server, ca, token_file, insecure) as client:
        document = client.steering(release) if steering else client.privacy_report(release)[1]
    console.print_json(json.dumps(document))


@synthesis_app.command("serve")
def serve_command(
    releases: Annotated[Path, typer.Option(help="The coordinator's release directory.")],
    model: Annotated[str, typer.Option(help="Model the releases were made with.")],
    token_file: Annotated[
        Path, typer.Option(help="Bearer tokens of the consumers, one per line (mode 0600).")
    ],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free port).", min=0, max=65535)] = 50061,
    tls_cert: Annotated[Path | None, typer.Option(help="Server certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Server private key (PEM).")] = None,
    max_samples: Annotated[int, typer.Option(help="Most samples per request.")] = 10_000,
    shots: Annotated[
        int,
        typer.Option(
            help="Own samples shown to each sample when a request does not say (0: the plain "
            "prompt).",
            min=0,
        ),
    ] = 1,
    max_shots: Annotated[int, typer.Option(help="Most shots a request may ask for.", min=0)] = 8,
    max_variants: Annotated[
        int,
        typer.Option(
            help="Most instruction variants a request may ask with (0: none), each of at most "
            "200 characters.",
            min=0,
        ),
    ] = 16,
    min_select: Annotated[
        float,
        typer.Option(
            help="Smallest fraction of its samples a request may keep (--select); each sample "
            "then costs 1 / select generations. 1: no selection. On a backend other than "
            "transformers the first such request loads the model on transformers to read them.",
        ),
    ] = 0.25,
    max_calls_per_token: Annotated[
        int,
        typer.Option(
            help="Most calls one consumer token may have open at once (of the server's 64).",
            min=1,
        ),
    ] = 16,
    request_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds a call may take to send its request after its headers; then it is "
            "cancelled (a consumer cannot hold its calls by sending nothing).",
        ),
    ] = 30.0,
    insecure: Annotated[
        bool, typer.Option(help="No TLS: tokens and samples in clear text (loopback tests only).")
    ] = False,
    backend: BackendOption = "transformers",
    threads: ThreadsOption = None,
    llama_head: LlamaHeadOption = "auto",
    precision: PrecisionOption = "auto",
    vocabulary: ReleaseVocabularyOption = "release",
    contrast: Annotated[
        float,
        typer.Option(
            help="Class contrast c of every release's steering: mean + c * (class vector - "
            "mean). 2 made two-class sentiment samples read as their class more often, and cost "
            "MAUVE and accuracy on data whose classes differ by topic or style (README, class "
            "contrast)."
        ),
    ] = 1.0,
) -> None:
    """Serve the releases in --releases over gRPC until interrupted (Ctrl-C or SIGTERM).

    Releases the backend cannot apply (another model, or on llama.cpp a release that steers a
    block it cannot steer) are logged and not offered.
    """
    from fedsynth.protocol.models import load_model
    from fedsynth.server.backends import (
        check_backend_name,
        check_head_backend,
        check_precision_backend,
        open_backend,
    )
    from fedsynth.server.generation import GenerationConfig
    from fedsynth.server.release import check_contrast
    from fedsynth.server.synthesis_service import (
        DEFAULT_BATCH_SIZE,
        SynthesisLimits,
        serve,
        serving_sample_burst,
    )
    from fedsynth.server.vocabulary import check_vocabulary_choice

    with _errors_at_the_edge():
        check_vocabulary_choice(vocabulary)
        check_contrast(contrast)
        generation = GenerationConfig(batch_size=DEFAULT_BATCH_SIZE)
        check_backend_name(backend)  # before any model is loaded
        check_head_backend(backend, llama_head)
        check_precision_backend(backend, precision)
        if insecure:
            console.print("[yellow]warning:[/yellow] --insecure: no TLS, tokens travel in clear")
        limits = SynthesisLimits(
            max_samples=max_samples,
            sample_burst=serving_sample_burst(max_samples, min_select),
            default_shots=shots,
            max_shots=max_shots,
            min_select=min_select,
            max_variants=max_variants,
            max_calls_per_token=max_calls_per_token,
            request_timeout_s=request_timeout,
        )
        loaded = open_backend(backend, model, threads=threads, head=llama_head, precision=precision)
        reader = None if backend == "transformers" else functools.partial(load_model, model)
        running = serve(
            releases=releases,
            loaded=loaded,
            token_file=token_file,
            host=host,
            port=port,
            tls_cert=tls_cert,
            tls_key=tls_key,
            insecure=insecure,
            limits=limits,
            generation=generation,
            reader=reader,
            vocabulary=vocabulary,
            contrast=contrast,
        )
    offered = running.servicer.store.scan()
    console.print(f"listening on {running.address} ({len(offered)} releases)", highlight=False)

    def stop(signum: int, frame: FrameType | None) -> None:
        running.server.stop(2.0)

    signal.signal(signal.SIGTERM, stop)
    try:
        running.wait()
    except KeyboardInterrupt:
        running.stop(2.0)
    console.print("stopped")
