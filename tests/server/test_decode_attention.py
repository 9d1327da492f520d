"""Single-query decoding attention on the CPU: the same logits as sdpa's, step after step.

The CPU decoder switches an sdpa model to :mod:`fedsynth.server.decode_attention`; it must
attend exactly where sdpa does (left padding, sliding windows that have started to slide,
grouped key-value heads, rows dropped from the batch) and leave every other call to sdpa.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from fedsynth.protocol.models import tiny_model
from fedsynth.server import decode_attention, generation
from fedsynth.server.generation import GenerationConfig, _TransformersDecoder

# Left padding of different widths; rows longer than gemma3's 8-token window after a few steps.
PROMPTS = [[1, 5, 9, 12, 40, 41], [3, 4], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]


def _steps(loaded: object, *, switch: bool, steps: int = 9) -> list[torch.Tensor]:
    """Logits of a prefill and ``steps`` decoding steps; row 1 leaves the batch at step 4."""
    patch = (
        mock.patch.object(generation, "use_for_decoding", return_value=False)
        if not switch
        else mock.patch.object(generation, "use_for_decoding", decode_attention.use_for_decoding)
    )
    with patch, torch.inference_mode():
        decoder = _TransformersDecoder(loaded)  # type: ignore[arg-type]
        out = [decoder.prefill(PROMPTS).clone()]
        ids = torch.tensor([20, 21, 22])
        for step in range(steps):
            if step == 4:
                decoder.keep(torch.tensor([0, 2]))
                ids = ids[[0, 2]]
            out.append(decoder.step(ids).clone())
            ids = (ids * 7 + step) % 200 + 3
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_decoding_steps_attend_as_sdpa_does(arch: str) -> None:
    reference = tiny_model(arch=arch, sliding_window=8)
    assert reference.model.config._attn_implementation == "sdpa"
    expected = _steps(reference, switch=False)
    loaded = tiny_model(arch=arch, sliding_window=8)  # same seed, same weights
    got = _steps(loaded, switch=True)
    assert loaded.model.config._attn_implementation == decode_attention.IMPLEMENTATION
    # The prefill (several queries per row) is sdpa's own computation: bit for bit.
    assert torch.equal(got[0], expected[0])
    for ours, theirs in zip(got[1:], expected[1:], strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_grouped_heads_and_mask_directly() -> None:
    torch.manual_seed(0)
    rows, heads, kv_heads, keys, dim = 3, 4, 2, 7, 8
    query = torch.randn(rows, heads, 1, dim)
    key = torch.randn(rows, kv_heads, keys, dim)
    value = torch.randn(rows, kv_heads, keys, dim)
    mask = torch.ones(rows, 1, 1, keys, dtype=torch.bool)
    mask[0, ..., :3] = False  # a left-padded row
    mask[2, ..., -2:] = False
    module = mock.Mock(num_key_value_groups=heads // kv_heads, is_causal=True)
    got, _ = decode_attention.decode_attention(module, query, key, value, mask, scaling=0.3)
    repeated_k = key.repeat_interleave(heads // kv_heads, dim=1)
    repeated_v = value.repeat_interleave(heads // kv_heads, dim=1)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, repeated_k, repeated_v, attn_mask=mask, scale=0.3
    ).transpose(1, 2)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    unmasked, _ = decode_attention.decode_attention(module, query, key, value, None, scaling=0.3)
    assert not torch.allclose(unmasked[0], got[0]), "the mask must change what row 0 sees"


def test_other_calls_go_to_sdpa() -> None:
    torch.manual_seed(1)
    query, key, value = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    module = mock.Mock(num_key_value_groups=1, is_causal=True)
    with mock.patch(
        "transformers.integrations.sdpa_attention.sdpa_attention_forward",
        return_value=("sdpa", None),
    ) as sdpa:
        assert decode_attention.decode_attention(module, query, key, value, None)[0] == "sdpa"
        one = query[:, :, :1]
        soft = decode_attention.decode_attention(module, one, key, value, None, softcap=30.0)
        assert soft[0] == "sdpa"
        additive = torch.zeros(2, 1, 1, 3)  # a float mask: not this function's contract
        assert decode_attention.decode_attention(module, one, key, value, additive)[0] == "sdpa"
    assert sdpa.call_count == 3


def test_only_sdpa_models_are_switched() -> None:
    loaded = tiny_model(arch="llama")
    loaded.model.set_attn_implementation("eager")
    assert not decode_attention.use_for_decoding(loaded.model)
    assert loaded.model.config._attn_implementation == "eager"
    other = tiny_model(arch="llama")
    assert decode_attention.use_for_decoding(other.model)
    assert decode_attention.use_for_decoding(other.model)  # idempotent


def test_samples_come_from_the_switched_model_on_the_cpu() -> None:
    loaded = tiny_model(arch="gemma3", sliding_window=8)
    config = GenerationConfig(max_new_tokens=12, batch_size=4, stop_at_newline=False)
    texts = generation.generate_from_prompts(loaded, ["ab", "c", "hello"], config=config, seed=2)
    assert len(texts) == 3
    assert loaded.model.config._attn_implementation == decode_attention.IMPLEMENTATION
