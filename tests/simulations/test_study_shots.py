"""A study's ``shots``: the prior and fine-tuned models get the conditioning releases get."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fedsynth.simulations.demo import generation_config
from fedsynth.simulations.methods import prior
from fedsynth.simulations.methods.common import model_samples
from fedsynth.simulations.study import StudyRunner
from fedsynth.simulations.study_config import parse_study
from tests.server.test_shot_generation import RecordingBackend

TEXTS = {"positive": [f"pos prior {i}" for i in range(40)], "negative": ["neg prior"] * 40}


def _runner(
    tmp_path: Path, shots: int, variants: tuple[str, ...] = ()
) -> tuple[StudyRunner, RecordingBackend, Any]:
    raw: dict[str, Any] = {
        "name": "shots",
        "model": "tiny-llama",
        "data": {
            "synthetic_per_label": 3,
            "generation_batch": 8,
            "shots": shots,
            "variants": list(variants),
        },
        "sweep": [{"methods": ["prior", "dp-sgd"], "epsilons": [4]}],
    }
    backend = RecordingBackend()
    backend.tokenizer = SimpleNamespace(encode=lambda text, **_: text.split())  # type: ignore[attr-defined]
    runner = StudyRunner(parse_study(raw), tmp_path, loaded=backend)  # type: ignore[arg-type]
    runner._reference = SimpleNamespace(texts=TEXTS)  # type: ignore[assignment]
    return runner, backend, runner.config.cells()[0]


def _shown(prompt: str) -> str:
    return prompt.split("\n")[1]


def test_without_shots_the_prior_is_a_switched_off_release_too(tmp_path: Path) -> None:
    runner, backend, cell = _runner(tmp_path, shots=0)
    out = prior.run(runner, cell)
    assert [s.label for s in out.samples] == ["positive"] * 3 + ["negative"] * 3
    # Plain prompts, unsteered, at the release cells' sampling seed; no public text reused.
    config = runner.demo_config(cell)
    template = config.template
    prompts = [p for batch, _, _ in backend.calls for p in batch]
    assert set(prompts) == {template.prefix("positive"), template.prefix("negative")}
    assert all(deltas is None for _, deltas, _ in backend.calls)
    assert not {s.text for s in out.samples} & {t for ts in TEXTS.values() for t in ts}
    again = RecordingBackend()
    prior.floor_samples(
        again,
        template,
        n_per_label=3,
        generation=generation_config(config),
        shots=0,
        seed=cell.seed + 101,
    )
    assert again.calls == backend.calls


def test_the_prior_with_shots_draws_its_own_pool_as_a_switched_off_release(
    tmp_path: Path,
) -> None:
    runner, backend, cell = _runner(tmp_path, shots=1)
    out = prior.run(runner, cell)
    assert [s.label for s in out.samples] == ["positive"] * 3 + ["negative"] * 3
    assert all(deltas is None for _, deltas, _ in backend.calls)
    # The release cells' sampling seed (demo.sampling_seed: the cell's seed + 101).
    again = RecordingBackend()
    config = runner.demo_config(cell)
    prior.floor_samples(
        again,
        config.template,
        n_per_label=3,
        generation=generation_config(config),
        shots=1,
        seed=cell.seed + 101,
    )
    assert again.calls == backend.calls
    prompts = [p for batch, _, _ in backend.calls for p in batch]
    template = runner.demo_config(cell).template
    # Each label samples its own pool from the plain prompt first (not the public texts),
    # then every sample sees one of those pool texts, as a release's samples do.
    plain = [p for p in prompts if p in (template.prefix("positive"), template.prefix("negative"))]
    assert len(plain) == 6 and len(prompts) == 12
    public = TEXTS["positive"] + ["neg prior"]
    shot_prompts = [p for p in prompts if p not in plain]
    assert shot_prompts and not any(_shown(p) in public for p in shot_prompts)
    pooled = {s.text for s in out.samples}
    assert all(_shown(p).startswith("sample") and _shown(p) not in pooled for p in shot_prompts)


@pytest.mark.parametrize("shots", [0, 1])
def test_a_fine_tuned_model_samples_with_the_studys_shots(tmp_path: Path, shots: int) -> None:
    runner, _, cell = _runner(tmp_path, shots=shots)
    model = RecordingBackend()
    out = model_samples(runner, cell, model, {})  # type: ignore[arg-type]
    assert [s.label for s in out.samples] == ["positive"] * 3 + ["negative"] * 3
    assert out.perf["generation_seconds"] >= 0
    prompts = [p for batch, _, _ in model.calls for p in batch]
    template = runner.demo_config(cell).template
    if shots == 0:
        assert prompts == [template.prefix(s.label) for s in out.samples]
        return
    # Each label first samples its pool (3 plain prompts: the pool never exceeds the samples),
    # then every sample sees one of those pool texts, none of which is among the samples.
    pools = {
        lb: {f"sample {i}" for i in range(start, start + 3)}
        for lb, start in (("positive", 1), ("negative", 7))
    }
    plain = [p for p in prompts if p in (template.prefix("positive"), template.prefix("negative"))]
    assert len(plain) == 6 and len(prompts) == 12
    for sample in out.samples:
        assert sample.text not in pools[sample.label]
    shot_prompts = [p for p in prompts if p not in plain]
    assert all(_shown(p) in pools["positive"] | pools["negative"] for p in shot_prompts)


def test_the_studys_top_p_reaches_every_generation_and_is_in_its_fingerprint(
    tmp_path: Path,
) -> None:
    from fedsynth.simulations.demo import generation_config

    runner, _, cell = _runner(tmp_path, shots=1)
    assert generation_config(runner.demo_config(cell)).top_p == 0.95  # the default
    raw: dict[str, Any] = {
        "name": "p",
        "model": "tiny-llama",
        "data": {"top_p": 1.0},
        "sweep": [{"methods": ["prior"], "epsilons": [4]}],
    }
    one = StudyRunner(parse_study(raw), tmp_path / "one", loaded=RecordingBackend())  # type: ignore[arg-type]
    assert generation_config(one.demo_config(one.config.cells()[0])).top_p == 1.0
    # A study that leaves top_p at its default keeps its fingerprint (older results open);
    # another top_p is another study.
    default = parse_study({**raw, "data": {}})
    assert default.fingerprint() == parse_study({**raw, "data": {"top_p": 0.95}}).fingerprint()
    assert one.config.fingerprint() != default.fingerprint()


VARIANTS = ("A {label} note:\n", "Some {label} words:\n")


def test_the_prior_and_a_fine_tuned_model_ask_with_the_studys_variants(tmp_path: Path) -> None:
    """A study's ``variants`` reach the prompts of the prior and of the fine-tuned models, as
    they reach the releases' (the demo's ``variants``), drawn per prompt."""
    runner, backend, cell = _runner(tmp_path, shots=0, variants=VARIANTS)
    config = runner.demo_config(cell)
    assert config.variants == VARIANTS
    asked = {v.format(label=lb) for v in VARIANTS for lb in ("positive", "negative")}
    prior.run(runner, cell)
    model = RecordingBackend()
    model_samples(runner, cell, model, {})  # type: ignore[arg-type]
    for recorder in (backend, model):
        prompts = [p for batch, _, _ in recorder.calls for p in batch]
        assert len(prompts) == 6 and set(prompts) <= asked
        assert len(set(prompts)) > 2  # more than one variant per label was drawn


def test_a_study_whose_prompts_outrun_the_context_stops_before_its_first_cell(
    tmp_path: Path,
) -> None:
    """Prompts, shots, variants and lengths are the study's own: checked against the model's
    context once, before the first cell (without the check the tiny model generated past its
    256 positions without an error, so the cells' samples were silently out of range)."""
    from fedsynth.protocol.errors import ConfigError
    from fedsynth.protocol.models import load_model
    from fedsynth.simulations.demo import check_text_length
    from fedsynth.simulations.study import read_results

    raw: dict[str, Any] = {
        "name": "long",
        "model": "tiny-llama",
        "data": {"shots": 5, "max_new_tokens": 40},
        "sweep": [{"methods": ["prior"], "epsilons": [4]}],
    }
    runner = StudyRunner(parse_study(raw), tmp_path, loaded=load_model("tiny-llama"))
    with pytest.raises(ConfigError, match=r"shots=5: .*context of 256 tokens"):
        runner.run()
    assert read_results(tmp_path) == []
    fits = StudyRunner(
        parse_study({**raw, "data": {"shots": 1, "max_new_tokens": 40}}),
        tmp_path / "fits",
        loaded=runner.loaded,
    )
    check_text_length(fits.demo_config(fits.config.cells()[0]), fits.loaded)  # one shot fits
