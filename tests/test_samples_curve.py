"""The samples-per-label curve: nested prefixes, scores, summary, a whole run on a tiny model."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from benchmarks.samples_curve import Point, _cached, main, prefixes, score_curve, summarize

PAIRS = [("b", f"b{i}") for i in range(5)] + [("a", f"a{i}") for i in range(3)]


def test_prefixes_are_nested_and_hold_every_label() -> None:
    got = prefixes(PAIRS, [3, 1, 4])
    assert [size for size, _, _ in got] == [1, 3]  # 4: label a has only 3 texts
    _, texts, labels = got[1]
    assert texts == ["a0", "a1", "a2", "b0", "b1", "b2"] and labels == ["a"] * 3 + ["b"] * 3
    assert got[0][1] == ["a0", "b0"]
    assert prefixes([], [1]) == []


def test_scores_follow_the_texts() -> None:
    from fedsynth.simulations.metrics import train_text_classifier

    words = {"pos": "good great fine", "neg": "bad awful poor"}
    judge = train_text_classifier(
        [words[lb] + f" {i}" for lb in words for i in range(10)],
        [lb for lb in words for _ in range(10)],
    )
    test_texts = [words[lb] for lb in words for _ in range(5)]
    test_labels = [lb for lb in words for _ in range(5)]
    right = [(lb, words[lb]) for lb in words for _ in range(4)]
    swapped = [(lb, words["neg" if lb == "pos" else "pos"]) for lb in words for _ in range(4)]
    kwargs = {"judge": judge, "test_texts": test_texts, "test_labels": test_labels}
    good = score_curve("right", 0, right, [2, 4], **kwargs)
    bad = score_curve("swapped", 0, swapped, [2, 4], **kwargs)
    assert [p.per_label for p in good] == [2, 4]
    assert all(p.tstr_accuracy == 1.0 and p.label_fidelity == 1.0 for p in good)
    assert all(p.tstr_accuracy == 0.0 and p.label_fidelity == 0.0 for p in bad)


def test_summary_is_mean_and_sd_over_seeds() -> None:
    points = [Point("x", s, 10, acc, 0.5) for s, acc in enumerate((0.6, 0.8))]
    (row,) = summarize([*points])
    assert row["seeds"] == 2 and row["tstr_accuracy"] == pytest.approx(0.7)
    assert row["tstr_accuracy_sd"] == pytest.approx(0.1414, abs=1e-3)
    assert row["label_fidelity_sd"] == 0.0


def test_kept_samples_are_topped_up_not_regenerated(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []

    def make(n: int, seed: int) -> list[tuple[str, str]]:
        calls.append((n, seed))
        return [(lb, f"{lb}-{seed}-{i}") for lb in ("x", "y") for i in range(n)]

    path = tmp_path / "samples.jsonl"
    first = _cached(path, make, per_label=2, seed=7)
    assert calls == [(2, 7)] and len(first) == 4
    assert _cached(path, make, per_label=2, seed=7) == first and len(calls) == 1  # kept
    assert _cached(path, make, per_label=1, seed=7) == first and len(calls) == 1  # enough
    grown = _cached(path, make, per_label=5, seed=7)
    assert len(calls) == 2 and calls[1][0] == 3 and calls[1][1] != 7  # a seed of its own
    assert grown[:4] == first and len(grown) == 10  # the first texts stay where they were
    assert prefixes(grown, [2])[0][1] == [t for lb, t in first if lb == "x"] + [
        t for lb, t in first if lb == "y"
    ]
    assert _cached(path, make, per_label=5, seed=7) == grown and len(calls) == 2


@pytest.mark.slow
def test_a_run_writes_the_curve_and_resumes_from_its_samples(tmp_path: Path) -> None:
    argv = ["--model", "tiny-llama", "--sizes", "2", "4", "--out", str(tmp_path)]
    main([*argv, "--seed", "0", "--seed", "1"])
    with (tmp_path / "curve.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["condition"], r["seed"], r["per_label"]) for r in rows} == {
        (c, s, n) for c in ("prior", "real") for s in ("0", "1") for n in ("2", "4")
    }
    assert (tmp_path / "curve.png").stat().st_size > 0
    cached = tmp_path / "samples-prior-seed0.jsonl"
    assert len(cached.read_text().splitlines()) == 8  # 4 per label, two labels
    # A rerun reads the kept samples instead of generating: scores are the same.
    cached_text = cached.read_text()
    main([*argv, "--seed", "0", "--no-real"])
    assert cached.read_text() == cached_text
    with (tmp_path / "curve.csv").open() as handle:
        again = {(r["condition"], r["per_label"]): r for r in csv.DictReader(handle)}
    for r in rows:
        if r["condition"] == "prior" and r["seed"] == "0":
            assert again[("prior", r["per_label"])]["tstr_accuracy"] == r["tstr_accuracy"]
    # Runs made apart (one per seed) merge into one curve.
    other = tmp_path / "seed1"
    main(["--model", "tiny-llama", "--sizes", "2", "--out", str(other), "--seed", "1"])
    merged = tmp_path / "merged"
    main(["--out", str(merged), "--merge", str(tmp_path), str(other)])
    with (merged / "curve.csv").open() as handle:
        both = list(csv.DictReader(handle))
    assert len(both) == 2 + 2 and (merged / "curve.png").exists()  # prior 2, 4; prior, real 2


def test_a_run_on_the_users_data_uses_its_labels(tmp_path: Path) -> None:
    import json

    data = tmp_path / "mine.jsonl"
    rows = [
        {"text": f"{label} text number {i} about {label}", "label": label}
        for label in ("alpha", "beta", "gamma")
        for i in range(40)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "curve"
    argv = ["--model", "tiny-llama", "--preset", "quick", "--sizes", "2", "--out", str(out)]
    main([*argv, "--data", str(data), "--instruction", "A note on {label}:\n", "--no-real"])
    samples = [json.loads(line) for line in (out / "samples-prior-seed0.jsonl").open()]
    assert sorted({s["label"] for s in samples}) == ["alpha", "beta", "gamma"]
    with (out / "curve.csv").open() as handle:
        assert {r["condition"] for r in csv.DictReader(handle)} == {"prior"}
