"""The in-place KV cache: the same cached values and samples as `transformers`' own, no copies."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from transformers import DynamicCache

from fedsynth.protocol.models import tiny_model
from fedsynth.server import generation, kv_cache
from fedsynth.server.generation import GenerationConfig, _TransformersDecoder


def _plain(config: object) -> DynamicCache:
    return DynamicCache(config=config)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("refill", [False, True])
@torch.inference_mode()
def test_same_samples_as_the_dynamic_cache(arch: str, refill: bool) -> None:
    loaded = tiny_model(arch=arch, sliding_window=8)  # rows outgrow gemma3's window
    prompts = ["ab", "c", "hello there", "xy", "q"] * 3
    config = GenerationConfig(max_new_tokens=14, batch_size=4, stop_at_newline=False)
    deltas = {1: torch.full((loaded.hidden_size,), 0.2)}
    ours = generation.generate_from_prompts(
        loaded, prompts, config=config, deltas=deltas, seed=5, refill=refill
    )
    with mock.patch.object(kv_cache, "growing_cache", _plain):
        theirs = generation.generate_from_prompts(
            loaded, prompts, config=config, deltas=deltas, seed=5, refill=refill
        )
    assert ours == theirs


@torch.inference_mode()
def test_steps_write_into_the_reserved_room() -> None:
    loaded = tiny_model(arch="gemma3", sliding_window=64)
    decoder = _TransformersDecoder(loaded)
    decoder.prefill([[1, 5, 9], [3, 4, 7]])
    layers = decoder._past.layers
    assert all(type(layer).__name__.startswith("Growing") for layer in layers)
    before = [layer.keys.data_ptr() for layer in layers]
    for token in range(5):
        decoder.step(torch.tensor([10 + token, 20 + token]))
    assert [layer.keys.data_ptr() for layer in layers] == before, "no reallocation while room"
    assert all(layer.keys.shape[-2] == 8 for layer in layers)
    decoder.keep(torch.tensor([1]))  # the decoder replaces the tensors: a fresh buffer
    decoder.step(torch.tensor([30]))
    assert all(layer.keys.shape[:3] == (1, 1, 9) for layer in layers)


def test_append_equals_concatenation_through_reallocations() -> None:
    torch.manual_seed(0)
    layer = mock.Mock(spec=["keys", "values", "is_initialized"])
    layer.keys = torch.tensor([])  # as a layer's lazy initialization leaves them
    layer.values = torch.tensor([])
    layer.is_initialized = True
    chunks = [torch.randn(2, 1, n, 4) for n in (3, 1, 1, 40, 1, 1)]
    expected_k = torch.cat(chunks, dim=-2)
    for chunk in chunks:
        kv_cache._append(layer, chunk, chunk * 2)
    assert torch.equal(layer.keys, expected_k)
    assert torch.equal(layer.values, expected_k * 2)
    layer.keys = layer.keys[[1]]  # replaced by the decoder (a row dropped)
    layer.values = layer.values[[1]]
    extra = torch.randn(1, 1, 1, 4)
    kv_cache._append(layer, extra, extra)
    assert torch.equal(layer.keys, torch.cat([expected_k[[1]], extra], dim=-2))
    assert torch.equal(layer.values, torch.cat([expected_k[[1]] * 2, extra], dim=-2))
