"""Coverage-guided fuzzing (atheris / libFuzzer) of the decoders that read another party's bytes.

Usage:
    .venv/bin/python scripts/fuzz.py --list
    .venv/bin/python scripts/fuzz.py TARGET [-runs=N] [-max_total_time=S] [CORPUS_DIR ...]

A holder decodes what the coordinator sends (task manifests, PE round manifests, stage fields,
Shamir share messages, the roster file the operator mailed), the coordinator decodes what
holders send (stage fields), and the Synthesis service decodes what any client sends
(Generate requests); everybody decodes release, task and policy files. Each TARGET feeds the
fuzzer's bytes to one of those decoders, which may refuse an input only with fedsynth's own
errors (``FedSynthError``: a clear message naming the field). Any other exception, a hang or a
crash is a finding: libFuzzer prints it, writes the input to ``crash-<sha1>`` and the script
exits non-zero. Valid inputs of each decoder are written to a fresh seed corpus first, so the
mutations start next to what a real peer sends. ``tests/test_fuzz.py`` runs every target for a
few thousand inputs on each CI run, and checks that a planted bug is reported.
"""

from __future__ import annotations

import contextlib
import functools
import resource
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import atheris

from fedsynth.protocol.errors import FedSynthError

if TYPE_CHECKING:
    from fedsynth.protocol.manifest import TaskManifest

# Each target imports its decoder when first called, under atheris's instrumentation (see
# main): a run loads only what its decoder needs (torch only for release files and requests).


@functools.cache
def _scratch() -> Path:
    """This run's scratch directory, made on first use (``--list`` makes none).

    libFuzzer ends the process with C's exit, so nothing removes it: tests point TMPDIR at
    their own directory.
    """
    return Path(tempfile.mkdtemp(prefix="fedsynth-fuzz-"))


# libFuzzer's default out-of-memory limit, over what the process started with (see rss_flags).
RSS_BUDGET_MB = 2048
# Linux carries the peak resident size of the process that started this one across fork and
# exec: started by a test worker that holds a model, this process "has used" gigabytes before
# its first line. Read at start-up, before any decoder (and torch) is imported.
_INHERITED_RSS_MB = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


@dataclass(frozen=True)
class Target:
    """One decoder under fuzzing: what it reads, valid seed inputs, and one call per input."""

    reads: str
    seeds: Callable[[], list[bytes]]
    one_input: Callable[[bytes], None]


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")


def _as_file(data: bytes, name: str) -> Path:
    path = _scratch() / name
    path.write_bytes(data)
    return path


def _manifest() -> TaskManifest:
    """A small, valid dataset-vector manifest (2 labels, 1 layer, hidden size 4, K = 3)."""
    import numpy as np

    from fedsynth.protocol.features import PromptTemplate
    from fedsynth.protocol.manifest import PrivacySpec, TaskManifest, array_sha256

    return TaskManifest(
        task_id="fuzz-1",
        model_name="tiny",
        model_fingerprint="sha256:" + "cd" * 32,
        hidden_size=4,
        template=PromptTemplate(instruction="{label}: ", label_names=(("a", "A"), ("b", "B"))),
        layers=(0,),
        max_text_tokens=8,
        clip_norms=(1.0,),
        residual_norms=(1.0,),
        count_weight=0.5,
        scale=100.0,
        bits=48,
        node_ids=(1, 2, 3),
        privacy=PrivacySpec(
            epsilon=4.0,
            delta=1e-6,
            mode="distributed",
            threshold=2,
            total_variance=100.0,
            noise_multiplier=1.0,
            l2_sensitivity=1.0,
            l1_sensitivity=1.0,
            accountant="rdp",
        ),
        reference_sha256=array_sha256(np.zeros((2, 1, 4), dtype=np.float32)),
    )


# --- targets ---------------------------------------------------------------------------------


def _task_manifest(data: bytes) -> None:
    from fedsynth.protocol.manifest import TaskManifest

    with contextlib.suppress(FedSynthError):
        TaskManifest.from_json(_text(data))


def _pe_manifest_seed() -> bytes:
    from fedsynth.protocol.pe_manifest import PERoundManifest

    manifest = PERoundManifest(
        pe_task_id="pe-1",
        round=1,
        rounds=2,
        embedder_name="hashing",
        embedder_fingerprint="sha256:" + "ab" * 32,
        embedding_dim=8,
        labels=("a", "b"),
        per_label=4,
        top_k=1,
        candidates_sha256="00" * 32,
        bits=48,
        node_ids=(1, 2, 3),
        privacy=_manifest().privacy,
    )
    return manifest.to_json().encode()


def _pe_manifest(data: bytes) -> None:
    from fedsynth.protocol.pe_manifest import PERoundManifest

    with contextlib.suppress(FedSynthError):
        PERoundManifest.from_json(_text(data))


def _roster_seeds() -> list[bytes]:
    from fedsynth.protocol.identity import Roster

    roster = Roster({"alice": b"\x01" * 32, "bob": b"\x02" * 32})
    return [roster.to_json().encode()]


def _roster(data: bytes) -> None:
    from fedsynth.protocol.identity import Roster

    with contextlib.suppress(FedSynthError):
        Roster.load(_as_file(data, "roster.json"))


def _stage_fields_seeds() -> list[bytes]:
    return [bytes(range(256)), b"\x00" * 64, b"\xff" * 128]


def _stage_fields(data: bytes) -> None:
    """The fields of a round message as a peer could fill them: keys, blobs, ints, vectors."""
    from fedsynth.protocol import messages
    from fedsynth.protocol.secagg.crypto import decode_plaintext
    from fedsynth.protocol.secagg.shamir import decode_share

    fdp = atheris.FuzzedDataProvider(data)
    fields: dict[str, object] = {}
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        key = fdp.PickValueInList(["pk_", "share_", "nodes", "masked", "vector", "x"])
        key += str(fdp.ConsumeIntInRange(0, 2**63))
        kind = fdp.ConsumeIntInRange(0, 4)
        if kind == 0:
            value: object = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
        elif kind == 1:
            value = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40))
        elif kind == 2:
            value = fdp.ConsumeInt(9)
        elif kind == 3:
            value = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 100)) for _ in range(3)]
        else:
            value = [fdp.ConsumeUnicodeNoSurrogates(12) for _ in range(3)]
        fields[key] = value
    bits = fdp.PickValueInList([32, 48, 64])
    raw = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))
    length = fdp.ConsumeIntInRange(0, 40)
    decoders: list[Callable[[], object]] = [
        lambda: messages.keys_from_fields(fields),
        lambda: messages.public_keys_from_reply(fields),
        lambda: messages.blobs_from_fields("share_", fields),
        lambda: messages.ints_from_field(fields.get("nodes0"), name="nodes"),
        lambda: messages.field_from_bytes(raw, bits=bits, length=length),
        lambda: messages.vector_from_bytes(raw, dtype="<f4", length=length),
        lambda: decode_share(raw),
        lambda: decode_plaintext(raw, sender=1, recipient=2, expected_index=3),
    ]
    for decode in decoders:
        with contextlib.suppress(FedSynthError):
            decode()


_OFFER = {"release-1": ("pos", "neg")}


def _generate_request_seeds() -> list[bytes]:
    from fedsynth.protocol.wire import synthesis_pb2 as pb

    request = pb.GenerateRequest(release_id="release-1", n=3, label="pos", seed=7)
    return [request.SerializeToString(), pb.GenerateRequest(release_id="x").SerializeToString()]


def _generate_request(data: bytes) -> None:
    from google.protobuf.message import DecodeError

    from fedsynth.protocol.wire import synthesis_pb2 as pb
    from fedsynth.server.synthesis_service import SynthesisLimits, validate_generate_request

    limits = SynthesisLimits(max_samples=5, sample_burst=1_000_000, request_burst=1_000_000)
    try:
        request = pb.GenerateRequest.FromString(data)
    except DecodeError:
        return  # gRPC's own deserializer refuses it before fedsynth sees a request
    with contextlib.suppress(FedSynthError):
        validate_generate_request(request, release_labels=_OFFER, limits=limits)


def _release_seeds() -> list[bytes]:
    import numpy as np

    from fedsynth.protocol.contribution import DecodedRelease
    from fedsynth.server.release import make_release, save_release
    from fedsynth.server.secure_round import RoundResult

    manifest = _manifest()
    decoded = DecodedRelease(
        vectors=np.arange(8, dtype=np.float32).reshape(2, 1, 4), counts=np.array([3.0, 2.5])
    )
    result = RoundResult(
        field_sum=np.zeros(manifest.dim, dtype=np.uint64), survivors=[1, 2, 3], dropped=[]
    )
    release = make_release(manifest, decoded, result, model_name="tiny")
    path = save_release(release, _scratch() / "seed.safetensors")
    return [path.read_bytes()]


def _release(data: bytes) -> None:
    from fedsynth.server.release import load_release

    with contextlib.suppress(FedSynthError):
        load_release(_as_file(data, "input.safetensors"))


_TASK = b"""method = "vector"
task_id = "fuzz-task"

[model]
name = "tiny-llama"
layers = [1, 2]

[privacy]
epsilon = 2.0
delta = 1e-5
mode = "distributed"

[federation]
expected_holders = 3
threshold = 2

[[labels]]
name = "positive"
instruction = "A {label} review:\\n"
shots = ["lovely"]

[[labels]]
name = "negative"
instruction = "A {label} review:\\n"
"""


def _task_file(data: bytes) -> None:
    from fedsynth.server.task_file import load_task

    with contextlib.suppress(FedSynthError):
        load_task(_as_file(data, "task.toml"))


_POLICY = b"""max_epsilon_per_task = 4.0
max_total_epsilon = 10.0
allowed_modes = ["distributed"]
budget_path = "budget.sqlite"
allow_non_private = false
"""


def _policy_file(data: bytes) -> None:
    from fedsynth.client.policy_file import load_policy_file

    with contextlib.suppress(FedSynthError):
        load_policy_file(_as_file(data, "POLICY.toml"))


def _planted_bug(data: bytes) -> None:
    """Not a decoder: reads past the end of a short input; the harness must report it."""
    _ = data[3]


TARGETS: dict[str, Target] = {
    "task-manifest": Target(
        "a task manifest (holder, from the coordinator)",
        lambda: [_manifest().to_json().encode()],
        _task_manifest,
    ),
    "pe-manifest": Target(
        "a PE round manifest (holder, from the coordinator)",
        lambda: [_pe_manifest_seed()],
        _pe_manifest,
    ),
    "roster": Target("the roster file (holder, from the operator)", _roster_seeds, _roster),
    "stage-fields": Target(
        "round message fields and share messages (both sides, from peers)",
        _stage_fields_seeds,
        _stage_fields,
    ),
    "generate-request": Target(
        "a Synthesis Generate request (the service, from any client)",
        _generate_request_seeds,
        _generate_request,
    ),
    "release-file": Target("a release file (anyone)", _release_seeds, _release),
    "task-file": Target("a task file (the coordinator)", lambda: [_TASK], _task_file),
    "policy-file": Target("a POLICY.toml (the holder)", lambda: [_POLICY], _policy_file),
    "planted-bug": Target(
        "nothing: checks that a finding is reported", lambda: [b"o"], _planted_bug
    ),
}


def rss_flags(flags: list[str], inherited_mb: int) -> list[str]:
    """``flags`` with an out-of-memory limit of RSS_BUDGET_MB over the inherited peak.

    libFuzzer compares the process's peak RSS (``getrusage``), which includes the parent's peak,
    with ``-rss_limit_mb``; without this, a run started from a large process reports an
    out-of-memory finding on its first input. A limit the caller gives is kept as it is.
    """
    if any(f.startswith("-rss_limit_mb=") for f in flags):
        return list(flags)
    return [*flags, f"-rss_limit_mb={inherited_mb + RSS_BUDGET_MB}"]


def main(argv: list[str]) -> None:
    """Run one target under libFuzzer (remaining arguments go to libFuzzer)."""
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(argv) >= 2 else 2)
    if argv[1] == "--list":
        for name, target in TARGETS.items():
            print(f"{name:18} {target.reads}")
        return
    name = argv[1]
    if name not in TARGETS:
        print(f"unknown target {name!r}; one of: {', '.join(TARGETS)}", file=sys.stderr)
        sys.exit(2)
    target = TARGETS[name]
    flags = rss_flags([a for a in argv[2:] if a.startswith("-")], _INHERITED_RSS_MB)
    corpora = [a for a in argv[2:] if not a.startswith("-")]
    seeds = _scratch() / "seeds"
    seeds.mkdir()
    with atheris.instrument_imports(include=["fedsynth"]):
        for i, seed in enumerate(target.seeds()):
            (seeds / f"seed-{i}").write_bytes(seed)
            if name != "planted-bug":
                target.one_input(seed)  # imports the decoder, instrumented
    atheris.Setup([argv[0], *flags, *corpora, str(seeds)], target.one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
