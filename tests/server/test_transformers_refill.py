"""The `transformers` decoder keeps its batch full: joined KV caches give a fresh batch's logits."""

from __future__ import annotations

import pytest
import torch

from fedsynth.protocol.models import LoadedModel, tiny_model
from fedsynth.server.generation import (
    GenerationConfig,
    RefillingDecoder,
    _FixedBatchDecoder,
    _TransformersDecoder,
    generate_from_prompts,
    steering,
)

PROMPTS = [[1, 5, 9, 12], [3, 4], [7, 8, 9, 10, 11, 12, 13], [2, 6, 2]]
NEW = [[14, 15, 16, 17, 18, 19, 20, 21, 22], [23]]


def _tiny_gemma3(window: int) -> LoadedModel:
    """A tiny random Gemma 3: sliding-window layers of ``window`` and a global one."""
    return tiny_model(arch="gemma3", sliding_window=window)


MODELS = {
    "llama": lambda: tiny_model(arch="llama"),
    "gpt2": lambda: tiny_model(arch="gpt2"),
    "gemma3": lambda: _tiny_gemma3(64),
}


def _fresh(loaded: LoadedModel, rows: list[list[int]]) -> torch.Tensor:
    """Next-token logits of each whole row in a new batch."""
    return _TransformersDecoder(loaded).prefill(rows)


@pytest.mark.parametrize("arch", sorted(MODELS))
@torch.inference_mode()
def test_admitted_and_live_rows_get_a_fresh_batchs_logits(arch: str) -> None:
    loaded = MODELS[arch]()
    decoder = _TransformersDecoder(loaded)
    assert isinstance(decoder, RefillingDecoder)
    rows = [list(p) for p in PROMPTS]
    decoder.prefill(rows)
    for token in (30, 31):  # two steps for every row
        decoder.step(torch.full((len(rows),), token))
        rows = [[*r, token] for r in rows]
    # Rows 1 and 3 end; 0 and 2 live on (swapped), two prompts of other lengths join.
    keep = torch.tensor([2, 0])
    decoder.keep(keep)
    rows = [rows[2], rows[0]]
    logits = decoder.step_admit(torch.tensor([40, 41]), [list(p) for p in NEW])
    rows = [rows[0] + [40], rows[1] + [41]] + [list(p) for p in NEW]
    torch.testing.assert_close(logits, _fresh(loaded, rows), atol=1e-4, rtol=1e-4)
    # The joined cache keeps working: one more step, then every row but the short new one ends.
    logits = decoder.step(torch.tensor([50, 51, 52, 53]))
    rows = [[*r, t] for r, t in zip(rows, (50, 51, 52, 53), strict=True)]
    torch.testing.assert_close(logits, _fresh(loaded, rows), atol=1e-4, rtol=1e-4)
    decoder.keep(torch.tensor([3]))
    logits = decoder.step_admit(torch.tensor([60]), [[24, 25]])
    rows = [rows[3] + [60], [24, 25]]
    torch.testing.assert_close(logits, _fresh(loaded, rows), atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_trimmed_cache_is_as_wide_as_the_longest_live_row() -> None:
    loaded = tiny_model()
    decoder = _TransformersDecoder(loaded)
    decoder.prefill([list(p) for p in PROMPTS])  # widest: 7
    decoder.keep(torch.tensor([1]))  # a 2-token row alone: keep leaves the cache as it is
    assert decoder._mask.shape[1] == 7
    decoder.step_admit(torch.tensor([30]), [[1, 2, 3, 4, 5]])
    assert decoder._mask.shape[1] == 5
    assert decoder._mask.sum(dim=1).tolist() == [3, 5]


@torch.inference_mode()
def test_all_rows_ended_admits_a_new_batch() -> None:
    loaded = tiny_model()
    decoder = _TransformersDecoder(loaded)
    decoder.prefill([list(p) for p in PROMPTS])
    decoder.keep(torch.tensor([], dtype=torch.long))
    logits = decoder.step_admit(torch.tensor([], dtype=torch.long), [list(p) for p in NEW])
    torch.testing.assert_close(logits, _fresh(loaded, [list(p) for p in NEW]))


@torch.inference_mode()
def test_steered_refill_matches_a_fresh_steered_batch() -> None:
    loaded = tiny_model()
    deltas = {1: torch.randn(32, generator=torch.Generator().manual_seed(3))}
    with steering(loaded.model, deltas):
        decoder = _TransformersDecoder(loaded)
        decoder.prefill([list(p) for p in PROMPTS[:2]])
        decoder.keep(torch.tensor([0]))
        logits = decoder.step_admit(torch.tensor([30]), [list(NEW[0])])
        fresh = _fresh(loaded, [PROMPTS[0] + [30], list(NEW[0])])
    torch.testing.assert_close(logits, fresh, atol=1e-4, rtol=1e-4)


def test_refills_only_where_the_sliding_window_holds_every_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedsynth.server import generation

    used: list[int] = []
    real = generation._sample_refilling

    def spy(decoder: RefillingDecoder, prompts: list[list[int]], *args, **kwargs):  # type: ignore[no-untyped-def]
        used.append(len(prompts))
        return real(decoder, prompts, *args, **kwargs)

    monkeypatch.setattr(generation, "_sample_refilling", spy)
    config = GenerationConfig(max_new_tokens=6, batch_size=2, stop_at_newline=False)
    prompts = ["ab", "cde", "f", "ghij", "kl"]
    wide = _tiny_gemma3(64)
    assert _TransformersDecoder(wide).refill_tokens == 62
    narrow = _tiny_gemma3(8)  # the 4-character prompt + 6 tokens > 8 - 2
    assert _TransformersDecoder(narrow).refill_tokens == 6
    for loaded, refills in ((wide, True), (narrow, False)):
        used.clear()
        texts = generate_from_prompts(loaded, prompts, config=config, seed=1, refill=True)
        assert len(texts) == len(prompts) and all(texts)
        assert used == ([len(prompts)] if refills else [])
    for refill in (False, None):  # off, and the default on a CPU
        used.clear()
        generate_from_prompts(wide, prompts, config=config, seed=1, refill=refill)
        assert used == []
    assert not isinstance(_FixedBatchDecoder(wide), RefillingDecoder)
