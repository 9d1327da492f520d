"""A whole study on a tiny model: real Flower simulation, results.csv, report, resume, CLI."""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedsynth.client.budget import ClientBudget
from fedsynth.server.release import load_release
from fedsynth.simulations.cli import app
from fedsynth.simulations.study import StudyRunner, _slug
from fedsynth.simulations.study_config import load_study_config

pytestmark = pytest.mark.slow

CONFIG = """
name = "tiny"
seeds = [0]
model = "tiny-llama"
layers = [1, 2]
embedder = "hashing-64"
metrics = ["tstr", "fidelity", "fid", "mauve", "self_bleu", "distinct", "next_word", "mia",
           "canary"]

[data]
private_per_label = 30
test_per_label = 30
synthetic_per_label = 6
mia_members = 20
max_new_tokens = 10
audit_runs = 12
canaries = 2
canary_candidates = 15

[pe]
rounds = 1
population = 6
output = 9   # the final population grows from the last votes: 9 samples per label

[[sweep]]
name = "privacy"
methods = ["prior", "vector", "vector-pooled", "vector-nonprivate", "icl-verbatim"]
epsilons = [12, "inf"]  # 12 is above a holder's default policy: the study widens it
clients = [3]

[[sweep]]
name = "baselines"
methods = ["rpsg", "noisy-icl", "pe", "pe-steered", "dp-sgd", "dp-fedavg"]
epsilons = [8]

[[sweep]]
name = "holders"
methods = ["vector"]
epsilons = [8]
clients = [3, 4]
partitions = ["label-skew:0.5"]

[[sweep]]
name = "dropout"
methods = ["vector"]
epsilons = [8]
clients = [4]
dropouts = [0, 0.25]
partitions = ["label-skew:0.5"]
"""
SCORING_GENERATORS = (
    "prior",
    "vector",
    "vector-pooled",
    "vector-nonprivate",
    "icl-verbatim",
    "dp-sgd",
    "dp-fedavg",
)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("study")
    config_path = root / "tiny.toml"
    config_path.write_text(CONFIG)
    out = root / "out"
    StudyRunner(load_study_config(config_path), out).run()
    return config_path, out


def _run_counting(runner: StudyRunner) -> tuple[list[str], list[dict[str, str]]]:
    """Run the study; return the keys of the cells it actually ran, and its rows."""
    ran: list[str] = []
    original = runner.run_cell

    def counting(cell):  # type: ignore[no-untyped-def]
        ran.append(cell.key)
        return original(cell)

    runner.run_cell = counting  # type: ignore[method-assign]
    return ran, runner.run()


def _copy(study_out: Path, tmp_path: Path) -> Path:
    """A copy of the module's finished study folder that a test may change."""
    out = tmp_path / "out"
    shutil.copytree(study_out, out)
    return out


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_one_row_per_cell_with_metrics_and_performance(study: tuple[Path, Path]) -> None:
    config_path, out = study
    config = load_study_config(config_path)
    rows = _rows(out)
    assert [r["key"] for r in rows] == [c.key for c in config.cells()]
    assert {r["status"] for r in rows} == {"ok"}
    for row in rows:
        for column in (
            "tstr_accuracy",
            "tstr_macro_f1",
            "label_fidelity",
            "embedding_fd",
            "mauve",
            "self_bleu",
            "distinct_1",
            "distinct_2",
            "next_word_accuracy",
            "mia_auc",
            "cell_seconds",
        ):
            assert row[column] != "", (row["key"], column)
        assert 0.0 <= float(row["mia_auc"]) <= 1.0
        # Exposure needs a generator that scores text: prior, vector releases, verbatim ICL.
        if row["method"] in SCORING_GENERATORS:
            assert 0.0 <= float(row["canary_exposure"]) <= math.log2(16) + 1e-9
        else:
            assert row["canary_exposure"] == ""
    # The leaky control copies half of the records it read: the attack finds them.
    (control,) = [r for r in rows if r["method"] == "icl-verbatim"]
    assert float(control["mia_auc"]) > 0.6
    federated = [r for r in rows if r["method"] in ("vector", "pe", "pe-steered", "dp-fedavg")]
    assert len(federated) == 2 + 3 + 1 + 1 + 1
    dropped = [r for r in federated if r["dropout"] == "0.25"]
    assert [r["clients"] for r in dropped] == ["4"]
    for row in federated:
        assert float(row["bytes_per_client"]) > 0
        assert float(row["client_seconds"]) > 0
    for row in rows:
        if row["method"] in ("vector", "vector-pooled", "vector-nonprivate", "icl-verbatim"):
            assert float(row["generation_tokens_per_s"]) > 0
    for row in rows:
        lines = (out / "cells" / _slug(row["key"]) / "synthetic.jsonl").read_text().splitlines()
        assert len(lines) == int(row["n_synthetic"]) > 0


def test_every_noisy_release_carries_its_stated_noise(study: tuple[Path, Path]) -> None:
    _, out = study
    rows = _rows(out)
    with (out / "noise.csv").open(newline="") as handle:
        checks = list(csv.DictReader(handle))
    checked = {c["key"] for c in checks}
    # Every noisy release: the vector cells (a dropout cell against its survivors' records),
    # the pooled release and pe-steered's vector half; never ε = ∞.
    expected = {
        r["key"]
        for r in rows
        if r["method"] in ("vector", "vector-pooled", "pe-steered") and r["epsilon"] != "inf"
    }
    assert any(r["dropout"] != "0" for r in rows if r["key"] in expected)
    assert checked == expected
    for check in checks:
        assert check["verdict"] == "ok", check
        assert float(check["low"]) <= float(check["ratio"]) <= float(check["high"])


def test_a_release_with_extra_noise_is_marked_invalid_and_run_again(
    study: tuple[Path, Path], tmp_path: Path
) -> None:
    """Code that adds noise its release does not state (holders and coordinator out of step)."""
    import dataclasses

    from fedsynth.server.release import save_release
    from fedsynth.server.snr import coordinate_noise_sd

    config_path, original = study
    out = _copy(original, tmp_path)
    key = "vector|distributed|eps=8|K=3|label-skew:0.5|drop=0|seed=0"
    (path,) = (out / "cells" / _slug(key)).glob("release-*.safetensors")
    release = load_release(path)
    sd = coordinate_noise_sd(release)  # (C, L): the stated noise per coordinate
    # Three times the stated sd on top: about 10x the stated variance, far outside the band
    # even of the tiny model's 130 coordinates (about 0.6-1.6).
    extra = np.random.default_rng(0).normal(size=release.vectors.shape) * 3 * sd[:, :, None]
    save_release(dataclasses.replace(release, vectors=release.vectors + extra), path)
    with (out / "noise.csv").open(newline="") as handle:
        kept = [r for r in csv.DictReader(handle) if r["key"] != key]
    with (out / "noise.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(kept[0]))
        writer.writeheader()
        writer.writerows(kept)

    runner = StudyRunner(load_study_config(config_path), out)
    assert runner.check_stored_noise() == [key]
    (row,) = [r for r in _rows(out) if r["key"] == key]
    assert row["status"].startswith("invalid: ")
    assert "more noise than stated" in row["status"]
    runner.report()
    report = (out / "report.md").read_text()
    assert "## Realized noise" in report
    assert "1 cells failed and are left out of every table above" in report
    assert f"* `{key}`: release-" in report

    ran, again = _run_counting(runner)
    assert ran == [key]
    assert [r["key"] for r in again] == [r["key"] for r in _rows(original)]
    (row,) = [r for r in again if r["key"] == key]
    assert row["status"] == "ok"


def test_federated_vector_equals_the_pooled_central_vector(study: tuple[Path, Path]) -> None:
    # Without noise the federation's release is the pooled curator's release: the same
    # clipping, rounding and decoding, summed across holders (rounding noise only).
    _, out = study
    fed = load_release(
        out
        / "cells"
        / _slug("vector|distributed|eps=inf|K=3|iid|drop=0|seed=0")
        / "release-epsinf.safetensors"
    )
    pooled = load_release(
        out
        / "cells"
        / _slug("vector-nonprivate|none|eps=inf|K=1|pooled|drop=0|seed=0")
        / "release-pooled.safetensors"
    )
    np.testing.assert_allclose(fed.counts, pooled.counts, rtol=0, atol=1e-9)
    # Each record's coordinates are stochastically rounded (error of width < 1 unit, mean 0)
    # on both sides independently, so a coordinate of the difference is a sum of 2n such
    # errors over scale * n: Hoeffding bounds it by sqrt(n ln(2 m / 1e-9)) units with
    # probability 1 - 1e-9 over all m coordinates. A wrong clip, scale or count breaks this
    # by orders of magnitude.
    manifest = fed.manifest
    n = pooled.counts[:, None, None]
    clip = np.asarray(manifest.clip_norms, dtype=np.float64)[None, :, None]
    m = fed.vectors.size
    bound = clip * np.sqrt(n * math.log(2 * m / 1e-9)) / (manifest.scale * n)
    diff = np.abs(fed.vectors.astype(np.float64) - pooled.vectors.astype(np.float64))
    assert (diff <= bound + 1e-7).all(), float((diff / bound).max())
    assert np.abs(pooled.vectors).max() > 100 * bound.max()


def test_steered_pe_spends_part_of_the_cell_epsilon_on_its_steering_vector(
    study: tuple[Path, Path],
) -> None:
    # pe-steered at ε = 8: a vector release at ε = 4 (init_fraction 0.5) steers the populations,
    # the PE rounds spend the other 4; every holder is charged the composed 8, never more.
    _, out = study
    cell = out / "cells" / _slug("pe-steered|distributed|eps=8|K=3|iid|drop=0|seed=0")
    release = load_release(cell / "release-eps4.safetensors")
    assert release.manifest.privacy.epsilon == pytest.approx(4.0)
    for i in range(3):
        assert ClientBudget(cell / "clients" / f"budget-{i}.sqlite").spent() == pytest.approx(8.0)
    plain = out / "cells" / _slug("pe|distributed|eps=8|K=3|iid|drop=0|seed=0")
    assert not list(plain.glob("release-*.safetensors"))  # plain PE makes no vector release
    assert ClientBudget(plain / "clients" / "budget-0.sqlite").spent() == pytest.approx(8.0)
    for folder in (cell, plain):  # voted on 6 per label, released 9 per label
        rows = [json.loads(x) for x in (folder / "synthetic.jsonl").read_text().splitlines()]
        assert sorted(Counter(r["label"] for r in rows).values()) == [9, 9]


def test_report_plots_audit(study: tuple[Path, Path]) -> None:
    _, out = study
    report = (out / "report.md").read_text()
    for heading in (
        "## Methods and the guarantee each gives",
        "## Results",
        "## Holders' data",
        "## Empirical privacy audit",
        "![utility_vs_epsilon.png]",
    ):
        assert heading in report
    assert "NOT private" in report
    assert "## Does the attack have power?" in report
    assert "label-skew:0.5, K=4, seed=0" in report
    for plot in (
        "utility_vs_epsilon.png",
        "mia_vs_epsilon.png",
        "utility_vs_clients.png",
        "utility_vs_dropout.png",
    ):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    with (out / "audit.csv").open(newline="") as handle:
        audits = list(csv.DictReader(handle))
    assert {(a["mode"], a["claimed_epsilon"], a["clients"]) for a in audits} == {
        ("distributed", "12", "3"),
        ("central", "12", "3"),
        ("distributed", "8", "3"),
        ("distributed", "8", "4"),
    }
    for a in audits:
        assert 0.0 <= float(a["epsilon_lower_bound"]) <= float(a["claimed_epsilon"])


def test_resume_recomputes_only_missing_cells(study: tuple[Path, Path]) -> None:
    config_path, out = study
    rows = _rows(out)
    # Drop the last finished row, as if the study had been stopped during that cell.
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:-1])
    ran, again = _run_counting(StudyRunner(load_study_config(config_path), out))
    assert ran == [rows[-1]["key"]]
    assert [r["key"] for r in again] == [r["key"] for r in rows]


def test_a_source_change_during_a_cell_marks_it_invalid_and_stops(
    study: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Holders import fedsynth afresh for every cell; an edit mid-study must not go unseen."""
    from fedsynth.simulations import study as study_module

    config_path, original = study
    out = _copy(original, tmp_path)
    rows = _rows(out)
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:-1])
    versions = iter(["before", "after"])
    monkeypatch.setattr(study_module, "source_fingerprint", lambda: next(versions))
    with pytest.raises(study_module.SourceChangedError, match="source changed"):
        StudyRunner(load_study_config(config_path), out).run()
    (row,) = [r for r in _rows(out) if r["key"] == rows[-1]["key"]]
    assert row["status"] == "invalid: fedsynth's source changed while the cell ran"

    monkeypatch.setattr(study_module, "source_fingerprint", lambda: "same")
    again = StudyRunner(load_study_config(config_path), out).run()
    assert {r["status"] for r in again} == {"ok"}
    assert [r["key"] for r in again] == [r["key"] for r in rows]


def test_cli_dry_run_and_bad_config(study: tuple[Path, Path], tmp_path: Path) -> None:
    config_path, _ = study
    result = CliRunner().invoke(app, ["simulate", str(config_path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "16 cells" in result.output
    bad = tmp_path / "bad.toml"
    bad_text = CONFIG.replace('methods = ["prior"', 'methods = ["magic", "prior"')
    assert bad_text != CONFIG
    bad.write_text(bad_text)
    out = tmp_path / "never"
    result = CliRunner().invoke(app, ["simulate", str(bad), "--out", str(out)])
    assert result.exit_code == 2
    assert "method 'magic' is unknown" in result.output
    assert not out.exists()  # refused before anything was written or computed
    # Error messages are printed literally (a TOML table name is not console markup).
    bad.write_text('name = "x"\n')
    result = CliRunner().invoke(app, ["simulate", str(bad), "--out", str(out)])
    assert result.exit_code == 2
    assert "at least one [[sweep]] table" in result.output


def test_cells_are_seeded(study: tuple[Path, Path]) -> None:
    # The partition of a cell is a function of its seed: a rerun federates the same holders.
    config_path, out = study
    config = load_study_config(config_path)
    cell = next(c for c in config.cells() if c.method == "vector")
    a = StudyRunner(config, out).partitions(cell)
    b = StudyRunner(config, out).partitions(cell)
    assert a == b


def test_report_only_writes_the_partial_report_and_runs_nothing(
    study: tuple[Path, Path], tmp_path: Path
) -> None:
    # A study spanning several sittings is read before it is complete: the report covers the
    # finished rows only and no cell runs.
    config_path, out = study
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "study.json").write_text((out / "study.json").read_text())
    lines = (out / "results.csv").read_text().splitlines(keepends=True)
    (partial / "results.csv").write_text("".join(lines[:4]))  # header and three rows
    before = (partial / "results.csv").read_text()
    result = CliRunner().invoke(
        app, ["simulate", str(config_path), "--out", str(partial), "--report-only"]
    )
    assert result.exit_code == 0, result.output
    assert "3 of 16 cells finished" in result.output
    assert (partial / "results.csv").read_text() == before
    assert not (partial / "cells").exists()
    report = (partial / "report.md").read_text()
    assert "3 cells in `results.csv`" in report
    assert "| prior | none |" in report
    assert "| icl-verbatim |" not in report  # not finished in this folder
    empty = tmp_path / "empty"
    result = CliRunner().invoke(
        app, ["simulate", str(config_path), "--out", str(empty), "--report-only"]
    )
    assert result.exit_code == 2
    assert "nothing to report" in " ".join(result.output.split())
    assert not empty.exists()


def test_cli_check_noise_checks_the_kept_releases_and_runs_nothing(
    study: tuple[Path, Path], tmp_path: Path
) -> None:
    config_path, original = study
    out = _copy(original, tmp_path)
    (out / "noise.csv").unlink()  # as in a folder made before the check existed
    before = (out / "results.csv").read_text()
    result = CliRunner().invoke(
        app, ["simulate", str(config_path), "--out", str(out), "--check-noise"]
    )
    assert result.exit_code == 0, result.output
    assert "0 cells failed the noise check" in " ".join(result.output.split())
    assert (out / "results.csv").read_text() == before  # nothing ran, nothing marked
    with (out / "noise.csv").open(newline="") as handle:
        checked = list(csv.DictReader(handle))
    with (original / "noise.csv").open(newline="") as handle:
        assert {c["key"] for c in checked} == {c["key"] for c in csv.DictReader(handle)}
    assert all(c["verdict"] == "ok" for c in checked)
    empty = tmp_path / "empty"
    result = CliRunner().invoke(
        app, ["simulate", str(config_path), "--out", str(empty), "--check-noise"]
    )
    assert result.exit_code == 2
    assert "nothing to check" in " ".join(result.output.split())
