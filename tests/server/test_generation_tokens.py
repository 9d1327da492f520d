"""Generation never samples control tokens and never stops before visible text.

A scripted sampler stands in for top-p sampling: at every step it takes the first token of a
preference list whose logit generation left finite. The preferences put what a sample must not
be (an early stop, a pad or BOS token, whitespace) ahead of a letter, so each rule shows up as
a different output when it is missing.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fedsynth.protocol.models import CharTokenizer, LoadedModel, tiny_model
from fedsynth.server import generation
from fedsynth.server.generation import GenerationConfig, generate_texts

TOK = CharTokenizer()
NEWLINE = TOK.encode("\n", add_special_tokens=False)[0]
SPACE = TOK.encode(" ", add_special_tokens=False)[0]
LETTER = TOK.encode("a", add_special_tokens=False)[0]
PAD, BOS, EOS = TOK.pad_token_id, TOK.bos_token_id, TOK.eos_token_id


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    return tiny_model(seed=0, arch="llama")


def _scripted(script: Callable[[int], list[int]]) -> Callable[..., torch.Tensor]:
    """A sampler taking, per row, the first allowed id of ``script(step)``."""
    calls = {"step": 0}

    def sample(logits: torch.Tensor, **_: object) -> torch.Tensor:
        prefs = script(calls["step"])
        calls["step"] += 1
        picked = []
        for row in logits:
            allowed = [t for t in prefs if torch.isfinite(row[t])]
            assert allowed, "the script ran out of allowed tokens"
            picked.append(allowed[0])
        return torch.tensor(picked, dtype=torch.long)

    return sample


def _generate(llama: LoadedModel, monkeypatch: pytest.MonkeyPatch, script: Callable) -> list[str]:
    monkeypatch.setattr(generation, "sample_top_p", _scripted(script))
    config = GenerationConfig(max_new_tokens=6, batch_size=3)
    return generate_texts(llama, "Say: ", 3, config=config, seed=0)


def test_pad_bos_and_markup_are_never_sampled(
    llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Wanting a stop first, then pad/BOS: without the control-token ban a row emits PAD, then
    # stops on the newline, and the sample is empty.
    texts = _generate(llama, monkeypatch, lambda step: [NEWLINE, EOS, PAD, BOS, LETTER])
    assert texts == ["a"] * 3


def test_no_stop_before_visible_text(llama: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    # Step 0: a space (whitespace only); afterwards the model would stop at once. Stopping
    # after the space alone would give an empty sample once stripped.
    def script(step: int) -> list[int]:
        return [NEWLINE, EOS, SPACE, LETTER] if step == 0 else [NEWLINE, EOS, LETTER]

    texts = _generate(llama, monkeypatch, script)
    assert texts == ["a"] * 3


def test_a_stop_after_visible_text_still_ends_the_sample(
    llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    def script(step: int) -> list[int]:
        return [LETTER] if step == 0 else [NEWLINE, LETTER]

    assert _generate(llama, monkeypatch, script) == ["a"] * 3


def test_without_eos_stops_every_row_decodes_the_whole_budget(
    llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The model wants to end after one letter; with stop_at_eos off EOS is never sampled, so
    # each row runs to max_new_tokens (equal work for throughput comparisons).
    def script(step: int) -> list[int]:
        return [LETTER] if step == 0 else [EOS, LETTER]

    counted: list[int] = []
    for stop_at_eos, expected in ((True, "a"), (False, "a" * 6)):
        monkeypatch.setattr(generation, "sample_top_p", _scripted(script))
        config = GenerationConfig(max_new_tokens=6, batch_size=3, stop_at_eos=stop_at_eos)
        texts = generate_texts(
            llama, "Say: ", 3, config=config, seed=0, progress=lambda _n, t: counted.append(t)
        )
        assert texts == [expected] * 3
    assert counted[-1] == 18  # 3 rows x 6 tokens


def test_token_classes_of_the_char_tokenizer() -> None:
    classes = generation._token_classes(TOK, vocab_size=TOK.vocab_size + 5, stops={NEWLINE, EOS})
    control = set(classes.control.tolist())
    assert {PAD, BOS} <= control
    assert EOS not in control and NEWLINE not in control  # stops stay sampleable
    # Head rows beyond the tokenizer would decode to nothing: never sampled.
    assert set(range(TOK.vocab_size, TOK.vocab_size + 5)) <= control
    assert bool(classes.visible[LETTER]) and not bool(classes.visible[SPACE])
    assert not bool(classes.visible[PAD]) and not bool(classes.visible[NEWLINE])


def test_a_dynamically_quantized_model_generates(llama: LoadedModel) -> None:
    """torch.ao's int8 head exposes its weight through a method (quantized_generation.py)."""
    import copy
    import dataclasses
    import warnings

    from torch.ao.quantization import quantize_dynamic

    model = copy.deepcopy(llama.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(model, {torch.nn.Linear}, inplace=True)
    quantized = dataclasses.replace(llama, model=model)
    assert generation._vocab_rows(quantized) == generation._vocab_rows(llama)
    config = GenerationConfig(max_new_tokens=4, batch_size=2)
    texts = generate_texts(quantized, "Say: ", 2, config=config, seed=0)
    assert len(texts) == 2
