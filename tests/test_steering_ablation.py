"""The paired steering-rule ablation on a tiny study: same releases, rule changed, resumable."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from benchmarks.steering_ablation import main
from fedsynth.simulations.study import StudyRunner, read_results
from fedsynth.simulations.study_config import load_study_config

pytestmark = pytest.mark.slow

CONFIG = """
name = "tiny-denoise"
seeds = [0]
model = "tiny-llama"
layers = [1, 2]
embedder = "hashing-64"
metrics = ["tstr", "fidelity"]

[data]
private_per_label = 30
test_per_label = 20
synthetic_per_label = 6   # fewer or shorter random-model samples can hold no word for TF-IDF
max_new_tokens = 10
mia_members = 10
audit_runs = 0

[[sweep]]
name = "pooled"
methods = ["vector-pooled", "prior"]
epsilons = [8]
"""


def test_ablation_regenerates_each_release_with_the_basis_and_resumes(tmp_path: Path) -> None:
    config_path = tmp_path / "study.toml"
    config_path.write_text(CONFIG)
    results = tmp_path / "results"
    StudyRunner(load_study_config(config_path), results).run()
    (study_row,) = [r for r in read_results(results) if r["method"] == "vector-pooled"]
    out = tmp_path / "ablation"
    assert main([str(config_path), str(results), "--out", str(out)]) == 0
    with (out / "pairs.csv").open(newline="") as handle:
        (pair,) = list(csv.DictReader(handle))  # the prior has no release: not paired
    assert pair["key"] == study_row["key"]
    for metric in ("tstr_accuracy", "label_fidelity"):
        assert pair[f"{metric}_before"] == study_row[metric]
        assert 0.0 <= float(pair[f"{metric}_after"]) <= 1.0
    assert "label_fidelity" in (out / "summary.md").read_text()
    # A second run finds the pair done and generates nothing.
    stamp = (out / "pairs.csv").stat().st_mtime_ns
    assert main([str(config_path), str(results), "--out", str(out)]) == 0
    assert (out / "pairs.csv").stat().st_mtime_ns == stamp
    # At another contrast the pairs differ in two settings, and the summary says so.
    other = tmp_path / "contrast"
    assert main([str(config_path), str(results), "--out", str(other), "--contrast", "2"]) == 0
    assert "contrast 2" in (other / "summary.md").read_text()
    # A study that already denoises has nothing to compare.
    config_path.write_text(CONFIG + "\n[steering]\ndenoise = true\n")
    assert main([str(config_path), str(results), "--out", str(out)]) == 2


def test_ablation_of_the_signal_share_cut_regenerates_only_changed_releases(
    tmp_path: Path,
) -> None:
    config_path = tmp_path / "study.toml"
    config_path.write_text(CONFIG)
    results = tmp_path / "results"
    StudyRunner(load_study_config(config_path), results).run()
    (study_row,) = [r for r in read_results(results) if r["method"] == "vector-pooled"]
    # The rows were made with the default cut: asking for it again compares nothing.
    assert main([str(config_path), str(results), "--out", str(tmp_path / "x"),
                 "--min-signal-share", "0.5"]) == 2  # fmt: skip
    for cut, before in (("1", "0.5"), ("0", "1")):
        out = tmp_path / f"cut-{cut}"
        args = ["--min-signal-share", cut, "--before-min-signal-share", before]
        assert main([str(config_path), str(results), "--out", str(out), *args]) == 0
        with (out / "pairs.csv").open(newline="") as handle:
            (pair,) = list(csv.DictReader(handle))
        assert pair["key"] == study_row["key"]
        assert (
            f"min_signal_share {float(before):g} -> {float(cut):g}"
            in (out / "summary.md").read_text()
        )
        if pair["regenerated"] == "0":  # the same factors: the study's own scores
            for metric in ("tstr_accuracy", "label_fidelity"):
                assert float(pair[f"{metric}_after"]) == pytest.approx(float(study_row[metric]))
    # A cut of 1 keeps only noiseless layers: this release (ε = 8) changes and is regenerated.
    with (tmp_path / "cut-1" / "pairs.csv").open(newline="") as handle:
        assert next(csv.DictReader(handle))["regenerated"] == "1"
