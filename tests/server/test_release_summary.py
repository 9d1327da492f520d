"""``fedsynth inspect``: what a release states, read from the verified file, without a model."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from releases import make_test_release
from typer.testing import CliRunner

from fedsynth.protocol.errors import NonPositiveCountError
from fedsynth.protocol.models import LoadedModel, tiny_model
from fedsynth.server.coordinator import prior_record
from fedsynth.server.generation import GenerationConfig
from fedsynth.server.release import save_release
from fedsynth.server.release_summary import release_summary, summary_lines
from fedsynth.server.snr import class_parts, steering_snr
from fedsynth.simulations.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    return tiny_model(seed=0, arch="llama")


def _said(result: object) -> str:
    return " ".join(str(result.output).split())  # type: ignore[attr-defined]


def test_the_summary_states_the_files_own_terms(llama: LoadedModel) -> None:
    release = make_test_release(llama)
    summary = release_summary(release, strength=0.05, contrast=2.0)
    assert summary["release_id"] == "release-1"
    assert summary["model"]["fingerprint"] == llama.fingerprint
    assert summary["model"]["layers"] == [1, 2]
    assert summary["classes"] == {"pos": 12.5, "neg": 7.25, "mix": 1.0}
    privacy = summary["privacy"]
    assert (privacy["epsilon"], privacy["delta"]) == (2.0, 1e-5)
    assert privacy["trust_mode"] == "distributed"
    assert (privacy["K"], privacy["survivors"], privacy["threshold_t"]) == (4, 3, 2)
    assert privacy["noise_variance_target_scaled"] == 400.0
    # The steering figures are the SNR rule's at the strength and contrast asked for.
    expected = steering_snr(release, contrast=2.0).to_dict(strength=0.05)
    assert summary["steering"] == expected
    assert summary["report"] == release.report
    assert summary["class_parts"] == {
        part.label: {"share": part.share, "snr": part.snr} for part in class_parts(release)
    }
    json.dumps(summary)  # JSON-ready


def test_an_unrecorded_prior_is_said_to_be_the_full_vocabulary(llama: LoadedModel) -> None:
    release = make_test_release(llama)
    assert release_summary(release, strength=0.03)["prior"]["prior_vocabulary"] == (
        "full (not recorded)"
    )
    recorded = prior_record(GenerationConfig(vocabulary="latin", top_p=0.9, max_new_tokens=20))
    manifest = dataclasses.replace(release.manifest, extra=recorded)
    prior = release_summary(dataclasses.replace(release, manifest=manifest), strength=0.03)
    assert prior["prior"] == {
        "prior_vocabulary": "latin",
        "prior_top_p": "0.9",
        "prior_temperature": "1.0",
        "prior_max_new_tokens": "20",
    }


def test_lines_name_guarantee_holders_and_steering(llama: LoadedModel) -> None:
    lines = summary_lines(release_summary(make_test_release(llama), strength=0.03))
    text = "\n".join(lines)
    assert "(2, 1e-05)-DP" in text
    assert "holders 4, survivors 3, threshold 2, dropped 1" in text
    assert "pos 12.5, neg 7.2, mix 1.0" in text
    for label in ("pos", "neg", "mix"):
        assert f"  {label}: count" in text
    assert "class parts (class vector - mean of the classes; what --contrast scales): pos " in text
    open_release = make_test_release(llama, epsilon=math.inf)
    text = "\n".join(summary_lines(release_summary(open_release, strength=0.03)))
    assert "guarantee: none (epsilon = inf" in text and "-DP" not in text


def test_a_non_positive_count_leaves_the_steering_unavailable(
    tmp_path: Path, llama: LoadedModel
) -> None:
    release = make_test_release(llama)
    broken = dataclasses.replace(release, counts=np.array([12.5, -1.0, 3.0]))
    with pytest.raises(NonPositiveCountError, match="'neg'"):
        steering_snr(broken)
    summary = release_summary(broken, strength=0.03)
    assert "class 'neg' is -1" in summary["steering"]["unavailable"]
    assert "class 'neg' is -1" in summary["class_parts"]["unavailable"]
    assert summary["privacy"]["epsilon"] == 2.0  # the rest is still what the file states
    text = "\n".join(summary_lines(summary))
    assert "steering: unavailable:" in text and "class parts" not in text
    path = save_release(broken, tmp_path / "broken.safetensors")
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "steering: unavailable:" in _said(result) and "(2, 1e-05)-DP" in _said(result)


def test_inspect_prints_the_summary_or_json(tmp_path: Path, llama: LoadedModel) -> None:
    path = save_release(make_test_release(llama), tmp_path / "r.safetensors")
    plain = runner.invoke(app, ["inspect", str(path)])
    assert plain.exit_code == 0, plain.output
    said = _said(plain)
    assert "release release-1 (task release-1): digest verified" in said
    assert "steering strength 0.03" in said
    as_json = runner.invoke(app, ["inspect", "--json", "--strength", "0.1", str(path)])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    assert data["steering"]["strength"] == 0.1
    assert data["report"]["task_id"] == "release-1"
    bad = runner.invoke(app, ["inspect", "--contrast", "nan", str(path)])
    assert bad.exit_code == 2 and "contrast=nan" in _said(bad)
