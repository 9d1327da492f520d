from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fedsynth.client.data import MAX_CHARS, Record, load_records
from fedsynth.protocol.errors import ConfigError
from fedsynth.simulations.datasets import (
    available_corpora,
    left_over,
    load_bbc_news,
    load_corpus,
    load_rotten_tomatoes,
    partition_iid,
    split_train_test,
    subsample_per_label,
    write_jsonl,
)


def toy_records() -> list[Record]:
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 7 + ["d"]
    return [Record(f"text {i}", label) for i, label in enumerate(labels)]


def test_rotten_tomatoes() -> None:
    corpus = load_rotten_tomatoes()
    assert corpus.name == "rotten_tomatoes"
    assert corpus.labels == ("negative", "positive")
    counts = corpus.label_counts()
    assert len(corpus) > 12000
    assert 7000 <= counts["positive"] <= 7500
    assert 5000 <= counts["negative"] <= 5600
    texts = [r.text for r in corpus.records]
    assert len(set(texts)) == len(texts)
    assert all(t == " ".join(t.split()) and t for t in texts)
    assert "Pang" in corpus.source
    assert "research" in corpus.source
    assert load_corpus("rotten_tomatoes") == corpus


def test_bbc_news() -> None:
    corpus = load_bbc_news()
    assert corpus.labels == ("business", "entertainment", "politics", "sports", "tech")
    assert 2100 <= len(corpus) <= 2225
    texts = [r.text for r in corpus.records]
    assert len(set(texts)) == len(texts)
    assert texts[0].startswith("Ad sales boost Time Warner profit")
    assert any("£15.8m" in t for t in texts)  # the one cp1252 file is decoded properly
    # Every article a holder accepts: the one longer than MAX_CHARS made a holder refuse its file.
    assert max(len(t) for t in texts) <= MAX_CHARS
    assert len(corpus) == 2124
    full = load_bbc_news(drop_duplicates=False)
    assert len(full) == 2224  # 2,225 files, one too long
    assert Counter(r.label for r in full.records)["business"] == 510
    assert "Greene" in corpus.source


def test_load_corpus_unknown_name() -> None:
    assert available_corpora() == ("bbc_news", "rotten_tomatoes")
    with pytest.raises(ConfigError, match=r"'imdb'.*bbc_news.*rotten_tomatoes"):
        load_corpus("imdb")


def test_split_is_deterministic_stratified_disjoint_and_complete() -> None:
    records = toy_records()
    train, test = split_train_test(records, test_fraction=0.2, seed=3)
    assert (train, test) == split_train_test(records, test_fraction=0.2, seed=3)
    assert split_train_test(records, test_fraction=0.2, seed=4) != (train, test)
    assert sorted(train + test, key=lambda r: r.text) == sorted(records, key=lambda r: r.text)
    assert not {r.text for r in train} & {r.text for r in test}
    assert Counter(r.label for r in test) == {"a": 10, "b": 6, "c": 1}
    assert Counter(r.label for r in train)["d"] == 1


def test_split_real_corpus_stratified() -> None:
    records = load_rotten_tomatoes().records
    train, test = split_train_test(records, test_fraction=0.15, seed=0)
    assert len(train) + len(test) == len(records)
    share = Counter(r.label for r in test)["positive"] / len(test)
    overall = Counter(r.label for r in records)["positive"] / len(records)
    assert abs(share - overall) < 0.001


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ConfigError, match="test_fraction"):
        split_train_test(toy_records(), test_fraction=fraction)


def test_subsample_per_label() -> None:
    records = toy_records()
    sub = subsample_per_label(records, per_label=5, seed=1)
    assert Counter(r.label for r in sub) == {"a": 5, "b": 5, "c": 5, "d": 1}
    assert sub == subsample_per_label(records, per_label=5, seed=1)
    assert sub != subsample_per_label(records, per_label=5, seed=2)
    assert subsample_per_label(records, per_label=None, seed=0) == records
    with pytest.raises(ConfigError, match="per_label"):
        subsample_per_label(records, per_label=0, seed=0)


@pytest.mark.parametrize("num_clients", [1, 3, 7, 88])
def test_partition_iid(num_clients: int) -> None:
    records = toy_records()
    parts = partition_iid(records, num_clients=num_clients, seed=5)
    assert len(parts) == num_clients
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    flat = [r for p in parts for r in p]
    assert sorted(flat, key=lambda r: r.text) == sorted(records, key=lambda r: r.text)
    assert parts == partition_iid(records, num_clients=num_clients, seed=5)


@pytest.mark.parametrize("num_clients", [0, -1, 89])
def test_partition_rejects_bad_client_count(num_clients: int) -> None:
    with pytest.raises(ConfigError, match="num_clients"):
        partition_iid(toy_records(), num_clients=num_clients, seed=0)


def test_write_jsonl_round_trip(tmp_path: Path) -> None:
    records = [Record('Ünïcödé £ "quoted"\nnewline', "x"), Record("plain", "y")]
    path = tmp_path / "sub" / "out.jsonl"
    write_jsonl(iter(records), path)
    assert "Ünïcödé" in path.read_text(encoding="utf-8")
    assert load_records(path) == records


def test_jsonl_keeps_one_record_per_line_with_unicode_line_breaks(tmp_path: Path) -> None:
    # Generated text can hold U+0085, U+2028 or U+2029: readers that split on Unicode line
    # breaks (str.splitlines) must still see one record per line.
    from fedsynth.simulations.datasets import json_line

    text = "a\x85b\u2028c\u2029d\x1ce"
    line = json_line({"text": text, "label": "x"})
    assert len(line.splitlines()) == 1
    assert json.loads(line)["text"] == text
    path = tmp_path / "r.jsonl"
    write_jsonl([Record(text=text, label="x"), Record(text="plain é", label="y")], path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    assert [json.loads(x)["text"] for x in lines] == [text, "plain é"]
    assert "é" in lines[1]  # non-ASCII text stays readable


def test_left_over_counts_duplicates() -> None:
    a, b = Record("same", "x"), Record("other", "y")
    assert left_over([a, a, b], [a]) == [a, b]
    assert left_over([a, a, b], [a, b, a]) == []
    assert left_over([a, b], []) == [a, b]
