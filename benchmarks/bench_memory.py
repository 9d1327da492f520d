"""Peak memory of a holder's contribution against the number of its records.

Each measurement runs in a fresh Python process (so nothing another measurement allocated is
counted) that writes nothing but its peak resident set size (``resource.getrusage``
``ru_maxrss``): the process loads the model, then computes one dataset-vector contribution of a
synthetic data file of n records through ``Contributor.contribution`` (the streamed path: the
file read a chunk at a time, features, clipping, per-record rounding and the running per-class
sums per chunk, then the noise share). Target (issue: performance and scale): the peak at 50k
records is at most 1.1x the peak at 2k records. For comparison, the same is measured for the
materialising computation (all records loaded, all features extracted, then one call of
``integer_class_sums``): what the holder's memory did before it streamed.

The PE voter (``pe``) keeps one embedding and one label index per record in memory across
rounds by design (it votes again each round): its child embeds the data file a chunk at a time
with the voter's own ``embed_data_file`` and embedder (``--embedder``; ``all-minilm-l6-v2`` by
default, ``hashing-64`` under ``--quick``) and computes one vote histogram over 2 labels x 60
candidates, as ``PEVoter.contribution`` does before its noise share. Its figure states the
memory per record; there is no target.

The default model is the tiny random-weight test model (memory is dominated by the process,
the records and the per-record arrays, not by the weights); ``--model`` takes any other.

Run: python benchmarks/bench_memory.py [--quick] [--model NAME] [--sizes 2000 50000]
(``figures(quick)`` gives the same numbers to ``python -m benchmarks``.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: benchmarks.common
from benchmarks.common import QUICK_MODEL, Figure, compared, info

ROOT = Path(__file__).resolve().parents[1]
FULL_SIZES = (2_000, 50_000)
QUICK_SIZES = (500, 5_000)
BATCH = 32
LAYERS = (1, 2)  # the tiny models have 4 blocks; the packaged model's defaults need more
TARGET_RATIO = 1.1
PATHS = ("streamed", "materialised", "pe")
PE_EMBEDDER, PE_QUICK_EMBEDDER = "all-minilm-l6-v2", "hashing-64"
PE_CANDIDATES_PER_LABEL = 60


@dataclass
class Peak:
    """Peak RSS of one fresh process that computed one contribution."""

    path: str
    n_records: int
    peak_bytes: int


def write_records(path: Path, n: int) -> None:
    """A synthetic two-label JSON Lines file of ``n`` records of about 100 characters."""
    words = [
        "the",
        "of",
        "a",
        "service",
        "was",
        "slow",
        "but",
        "the",
        "staff",
        "kind",
        "and",
        "the",
        "price",
        "fair",
        "enough",
        "overall",
    ]
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            text = " ".join(words[(i + j) % len(words)] for j in range(18)) + f" #{i}"
            handle.write(json.dumps({"text": text, "label": ("pos", "neg")[i % 2]}) + "\n")


def measure(
    path: str, n_records: int, *, model: str, data: Path, embedder: str = PE_EMBEDDER
) -> Peak:
    """Run one contribution over ``data`` in a fresh process and return its peak RSS."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            path,
            "--model",
            model,
            "--data",
            str(data),
            "--embedder",
            embedder,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"memory child ({path}, n={n_records}) failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["n_records"] != n_records:
        raise RuntimeError(f"child summed {result['n_records']} records, expected {n_records}")
    return Peak(path, n_records, int(result["peak_bytes"]))


def pe_child(data: Path, *, embedder_name: str) -> None:
    """The PE voter's memory: every record and its embedding, then one vote histogram."""
    import numpy as np

    from fedsynth.client.pe_voter import embed_data_file
    from fedsynth.protocol.embedding import load_embedder
    from fedsynth.protocol.pe import vote_histogram

    labels = ("pos", "neg")
    embedder = load_embedder(embedder_name, device="cpu")
    private, label_ids = embed_data_file(data, labels, embedder)
    candidates = np.random.default_rng(0).normal(
        size=(len(labels) * PE_CANDIDATES_PER_LABEL, private.shape[1])
    )
    votes = vote_histogram(
        private,
        label_ids,
        candidates.astype(private.dtype),
        n_labels=len(labels),
        per_label=PE_CANDIDATES_PER_LABEL,
    )
    if int(votes.sum()) != len(label_ids):
        raise RuntimeError(f"{int(votes.sum())} votes for {len(label_ids)} records")
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"n_records": len(label_ids), "peak_bytes": peak_kib * 1024}))


def child(path: str, *, model: str, data: Path) -> None:
    """One contribution over ``data`` in this process; print the peak RSS as JSON."""
    import numpy as np
    import torch
    from flwr.app import RecordDict

    from fedsynth.client.contributor import Contributor
    from fedsynth.client.data import count_records, load_records
    from fedsynth.client.settings import ClientSettings
    from fedsynth.protocol.contribution import encode_contribution, integer_class_sums
    from fedsynth.protocol.features import PromptTemplate, extract_features
    from fedsynth.protocol.manifest import PrivacySpec, TaskManifest, array_sha256
    from fedsynth.protocol.messages import vector_to_bytes
    from fedsynth.protocol.models import load_model

    torch.set_num_threads(1)  # the same work in every child, whatever the machine's load
    loaded = load_model(model)
    template = PromptTemplate("Review ({label}): ", (("pos", "positive"), ("neg", "negative")))
    reference = np.zeros((2, len(LAYERS), loaded.hidden_size), dtype=np.float32)
    manifest = TaskManifest(
        task_id="bench-memory",
        model_name=loaded.name,
        model_fingerprint=loaded.fingerprint,
        hidden_size=loaded.hidden_size,
        template=template,
        layers=LAYERS,
        max_text_tokens=64,
        clip_norms=(10.0,) * len(LAYERS),
        residual_norms=(1.0,) * len(LAYERS),
        count_weight=0.5,
        scale=100.0,
        bits=64,
        node_ids=(1, 2, 3),
        privacy=PrivacySpec(
            epsilon=4.0,
            delta=1e-6,
            mode="distributed",
            threshold=2,
            total_variance=1e5,
            noise_multiplier=1.0,
            l2_sensitivity=150.0,
            l1_sensitivity=1e4,
            accountant="bench",
        ),
        reference_sha256=array_sha256(reference),
    )
    settings = ClientSettings(data_path=data, batch_size=BATCH, seed=0)
    if path == "streamed":
        contributor = Contributor(settings, node_id=1, model_loader=lambda: loaded)
        value = contributor.contribution(
            manifest, vector_to_bytes(reference.reshape(-1)), RecordDict()
        )
        n_records = count_records(data, labels=manifest.labels)  # one more pass, no record kept
    else:
        records = load_records(data, labels=manifest.labels)
        texts, labels = [r.text for r in records], [r.label for r in records]
        spec = manifest.feature_spec
        spec = type(spec)(spec.template, spec.layers, spec.max_text_tokens, BATCH)
        features, _ = extract_features(loaded, texts, labels, spec)
        rng = np.random.default_rng(0)
        sums = integer_class_sums(features, labels, manifest=manifest, reference=reference, rng=rng)
        value = encode_contribution(sums, manifest=manifest, rng=rng)
        n_records = len(records)
    if value.shape != (manifest.dim,):
        raise RuntimeError(f"contribution shape {value.shape} != ({manifest.dim},)")
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"n_records": n_records, "peak_bytes": peak_kib * 1024}))


def run(
    sizes: tuple[int, int],
    *,
    model: str,
    paths: tuple[str, ...] = PATHS,
    embedder: str = PE_EMBEDDER,
) -> dict[str, tuple[Peak, Peak]]:
    """Peaks of the given paths at both sizes (one fresh process each)."""
    out: dict[str, tuple[Peak, Peak]] = {}
    with tempfile.TemporaryDirectory(prefix="fedsynth-bench-memory-") as tmp:
        files = []
        for n in sizes:
            data = Path(tmp) / f"records-{n}.jsonl"
            write_records(data, n)
            files.append(data)
        for path in paths:
            small, large = (
                measure(path, n, model=model, data=data, embedder=embedder)
                for n, data in zip(sizes, files, strict=True)
            )
            out[path] = (small, large)
    return out


def figures(quick: bool) -> list[Figure]:
    """Peak RSS at the larger size against the smaller, streamed and materialised."""
    sizes = QUICK_SIZES if quick else FULL_SIZES
    # --quick (CI) skips the materialising comparison, which doubles the time.
    peaks = run(
        sizes,
        model=QUICK_MODEL,
        paths=("streamed", "pe") if quick else PATHS,
        embedder=PE_QUICK_EMBEDDER if quick else PE_EMBEDDER,
    )
    return to_figures(peaks, model=QUICK_MODEL, quick=quick)


def to_figures(peaks: dict[str, tuple[Peak, Peak]], *, model: str, quick: bool) -> list[Figure]:
    """The measured peaks as table rows."""
    small, large = peaks["streamed"]
    mib = 2**20
    where = (
        f"{model}, batch {BATCH}, fresh process each, ru_maxrss; {small.n_records:,} vs "
        f"{large.n_records:,} records"
    )
    rows = [
        compared(
            "memory",
            f"holder peak RSS at {large.n_records:,} vs {small.n_records:,} records (streamed)",
            large.peak_bytes / mib,
            "MiB",
            baseline=small.peak_bytes / mib,
            at_most=TARGET_RATIO,
            judge=True,
            note=where + ("; quick sizes" if quick else ""),
        )
    ]
    if "materialised" in peaks:
        old_small, old_large = peaks["materialised"]
        rows.append(
            info(
                "memory",
                "same, materialising every record first (before streaming)",
                old_large.peak_bytes / mib,
                "MiB",
                baseline=old_small.peak_bytes / mib,
                note=where,
            )
        )
    if "pe" in peaks:
        pe_small, pe_large = peaks["pe"]
        per_record = (pe_large.peak_bytes - pe_small.peak_bytes) / (
            pe_large.n_records - pe_small.n_records
        )
        rows.append(
            info(
                "memory",
                f"PE voter peak RSS at {pe_large.n_records:,} vs {pe_small.n_records:,} records",
                pe_large.peak_bytes / mib,
                "MiB",
                baseline=pe_small.peak_bytes / mib,
                note=f"records and their embeddings kept across rounds by design: about "
                f"{per_record:,.0f} bytes per record; fresh process each, ru_maxrss",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 and 5,000 records")
    parser.add_argument("--sizes", type=int, nargs=2, default=None, metavar=("SMALL", "LARGE"))
    parser.add_argument("--model", default=QUICK_MODEL)
    parser.add_argument("--streamed-only", action="store_true", help="skip the comparison")
    parser.add_argument("--embedder", default=None, help="PE voter's embedder")
    parser.add_argument("--child", choices=PATHS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    embedder = args.embedder or (PE_QUICK_EMBEDDER if args.quick else PE_EMBEDDER)
    if args.child == "pe":
        pe_child(args.data, embedder_name=embedder)
        return
    if args.child:
        child(args.child, model=args.model, data=args.data)
        return
    sizes = tuple(args.sizes) if args.sizes else (QUICK_SIZES if args.quick else FULL_SIZES)
    paths = PATHS[:1] if args.streamed_only else PATHS
    peaks = run(sizes, model=args.model, paths=paths, embedder=embedder)
    for path, (small, large) in peaks.items():
        print(
            f"{path:>12}: {small.n_records:>7,} records {small.peak_bytes / 2**20:8.1f} MiB   "
            f"{large.n_records:>7,} records {large.peak_bytes / 2**20:8.1f} MiB   "
            f"ratio {large.peak_bytes / small.peak_bytes:.3f}"
        )
    for row in to_figures(peaks, model=args.model, quick=args.quick):
        print(json.dumps(row.as_dict()))


if __name__ == "__main__":
    main()
