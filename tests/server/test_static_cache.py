"""The static-cache decoder (fixed shapes, for CUDA graphs) gives the dynamic decoder's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.models import LoadedModel, decoder_layers, load_model, tiny_model
from fedsynth.server.generation import (
    GenerationConfig,
    RefillingDecoder,
    _StaticCacheDecoder,
    _TransformersDecoder,
    generate_from_prompts,
    slot_steering,
    steering,
)

PROMPTS = [[1, 5, 9, 12], [3, 4], [7, 8, 9, 10, 11, 12, 13], [2, 6, 2]]

MODELS = {
    "llama": lambda: tiny_model(arch="llama"),
    "gpt2": lambda: tiny_model(arch="gpt2"),
    # Rows grow past the 8-token sliding window: the static layer must slide as the dynamic does.
    "gemma3": lambda: tiny_model(arch="gemma3", sliding_window=8),
}


def _run(decoder: object, loaded: LoadedModel, steps: int) -> list[torch.Tensor]:
    """Prefill, then ``steps`` tokens; rows 1 and 3 end after the second step."""
    assert isinstance(decoder, (_StaticCacheDecoder, _TransformersDecoder))
    # Logits may live in the decoder's buffer until its next call: keep copies.
    out = [decoder.prefill([list(p) for p in PROMPTS]).clone()]
    live = torch.arange(len(PROMPTS))
    for t in range(steps):
        if t == 2:
            decoder.keep(torch.tensor([2, 0]))  # reordered, as the sampling loop may
            live = live[torch.tensor([2, 0])]
        out.append(decoder.step(30 + t + live).clone())
    return out


@pytest.mark.parametrize("arch", sorted(MODELS))
@torch.inference_mode()
def test_static_cache_logits_match_the_dynamic_cache(arch: str) -> None:
    loaded = MODELS[arch]()
    steps = 12
    dynamic = _run(_TransformersDecoder(loaded), loaded, steps)
    static_decoder = _StaticCacheDecoder(loaded, max_new_tokens=steps + 1, compiled=False)
    static = _run(static_decoder, loaded, steps)
    assert [d.shape for d in dynamic] == [s.shape for s in static]
    for d, s in zip(dynamic, static, strict=True):
        torch.testing.assert_close(s, d, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_static_cache_steered_and_sampled_texts_match() -> None:
    loaded = tiny_model()
    deltas = {1: torch.randn(32, generator=torch.Generator().manual_seed(3))}
    config = GenerationConfig(max_new_tokens=10, batch_size=3)
    prompts = ["ab", "cde", "f", "ghij", "kl"]
    plain = generate_from_prompts(loaded, prompts, config=config, seed=4, refill=False)
    steered = generate_from_prompts(
        loaded, prompts, config=config, deltas=deltas, seed=4, refill=False
    )
    assert steered != plain  # the direction changes what is sampled
    assert generate_from_prompts(loaded, prompts, config=config, seed=4, static_cache=True) == plain
    assert (
        generate_from_prompts(
            loaded, prompts, config=config, deltas=deltas, seed=4, static_cache=True
        )
        == steered
    )
    with steering(loaded.model, deltas):  # the hook acts inside the static decoder's forward
        decoder = _StaticCacheDecoder(loaded, max_new_tokens=2, compiled=False)
        hooked = decoder.prefill([PROMPTS[0]])
    bare = _StaticCacheDecoder(loaded, max_new_tokens=2, compiled=False).prefill([PROMPTS[0]])
    assert not torch.allclose(hooked, bare)


def test_static_cache_cannot_refill_and_stops_at_its_width() -> None:
    loaded = tiny_model()
    config = GenerationConfig(max_new_tokens=4, batch_size=2)
    with pytest.raises(ConfigError, match="cannot refill"):
        generate_from_prompts(loaded, ["ab"], config=config, seed=0, static_cache=True, refill=True)
    decoder = _StaticCacheDecoder(loaded, max_new_tokens=1, compiled=False)
    assert not isinstance(decoder, RefillingDecoder)
    with torch.inference_mode():
        decoder.prefill([[1, 2]])
        decoder.step(torch.tensor([3]))
        with pytest.raises(ConfigError, match="static cache full"):
            decoder.step(torch.tensor([4]))


@torch.inference_mode()
def test_slot_steering_adds_what_the_hooks_add_and_leaves_no_trace() -> None:
    loaded = tiny_model()
    ids = torch.tensor([[1, 5, 9, 12]])
    deltas = {1: torch.randn(32, generator=torch.Generator().manual_seed(3)), 2: torch.ones(32)}
    bare = loaded.model(input_ids=ids).logits
    with steering(loaded.model, deltas):
        hooked = loaded.model(input_ids=ids).logits
    with slot_steering(loaded.model, deltas):
        slotted = loaded.model(input_ids=ids).logits
    torch.testing.assert_close(slotted, hooked)
    assert not torch.allclose(slotted, bare, atol=1e-3)
    torch.testing.assert_close(loaded.model(input_ids=ids).logits, bare, atol=0, rtol=0)
    assert all(not block._forward_hooks for block in decoder_layers(loaded.model))
    bad = slot_steering(loaded.model, {9: torch.ones(32)})
    with pytest.raises(ConfigError, match="outside"), bad:
        pass


@torch.inference_mode()
def test_compiled_steps_sample_what_the_eager_static_decoder_samples() -> None:
    import torch._dynamo.utils

    torch._dynamo.reset()
    loaded = tiny_model(arch="gemma3", sliding_window=64)  # rows fit the window: compiled
    deltas = {1: torch.randn(32, generator=torch.Generator().manual_seed(3))}
    config = GenerationConfig(max_new_tokens=8, batch_size=3)
    prompts = ["ab", "cde", "f", "ghij", "kl"]

    def run(steer: bool, compiled: bool) -> list[str]:
        return generate_from_prompts(
            loaded,
            prompts,
            config=config,
            deltas=deltas if steer else None,
            seed=4,
            static_cache=True,
            compile_steps=compiled,
        )

    plain, steered = run(False, False), run(True, False)
    assert plain != steered
    assert run(False, True) == plain
    captured = dict(torch._dynamo.utils.counters["stats"])
    # The release changes the buffers' contents, not the graph: no new capture for it.
    assert run(True, True) == steered
    assert run(False, True) == plain
    assert dict(torch._dynamo.utils.counters["stats"])["unique_graphs"] == captured["unique_graphs"]
    assert all(not block._forward_hooks for block in decoder_layers(loaded.model))
    # A batch longer than the sliding window runs eagerly, with the same samples.
    narrow = tiny_model(arch="gemma3", sliding_window=8)
    eager = generate_from_prompts(narrow, prompts, config=config, seed=4, static_cache=True)
    assert (
        generate_from_prompts(
            narrow, prompts, config=config, seed=4, static_cache=True, compile_steps=True
        )
        == eager
    )


def test_cli_generate_compile_samples_what_the_default_decoder_samples(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedsynth.server.release import save_release
    from fedsynth.simulations.cli import app
    from tests.server.releases import make_test_release

    path = save_release(make_test_release(load_model("tiny-llama")), tmp_path / "r.safetensors")
    runner = CliRunner()
    args = ["generate", "--release", str(path), "--n", "3", "--max-new-tokens", "4"]
    args += ["--shots", "0", "--seed", "2"]
    outs = {}
    for flags in ((), ("--compile",)):
        out = tmp_path / f"out{len(flags)}.jsonl"
        result = runner.invoke(app, [*args, "--out", str(out), *flags])
        assert result.exit_code == 0, result.output
        outs[flags] = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert len(outs[()]) == 9  # 3 per label, 3 labels
    assert outs[("--compile",)] == outs[()]
    result = runner.invoke(
        app, [*args, "--out", str(tmp_path / "x.jsonl"), "--compile", "--backend", "llamacpp"]
    )
    assert result.exit_code == 2 and "transformers-backend option" in result.output
    assert not (tmp_path / "x.jsonl").exists()
