"""End to end: the demo CLI on the real default model and bundled data (slow, runs in CI).

One run of ``fedsynth demo`` (3 holders, distributed DP, epsilon = 4, secure sum, real Flower
simulation), then ``fedsynth generate`` from the saved release. The utility claim is tested with
a stated one-sided two-proportion z-test: label fidelity of the epsilon = 4 release is higher
than that of the unsteered prior (same template), at significance level 0.01. And the release
itself steers: each class's direction, applied exactly as generation applies it, makes that
class's real held-out texts likelier (paired one-sided t-test, 0.01).

The run uses steering strength 0.05 and class contrast 2: label fidelity is what this test
measures, and it grows with both (README: 0.63 / 0.68 / 0.72 at strength 0.02 / 0.03 / 0.05;
contrast 2 lifts the negative class, which the plain class vector barely moves). Fidelity is
judged by a classifier of other real texts, neither the holders' nor the held-out ones. The
demo's defaults, strength 0.03 and contrast 1, trade fidelity for more natural text. Strength
and contrast only change generation, never the release or its privacy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedsynth.server.ledger import PrivacyLedger

pytestmark = pytest.mark.slow

ALPHA = 0.01
# At 50 per label (100 samples a condition) three runs gave fidelity 0.74 / 0.76 / 0.81 against
# the prior's 0.59: the first is p = 0.012, a failed run. At 100 per label a release at 0.72
# still gives p = 0.003.
SAMPLES_PER_LABEL = 100
PRIVATE_PER_LABEL = 1500
CONTRAST = 2.0
# The release's noise moves the held-out gain between runs, and the first positive texts gain
# least: at 40 per label the positive class gave p = 0.015 (a failed run), 0.002 and 0.002;
# at 120 the last two gave 4e-10 and 3e-9.
HELDOUT_PER_LABEL = 120


# The demo is the suite's longest test: it computes on two threads (tests/conftest.py gives
# every other process one, and makes waiting threads sleep, so sharing the cores stays cheap).
THREADS = 2


def _cli(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    # Ray starts the simulated holders at niceness 15, where they get a few percent of a core
    # next to the other workers' tests: this run is the suite's critical path, so its holders
    # compute at the normal priority (only this run's: every Ray test at 0 was slower overall).
    env["RAY_worker_niceness"] = "0"
    return subprocess.run(
        [sys.executable, "-m", "fedsynth.simulations", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    proc = _cli(
        "demo",
        "--out",
        str(out),
        "--epsilon",
        "4",
        "--clients",
        "3",
        "--samples",
        str(SAMPLES_PER_LABEL),
        "--private-per-label",
        str(PRIVATE_PER_LABEL),
        "--prior-per-label",  # public prior texts for the reference (clip norms, scale)
        str(SAMPLES_PER_LABEL),
        "--strength",
        "0.05",
        "--contrast",
        str(CONTRAST),
        "--no-baseline",
        # Shot conditioning (the default) doubles the generation: its mechanics are tested on
        # the tiny model (tests/server/test_shot_generation.py), its gain measured by
        # benchmarks/bench_utility.py; this test keeps the plain prompt to fit CI's budget.
        "--shots",
        "0",
        timeout=2700,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


def test_outputs_and_privacy_report(demo_out: Path) -> None:
    rows = [json.loads(line) for line in (demo_out / "synthetic.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * SAMPLES_PER_LABEL
    assert {r["label"] for r in rows} == {"positive", "negative"}
    assert all(set(r) == {"text", "label", "release_id"} for r in rows)
    assert sum(1 for r in rows if r["text"].strip()) >= 0.95 * len(rows)
    report = json.loads((demo_out / "privacy_report.json").read_text())
    assert {r["release_id"] for r in rows} == {report["task_id"]}
    assert report["epsilon"] == 4.0 and report["delta"] == 1e-5
    assert report["trust_mode"] == "distributed"
    assert report["K"] == 3 and report["threshold_t"] == 2 and report["survivors"] == 3
    assert report["dropped_clients"] == []
    assert report["noise"]["noise_multiplier"] > 0.5
    assert report["model_fingerprint"].startswith("sha256:")
    assert len(report["layers"]) == len(report["clip_norms"]) > 0
    assert "RDP" in report["accountant"]
    ledger = PrivacyLedger(demo_out / "ledger.sqlite").rows()
    assert [row["epsilon"] for row in ledger] == ["4.0"]


def test_eps4_fidelity_beats_prior(demo_out: Path) -> None:
    from fedsynth.simulations.metrics import one_sided_proportion_test

    summary = json.loads((demo_out / "summary.json").read_text())
    assert summary["steering"]["4"]["contrast"] == CONTRAST
    assert "neither the holders' data nor the held-out set" in summary["judge"]
    assert summary["real_reference"]["per_label"] == SAMPLES_PER_LABEL
    assert 0.5 < summary["real_reference"]["tstr_accuracy"] <= 1.0  # real texts beat chance
    scores = summary["scores"]
    prior, ours = scores["prior (eps=0)"], scores["eps=4"]
    # The non-private ceiling is skipped here to keep CI short; the deployment test and the
    # README's default run cover the three-condition summary.
    assert set(scores) == {"prior (eps=0)", "eps=4"}
    for row in scores.values():
        assert {"label_fidelity", "tstr_accuracy", "tstr_macro_f1", "embedding_fd"} <= set(row)
        # Closeness and diversity beside fidelity: MAUVE in (0, 1], Self-BLEU in [0, 100].
        assert 0 < row["mauve"] <= 1 and 0 <= row["self_bleu"] <= 100
        assert 0 < row["distinct_1"] <= 1 and 0 < row["distinct_2"] <= 1
    p = one_sided_proportion_test(
        int(ours["fidelity_hits"]), int(ours["n"]), int(prior["fidelity_hits"]), int(prior["n"])
    )
    print(
        f"label fidelity eps=4 {ours['label_fidelity']:.3f} vs prior "
        f"{prior['label_fidelity']:.3f}: p = {p:.2e}"
    )
    assert p < ALPHA, (ours["label_fidelity"], prior["label_fidelity"], p)


@pytest.fixture
def demo_threads() -> Iterator[None]:
    """Score on THREADS threads, as the demo computes (the worker's other tests use one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("demo_threads")
def test_released_class_vectors_raise_heldout_logprob(demo_out: Path) -> None:
    """The epsilon = 4 release (decoded from the real secure sum of three holders' noisy,
    clipped, rounded class sums) raises the log-probability of its class's held-out texts."""
    from scipy import stats

    from fedsynth.protocol.models import load_model
    from fedsynth.server.generation import text_logprobs
    from fedsynth.server.release import load_release
    from fedsynth.server.synthesize import label_deltas
    from fedsynth.simulations.demo import TEMPLATES, demo_config, split_data

    release = load_release(demo_out / "release-eps4.safetensors")
    assert release.report["epsilon"] == 4.0
    # The demo's own split (same settings and seed): texts no holder held.
    config = demo_config(
        "default",
        out_dir=demo_out / "split",
        clients=3,
        private_per_label=PRIVATE_PER_LABEL,
        synthetic_per_label=SAMPLES_PER_LABEL,
    )
    heldout = split_data(config).test
    model = load_model()
    template = TEMPLATES["rotten_tomatoes"]
    for label in template.labels:
        texts = [r.text for r in heldout if r.label == label][:HELDOUT_PER_LABEL]
        # Moderate steering (0.02 x the residual norm): the likelihood of real text, not the
        # class signal alone, is what this measures.
        deltas = label_deltas(release, label, strength=0.02)
        prompt = template.prefix(label)
        plain = np.array(text_logprobs(model, prompt, texts))
        steered = np.array(text_logprobs(model, prompt, texts, deltas=deltas))
        gain = steered - plain
        p = stats.ttest_1samp(gain, 0.0, alternative="greater").pvalue
        print(f"{label}: held-out log-probability gain {gain.mean():.3f}, p = {p:.2e}")
        assert gain.mean() > 0 and p < ALPHA, (label, gain.mean(), p)


@pytest.mark.usefixtures("demo_threads")
def test_generate_from_saved_release(demo_out: Path, tmp_path: Path) -> None:
    """``fedsynth generate`` from the saved release (in this process: the model is loaded)."""
    from typer.testing import CliRunner

    from fedsynth.simulations.cli import app

    target = tmp_path / "more.jsonl"
    args = ["generate", "--release", str(demo_out / "release-eps4.safetensors")]
    result = CliRunner().invoke(app, [*args, "--n", "4", "--out", str(target), "--seed", "7"])
    assert result.exit_code == 0, result.output[-3000:]
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(rows) == 8 and {r["label"] for r in rows} == {"positive", "negative"}
    # Generation is post-processing: the ledger is not charged again.
    assert len(PrivacyLedger(demo_out / "ledger.sqlite").rows()) == 1


def test_bad_epsilon_is_refused(tmp_path: Path) -> None:
    proc = _cli("demo", "--out", str(tmp_path), "--epsilon", "0", timeout=120)
    assert proc.returncode != 0
    assert "epsilon" in (proc.stdout + proc.stderr)
