"""Sampling vocabularies: which tokens are Latin, and sampling that is exact for the vocabulary.

A restricted vocabulary must never let a token outside it be drawn, must draw the tokens in it
with their renormalized top-p probabilities (whether the decoder computed only those logits or
all of them), and must be refused by name before anything loads.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from releases import make_test_release
from typer.testing import CliRunner

from fedsynth.protocol.contribution import DecodedRelease
from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.features import PromptTemplate
from fedsynth.protocol.models import LoadedModel, load_model, tiny_model
from fedsynth.server import generation
from fedsynth.server.coordinator import PublicReference, TaskConfig, build_manifest
from fedsynth.server.generation import GenerationConfig, _SamplingSpace
from fedsynth.server.release import load_release, make_release, save_release
from fedsynth.server.secure_round import RoundResult
from fedsynth.server.vocabulary import (
    latin_text,
    piece_texts,
    release_vocabulary,
    vocabulary_ids,
)


def test_latin_text() -> None:
    for text in (" movie", "café", "“quoted” — yes…", "€5", "Ærø", "\n"):
        assert latin_text(text), text
    for text in ("", " дет", "歆", "्तर", "🙂", "\ufffd"):
        assert not latin_text(text), text


def test_unknown_vocabulary_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"vocabulary='greek'.*full, latin"):
        GenerationConfig(vocabulary="greek")


@pytest.fixture(scope="module", params=["gemma3-270m", "smollm2-135m"])
def packaged(request: pytest.FixtureRequest) -> Iterator[LoadedModel]:
    yield load_model(str(request.param))


def test_latin_tokens_of_the_packaged_tokenizers(packaged: LoadedModel) -> None:
    tok = packaged.tokenizer
    kept = set(vocabulary_ids(tok, vocab_rows=len(tok), name="latin").tolist())  # type: ignore[union-attr]
    texts = piece_texts(tok, len(tok))
    # SentencePiece (Gemma) and byte-level BPE (SmolLM2) both read as the text they stand for.
    for word in (" movie", " review", " café", "."):
        ids = tok.encode(word, add_special_tokens=False)
        assert set(ids) <= kept, (word, ids)
        assert "".join(texts[i] or "" for i in ids) == word
    for foreign in ("фильм", "电影", "फ़िल्म"):
        ids = tok.encode(foreign, add_special_tokens=False)
        assert not set(ids) & kept, (foreign, ids)
    assert tok.eos_token_id in kept
    share = len(kept) / len(tok)
    assert (0.5 < share < 0.7) if packaged.name == "gemma3-270m" else share > 0.9


@torch.inference_mode()
def test_latin_samples_of_the_packaged_models_are_latin(packaged: LoadedModel) -> None:
    config = GenerationConfig(max_new_tokens=24, batch_size=32, vocabulary="latin")
    prompts = ["Here is a negative movie review snippet:\n", "Écris une critique de film:\n"] * 16
    texts = generation.generate_from_prompts(packaged, prompts, config=config, seed=4)
    assert all(text and latin_text(text) for text in texts), texts


@pytest.mark.parametrize("refill", [False, True])
@torch.inference_mode()
def test_only_the_vocabulary_is_sampled_whatever_computes_the_logits(refill: bool) -> None:
    loaded = tiny_model(arch="llama")  # byte tokens: ids of bytes >= 0x80 are not Latin
    prompts = ["ab", "c", "hello", "xy", "zz"] * 3
    latin = GenerationConfig(
        max_new_tokens=10, batch_size=4, stop_at_newline=False, vocabulary="latin"
    )
    ours = generation.generate_from_prompts(loaded, prompts, config=latin, seed=3, refill=refill)
    assert all(text.isascii() for text in ours), ours
    full = generation.generate_from_prompts(
        loaded,
        prompts,
        config=GenerationConfig(max_new_tokens=10, batch_size=4, stop_at_newline=False),
        seed=3,
        refill=refill,
    )
    assert not all(text.isascii() for text in full), "the random model does sample other bytes"
    # Without the blocked head the model's own logits are narrowed: the same samples.
    with mock.patch.object(generation, "output_head", return_value=None):
        narrowed = generation.generate_from_prompts(
            loaded, prompts, config=latin, seed=3, refill=refill
        )
    assert narrowed == ours


def test_sampling_is_the_renormalized_top_p_of_the_vocabulary() -> None:
    vocab = 6
    logits = torch.log(torch.tensor([[0.05, 0.40, 0.10, 0.30, 0.05, 0.10]]))
    kept = torch.tensor([0, 2, 3, 5])  # drops the most likely token (1) and token 4
    space = _SamplingSpace(
        kept=kept,
        control=torch.tensor([], dtype=torch.long),
        stops=torch.tensor([], dtype=torch.long),
    )
    config = GenerationConfig(top_p=0.8)
    generator = torch.Generator().manual_seed(0)
    n = 20_000
    draws: Counter[int] = Counter()
    for _ in range(n // 500):
        full = logits.expand(500, vocab).clone()  # a decoder that computed every row
        got = space.draw(
            full, started=torch.ones(500, dtype=torch.bool), config=config, generator=generator
        )
        draws.update(got.tolist())
    # Within the vocabulary: 0.3/0.55, 0.1/0.55, 0.1/0.55, 0.05/0.55; top-p 0.8 keeps 3, 2, 5
    # (0.545 + 0.182 < 0.8 <= + 0.182), renormalized to 0.6 / 0.2 / 0.2.
    assert set(draws) == {2, 3, 5}
    for token, p in ((3, 0.6), (2, 0.2), (5, 0.2)):
        assert abs(draws[token] / n - p) < 0.015, (token, draws[token] / n)


def test_cli_refuses_an_unknown_vocabulary() -> None:
    from fedsynth.simulations.cli import app

    result = CliRunner().invoke(app, ["demo", "--quick", "--vocabulary", "klingon"])
    assert result.exit_code != 0
    assert "klingon" in result.output and "latin" in result.output


def test_synthesis_serve_refuses_an_unknown_vocabulary_before_loading(tmp_path: Path) -> None:
    from fedsynth.server.synthesis_client import synthesis_app

    serve = ["serve", "--releases", str(tmp_path), "--model", "no-such-model"]
    serve += ["--token-file", str(tmp_path / "t"), "--vocabulary", "klingon"]
    result = CliRunner().invoke(synthesis_app, serve)
    assert result.exit_code == 2
    assert "klingon" in result.output and "latin" in result.output
    assert "no-such-model" not in result.output  # refused before any model was looked up


def test_synthesis_serve_generates_from_the_vocabulary_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsynth.server import synthesis_service
    from fedsynth.server.synthesis_client import synthesis_app

    seen: list[tuple[GenerationConfig, str]] = []

    def fake_serve(**kwargs: object) -> None:
        seen.append((kwargs["generation"], kwargs["vocabulary"]))  # type: ignore[arg-type]
        raise ConfigError("stopped before serving")

    monkeypatch.setattr(synthesis_service, "serve", fake_serve)
    serve = ["serve", "--releases", str(tmp_path), "--model", "tiny-llama"]
    serve += ["--token-file", str(tmp_path / "t"), "--insecure"]
    for asked in ([], ["--vocabulary", "latin"]):
        result = CliRunner().invoke(synthesis_app, serve + asked)
        assert result.exit_code == 2 and "stopped before serving" in result.output
    assert [vocabulary for _, vocabulary in seen] == ["release", "latin"]
    assert seen[1][0].batch_size == synthesis_service.DEFAULT_BATCH_SIZE


def test_release_vocabulary_follows_the_prior_and_warns_on_another() -> None:
    assert release_vocabulary("release", "latin") == ("latin", None)
    assert release_vocabulary("release", None) == ("full", None)  # recorded nothing: full
    assert release_vocabulary("latin", "latin") == ("latin", None)
    name, caution = release_vocabulary("full", "latin")
    assert name == "full" and caution is not None
    assert "vocabulary='latin'" in caution and "--vocabulary release" in caution
    name, caution = release_vocabulary("latin", None)
    assert name == "latin" and caution is not None and "vocabulary='full'" in caution
    with pytest.raises(ConfigError, match=r"'cuneiform'.*full, latin"):
        release_vocabulary("release", "cuneiform")
    assert release_vocabulary("full", "cuneiform")[0] == "full"  # named: used, with a caution
    with pytest.raises(ConfigError, match="klingon"):
        release_vocabulary("klingon", "latin")


def test_the_manifest_records_how_the_prior_was_sampled(tmp_path: Path) -> None:
    tiny = tiny_model(seed=0, arch="llama")
    template = PromptTemplate(
        instruction="A {label} review: ", label_names=(("pos", "positive"), ("neg", "negative"))
    )
    reference = PublicReference(
        texts={},
        means=np.zeros((2, 1, tiny.hidden_size), dtype=np.float32),
        clip_norms=(1.0,),
        residual_norms=(1.0,),
    )
    prior = GenerationConfig(vocabulary="latin", top_p=0.9, max_new_tokens=40)
    config = TaskConfig(template=template, layers=(1,), prior_per_label=2, prior_generation=prior)
    manifest = build_manifest(config, tiny, reference, (1, 2, 3))
    assert manifest.extra["prior_vocabulary"] == "latin"
    assert manifest.extra["prior_top_p"] == "0.9"
    assert manifest.extra["prior_max_new_tokens"] == "40"
    release = make_release(
        manifest,
        DecodedRelease(
            vectors=np.ones((2, 1, tiny.hidden_size), dtype=np.float32),
            counts=np.array([5.0, 6.0]),
        ),
        RoundResult(
            field_sum=np.zeros(manifest.dim, dtype=np.uint64), survivors=[1, 2, 3], dropped=[]
        ),
        model_name=tiny.name,
    )
    loaded = load_release(save_release(release, tmp_path / "r.safetensors"))
    assert loaded.prior_vocabulary == "latin"
    plain = dataclasses.replace(config, prior_generation=GenerationConfig())
    assert build_manifest(plain, tiny, reference, (1, 2, 3)).extra["prior_vocabulary"] == "full"


def test_generate_samples_from_the_release_prior_vocabulary_by_default(tmp_path: Path) -> None:
    from fedsynth.simulations.cli import app

    llama = load_model("tiny-llama")
    release = make_test_release(llama)
    latin = dataclasses.replace(
        release, manifest=dataclasses.replace(release.manifest, extra={"prior_vocabulary": "latin"})
    )
    path = save_release(latin, tmp_path / "r.safetensors")

    def run(*extra: str) -> tuple[str, str]:
        out = tmp_path / f"out{len(extra)}.jsonl"
        args = ["generate", "--release", str(path), "--out", str(out), "--n", "2"]
        result = CliRunner().invoke(app, [*args, "--max-new-tokens", "4", *extra])
        output = " ".join(result.output.split())
        assert result.exit_code == 0, output
        report = json.loads(out.with_name(out.name + ".report.json").read_text())
        return report["generation"]["vocabulary"], output

    vocabulary, output = run()
    assert vocabulary == "latin" and "slightly off" not in output
    vocabulary, output = run("--vocabulary", "full")
    assert vocabulary == "full"
    assert "warning: vocabulary='full', but this release's class vectors" in output
