"""Shot-conditioned generation: each sample sees same-label samples drawn from a pool."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
import torch

from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.features import PromptTemplate
from fedsynth.protocol.models import LoadedModel, tiny_model
from fedsynth.server.backends import TransformersBackend
from fedsynth.server.generation import GenerationConfig
from fedsynth.server.synthesize import (
    REFILL_BATCHES,
    check_shots,
    floor_samples,
    generate_from_release,
    iter_label_texts,
    iter_labelled_texts,
    iter_release_samples,
    shot_prompt,
    variant_templates,
)
from tests.server.releases import make_test_release

TEMPLATE = PromptTemplate(
    instruction="A {label} text:\n",
    label_names=(("pos", "happy"), ("neg", "sad")),
    shots=(("neg", "fixed public shot"),),
)


class RecordingBackend:
    """Answers every prompt with a numbered text and records what it was asked."""

    def __init__(self, empty_every: int = 0) -> None:
        self.calls: list[tuple[list[str], Mapping[int, torch.Tensor] | None, int]] = []
        self.made = 0
        self.empty_every = empty_every

    def generate(
        self,
        prompts: Sequence[str],
        *,
        config: GenerationConfig,
        deltas: Mapping[int, torch.Tensor] | None,
        seed: int,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[str]:
        assert len(prompts) <= config.batch_size
        self.calls.append((list(prompts), deltas, seed))
        out = []
        for _ in prompts:
            self.made += 1
            empty = self.empty_every and self.made % self.empty_every == 0
            out.append("" if empty else f"sample {self.made}")
        return out


def _texts(backend: Any, **kwargs: Any) -> list[str]:
    settings: dict[str, Any] = {
        "n": 5,
        "deltas": None,
        "config": GenerationConfig(batch_size=2),
        "seed": 100,
    }
    settings.update(kwargs)
    return list(iter_label_texts(backend, TEMPLATE, "pos", **settings))


def test_shot_prompt_follows_the_templates_own_shots() -> None:
    assert shot_prompt(TEMPLATE, "pos", []) == TEMPLATE.prefix("pos")
    prompt = shot_prompt(TEMPLATE, "pos", ["first", " second \n"])
    assert prompt == (
        "A sad text:\nfixed public shot\n\n"
        "A happy text:\nfirst\n\n"
        "A happy text:\nsecond\n\n"
        "A happy text:\n"
    )


def test_plain_prompt_batches_and_seeds_without_shots() -> None:
    backend = RecordingBackend()
    texts = _texts(backend)
    assert texts == [f"sample {i}" for i in range(1, 6)]
    assert [seed for _, _, seed in backend.calls] == [100, 101, 102]
    assert [len(p) for p, _, _ in backend.calls] == [2, 2, 1]
    assert all(p == TEMPLATE.prefix("pos") for prompts, _, _ in backend.calls for p in prompts)


def test_shots_come_from_a_steered_pool_that_is_not_yielded() -> None:
    backend = RecordingBackend()
    delta = {1: torch.ones(3)}
    done: list[int] = []
    texts = _texts(backend, shots=2, pool_size=3, deltas=delta, progress=done.append)
    pool_calls, sample_calls = backend.calls[:2], backend.calls[2:]
    # The pool: 3 plain-prompt texts, steered like the samples, on seeds no sample batch uses.
    assert [len(p) for p, _, _ in pool_calls] == [2, 1]
    assert all(p == TEMPLATE.prefix("pos") for prompts, _, _ in pool_calls for p in prompts)
    assert all(d is delta for _, d, _ in backend.calls)
    pool_seeds = {seed for _, _, seed in pool_calls}
    assert [seed for _, _, seed in sample_calls] == [100, 101, 102]
    assert not pool_seeds & {100, 101, 102}
    pool = {"sample 1", "sample 2", "sample 3"}
    assert texts == [f"sample {i}" for i in range(4, 9)] and not pool & set(texts)
    assert done == [2, 4, 5]
    for prompts, _, _ in sample_calls:
        for prompt in prompts:
            assert prompt.startswith("A sad text:\nfixed public shot\n\n")
            assert prompt.endswith("\n\n" + TEMPLATE.prefix("pos").split("\n\n")[-1])
            shown = [line for line in prompt.split("\n") if line.startswith("sample")]
            assert len(shown) == 2 and len(set(shown)) == 2 and set(shown) <= pool
    # Deterministic for a seed, and another seed draws other shots.
    assert RecordingBackend().calls == []
    again = RecordingBackend()
    _texts(again, shots=2, pool_size=3, deltas=delta)
    assert again.calls == backend.calls
    other = RecordingBackend()
    _texts(other, shots=2, pool_size=3, deltas=delta, seed=7, n=40)
    firsts = {prompts[0] for prompts, _, _ in other.calls[2:]}
    assert len(firsts) > 1
    # The pool is never larger than the samples asked for.
    small = RecordingBackend()
    assert len(_texts(small, shots=1, pool_size=64, n=3)) == 3
    assert [len(p) for p, _, _ in small.calls] == [2, 1, 2, 1]


VARIANTS = ("A {label} text on topic one:\n", "A {label} text on topic two:\n")


def test_each_prompt_draws_one_instruction_variant() -> None:
    backend = RecordingBackend()
    _texts(backend, variants=VARIANTS, n=40)
    prompts = [p for prompts, _, _ in backend.calls for p in prompts]
    # Every prompt keeps the template's public shot and asks with one of the variants.
    assert set(prompts) == {
        "A sad text on topic one:\nfixed public shot\n\nA happy text on topic one:\n",
        "A sad text on topic two:\nfixed public shot\n\nA happy text on topic two:\n",
    }
    assert 10 <= sum(p.endswith("topic one:\n") for p in prompts) <= 30
    # The draw is the seed's, the batches' seeds are unchanged, and another seed draws others.
    again = RecordingBackend()
    _texts(again, variants=VARIANTS, n=40)
    assert again.calls == backend.calls
    assert [seed for _, _, seed in backend.calls] == list(range(100, 120))
    other = RecordingBackend()
    _texts(other, variants=VARIANTS, n=40, seed=7)
    assert [p for ps, _, _ in other.calls for p in ps] != prompts


def test_variants_reach_the_shot_pool_and_the_shot_prompts() -> None:
    backend = RecordingBackend()
    _texts(backend, variants=VARIANTS, shots=1, pool_size=8, n=30)
    pool_prompts = [p for prompts, _, _ in backend.calls[:4] for p in prompts]
    assert {p.split("\n\n")[-1] for p in pool_prompts} == {
        "A happy text on topic one:\n",
        "A happy text on topic two:\n",
    }
    sample_prompts = [p for prompts, _, _ in backend.calls[4:] for p in prompts]
    for prompt in sample_prompts:
        shot, asked = prompt.split("\n\n")[-2:]
        # The shot is shown under the same variant the sample is asked with.
        assert shot.split("\n")[0] == asked.removesuffix("\n")
        assert shot.split("\n")[1].startswith("sample ")
    assert {p.split("\n\n")[-1] for p in sample_prompts} == {
        "A happy text on topic one:\n",
        "A happy text on topic two:\n",
    }


def test_no_variants_leave_the_template_and_its_draws() -> None:
    assert variant_templates(TEMPLATE, ()) == [TEMPLATE]
    plain, varied = RecordingBackend(), RecordingBackend()
    _texts(plain, shots=1, pool_size=4, n=12)
    _texts(varied, shots=1, pool_size=4, n=12, variants=(TEMPLATE.instruction,))
    assert varied.calls == plain.calls


@pytest.mark.parametrize(
    ("variant", "match"),
    [
        ("A text without a slot:\n", "lacks a {label} slot"),
        ("A {label} text about {topic}:\n", "variant='A {label} text about {topic}:\\\\n'"),
        ("A {label} text {0}:\n", "its only slot must be {label}"),
    ],
)
def test_a_variant_with_a_bad_slot_is_refused_before_generating(
    llama: LoadedModel, variant: str, match: str
) -> None:
    release = make_test_release(llama)
    asked: list[Sequence[str]] = []

    class Watched(TransformersBackend):
        def generate(self, prompts: Sequence[str], **kwargs: Any) -> list[str]:
            asked.append(prompts)
            return super().generate(prompts, **kwargs)

    backend = Watched(llama)
    config = GenerationConfig(max_new_tokens=4, batch_size=4)
    with pytest.raises(ConfigError, match=match):
        next(
            iter_release_samples(
                backend,
                release,
                n_per_label=3,
                strength=0.1,
                config=config,
                seed=0,
                variants=("A {label} text:\n", variant),
            )
        )
    assert asked == []


def test_pool_generation_reports_its_progress_over_all_labels() -> None:
    one: list[tuple[int, int]] = []
    _texts(RecordingBackend(), shots=1, pool_size=3, pool_progress=lambda *a: one.append(a))
    assert one == [(2, 3), (3, 3)]
    both: list[tuple[int, int]] = []
    samples: list[tuple[int, int]] = []
    pairs = list(
        iter_labelled_texts(
            RecordingBackend(),
            TEMPLATE,
            ["pos", "neg"],
            n_per_label=3,
            deltas_of=lambda _label: None,
            config=GenerationConfig(batch_size=2),
            seed=1,
            shots=1,
            progress=lambda *a: samples.append(a),
            pool_progress=lambda *a: both.append(a),
        )
    )
    assert len(pairs) == 6 and samples[-1] == (6, 6)  # sample progress counts samples only
    assert both == [(2, 6), (3, 6), (5, 6), (6, 6)]
    given: list[tuple[int, int]] = []
    _texts(RecordingBackend(), shots=1, pool=["a"], pool_progress=lambda *a: given.append(a))
    plain: list[tuple[int, int]] = []
    _texts(RecordingBackend(), shots=0, pool_progress=lambda *a: plain.append(a))
    assert given == [] and plain == []  # no pool generated, nothing to report


def test_a_given_pool_is_used_without_generating_one() -> None:
    backend = RecordingBackend()
    texts = _texts(backend, shots=1, pool=["", "public one", "  "])
    assert len(texts) == 5 and len(backend.calls) == 3  # no pool batches
    for prompts, _, _ in backend.calls:
        # Blank pool texts are never shown; one text left is shown to every sample.
        assert all("\npublic one\n\n" in p for p in prompts)
    # More shots than texts: drawn with replacement.
    few = RecordingBackend()
    _texts(few, shots=3, pool=["only"])
    assert all(p.count("\nonly\n\n") == 3 for prompts, _, _ in few.calls for p in prompts)
    # A pool without any text leaves the plain prompt.
    blank = RecordingBackend()
    _texts(blank, shots=2, pool=["", " "])
    assert all(p == TEMPLATE.prefix("pos") for prompts, _, _ in blank.calls for p in prompts)
    # Empty samples in a generated pool are skipped too.
    holes = RecordingBackend(empty_every=2)
    _texts(holes, shots=1, pool_size=4)
    shown = {
        line
        for prompts, _, _ in holes.calls[2:]
        for p in prompts
        for line in p.split("\n")
        if line.startswith("sample")
    }
    assert shown and shown <= {"sample 1", "sample 3"}


@pytest.mark.parametrize(
    ("shots", "pool", "match"),
    [(-1, 64, "shots=-1"), (True, 64, "shots=True"), (1.5, 64, "shots=1.5"), (1, 0, "pool=0")],
)
def test_bad_shot_settings_are_refused(shots: Any, pool: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_shots(shots, pool)
    backend = RecordingBackend()
    with pytest.raises(ConfigError, match=match):
        _texts(backend, shots=shots, pool_size=pool)
    assert backend.calls == []


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    return tiny_model(seed=0)


def test_release_samples_with_shots_on_a_real_model(llama: LoadedModel) -> None:
    release = make_test_release(llama)
    config = GenerationConfig(max_new_tokens=4, batch_size=4)
    kwargs: dict[str, Any] = {"n_per_label": 3, "strength": 0.2, "config": config, "seed": 3}
    plain = generate_from_release(llama, release, **kwargs)
    shot = generate_from_release(llama, release, shots=1, shot_pool=4, **kwargs)
    assert [s.label for s in shot] == [s.label for s in plain]
    assert [s.text for s in shot] != [s.text for s in plain]
    again = generate_from_release(llama, release, shots=1, shot_pool=4, **kwargs)
    assert [s.text for s in again] == [s.text for s in shot]
    with pytest.raises(ConfigError, match="shots=-2"):
        generate_from_release(llama, release, shots=-2, **kwargs)


@pytest.mark.parametrize("shots", [0, 1])
def test_the_demo_prior_is_a_switched_off_release(tmp_path: Any, shots: int) -> None:
    """The demo's prior is the study's floor at the releases' sampling seed: unsteered, its
    shots from its own plain-prompt pool, never the public prior texts (another draw)."""
    from fedsynth.simulations.demo import (
        DemoConfig,
        generation_config,
        prior_samples,
        sampling_seed,
    )

    config = DemoConfig(out_dir=tmp_path, synthetic_per_label=3, shots=shots, seed=4)
    backend = RecordingBackend()
    ticks: list[tuple[int, int]] = []
    pool_ticks: list[tuple[int, int]] = []
    samples = prior_samples(
        config,
        backend,  # type: ignore[arg-type]
        progress=lambda *a: ticks.append(a),
        pool_progress=lambda *a: pool_ticks.append(a),
    )
    assert len(samples) == 6 and all(s.release_id == "prior" for s in samples)
    assert [s.label for s in samples] == ["positive"] * 3 + ["negative"] * 3
    assert ticks[-1] == (6, 6) and [done for done, _ in ticks] == sorted(done for done, _ in ticks)
    assert all(deltas is None for _, deltas, _ in backend.calls)
    again = RecordingBackend()
    floor_samples(
        again,  # type: ignore[arg-type]
        config.template,
        n_per_label=3,
        generation=generation_config(config),
        shots=shots,
        seed=sampling_seed(4),
    )
    assert again.calls == backend.calls
    prompts = [p for batch, _, _ in backend.calls for p in batch]
    plain = {config.template.prefix("positive"), config.template.prefix("negative")}
    if shots == 0:
        assert set(prompts) == plain and not pool_ticks
    else:
        # Each label first samples its pool of 3 from the plain prompt, then shows one of them.
        assert sum(p in plain for p in prompts) == 6 and len(prompts) == 12
        assert pool_ticks[-1] == (6, 6)
        pooled = {s.text for s in samples} | {f"sample {i}" for i in range(1, 13)}
        for prompt in prompts:
            if prompt not in plain:
                assert prompt.split("\n")[1] in pooled


class RefillingRecorder(RecordingBackend):
    """A backend that keeps its batch full: it takes several batches' prompts per call."""

    refills_batch = True

    def generate(self, prompts: Sequence[str], **kwargs: Any) -> list[str]:
        config = kwargs["config"]
        assert len(prompts) <= config.batch_size * REFILL_BATCHES
        return super().generate(
            prompts, **{**kwargs, "config": dataclasses.replace(config, batch_size=len(prompts))}
        )


def test_a_refilling_backend_gets_several_batches_per_call() -> None:
    backend = RefillingRecorder()
    texts = _texts(backend, n=2 * REFILL_BATCHES + 3)
    assert len(texts) == 2 * REFILL_BATCHES + 3
    assert [len(p) for p, _, _ in backend.calls] == [2 * REFILL_BATCHES, 3]
    assert [seed for _, _, seed in backend.calls] == [100, 101]
    plain = RecordingBackend()
    _texts(plain, n=2 * REFILL_BATCHES + 3)
    assert all(len(p) <= 2 for p, _, _ in plain.calls)


def test_the_study_floor_is_a_release_switched_off(llama: LoadedModel) -> None:
    """The study's prior cell draws exactly what a release at strength 0 draws (same seeds,
    same own shot pools), so a release's gain over the floor is not a different pool's draw."""
    release = make_test_release(llama)
    config = GenerationConfig(max_new_tokens=4, batch_size=4)
    for shots in (0, 1):
        off = generate_from_release(
            llama, release, n_per_label=3, strength=0.0, config=config, seed=104, shots=shots
        )
        floor = floor_samples(
            llama,
            release.manifest.template,
            n_per_label=3,
            generation=config,
            shots=shots,
            seed=104,
        )
        assert [(s.label, s.text) for s in floor] == [(s.label, s.text) for s in off]
        steered = generate_from_release(
            llama, release, n_per_label=3, strength=0.5, config=config, seed=104, shots=shots
        )
        assert [s.text for s in steered] != [s.text for s in floor]  # the comparison can fail
