"""The blocked output head on the CPU, and `transformers` generation in bf16.

The head writes the logits a vocabulary block at a time into a reused fp32 buffer instead of
the model computing them in a fresh tensor: it must give the model's own logits (and so the
same samples), refuse a head it cannot reproduce, and never let one decoder's logits be
overwritten by another's.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch

from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.models import LoadedModel, load_model, tiny_model
from fedsynth.server import backends, generation, output_head
from fedsynth.server.backends import open_backend, precision_dtype
from fedsynth.server.generation import GenerationConfig, _TransformersDecoder
from fedsynth.server.output_head import BlockedHead

PROMPTS = [[1, 5, 9, 12], [3, 4], [7, 8, 9, 10, 11, 12, 13]]


def _own_logits(loaded: LoadedModel, rows: list[list[int]]) -> torch.Tensor:
    """The model's own next-token logits of each row (no blocked head)."""
    with mock.patch.object(generation, "output_head", return_value=None):
        return _TransformersDecoder(loaded).prefill(rows).clone()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@torch.inference_mode()
def test_blocked_head_gives_the_models_own_logits(arch: str) -> None:
    loaded = tiny_model(arch=arch)
    decoder = _TransformersDecoder(loaded)
    assert decoder._head is not None, "a plain head is used on the CPU"
    got = decoder.prefill(PROMPTS)
    torch.testing.assert_close(got, _own_logits(loaded, PROMPTS), atol=1e-5, rtol=1e-5)
    stepped = decoder.step(torch.tensor([20, 21, 22])).clone()
    rows = [[*p, t] for p, t in zip(PROMPTS, (20, 21, 22), strict=True)]
    torch.testing.assert_close(stepped, _own_logits(loaded, rows), atol=1e-5, rtol=1e-5)
    kept = output_head.output_head(loaded)  # the head kept on the model for every decoder
    assert kept is not None and kept._out.numel() == 0, "the probe's logits were kept with it"


def test_blocks_cover_the_vocabulary_and_reuse_one_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output_head, "PRODUCT_COLUMNS", 7)  # a tail block of 3 columns
    weight = torch.randn(24, 5)
    head = BlockedHead(weight)
    states = torch.randn(4, 5)
    first = head(states)
    torch.testing.assert_close(first, states @ weight.T)
    again = head(states[:2] * 2)
    assert again.data_ptr() == first.data_ptr()  # the same buffer, fewer rows
    torch.testing.assert_close(again, (states[:2] * 2) @ weight.T)
    low = BlockedHead(weight.to(torch.bfloat16))(states)
    assert low.dtype == torch.float32
    exact = states.to(torch.bfloat16).float() @ weight.to(torch.bfloat16).float().T
    torch.testing.assert_close(low, exact, atol=2e-2, rtol=2e-2)


@torch.inference_mode()
def test_same_samples_with_and_without_the_blocked_head() -> None:
    loaded = tiny_model(arch="llama")
    prompts = ["ab", "c", "hello", "xy"] * 3
    config = GenerationConfig(max_new_tokens=8, batch_size=4, stop_at_newline=False)
    deltas = {1: torch.full((loaded.hidden_size,), 0.3)}
    for refill in (False, True):  # refilling admits new rows through a second decoder
        blocked = generation.generate_from_prompts(
            loaded, prompts, config=config, deltas=deltas, seed=3, refill=refill
        )
        with mock.patch.object(generation, "output_head", return_value=None):
            own = generation.generate_from_prompts(
                loaded, prompts, config=config, deltas=deltas, seed=3, refill=refill
            )
        assert blocked == own


@torch.inference_mode()
def test_a_head_the_base_model_does_not_reproduce_is_not_used() -> None:
    capped = tiny_model(arch="gemma3")
    capped.model.config.final_logit_softcapping = 30.0
    assert output_head.output_head(capped) is None
    biased = tiny_model(arch="llama")
    linear = biased.model.get_output_embeddings()
    linear.bias = torch.nn.Parameter(torch.zeros(linear.out_features))
    assert output_head.output_head(biased) is None
    # A forward that adds something after the head: only the probe can tell.
    shifted = tiny_model(arch="llama")
    inner = shifted.model.forward

    def forward(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = inner(*args, **kwargs)
        out.logits = out.logits + 5.0
        return out

    shifted.model.forward = forward
    assert output_head.output_head(shifted) is None
    assert _TransformersDecoder(shifted)._head is None


@torch.inference_mode()
def test_the_decision_follows_the_head_weights() -> None:
    loaded = tiny_model(arch="llama")
    first = output_head.output_head(loaded)
    assert first is not None and first.weight.dtype == torch.float32
    assert output_head.output_head(loaded) is first  # decided once
    loaded.model.to(torch.bfloat16)
    second = output_head.output_head(loaded)
    assert second is not None and second.weight.dtype == torch.bfloat16


@torch.inference_mode()
def test_bf16_backend_keeps_the_fp32_fingerprint_and_steers_alike(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(output_head, "native_bf16", lambda: True)
    fp32 = open_backend("transformers", "tiny-llama", device="cpu")
    bf16 = open_backend("transformers", "tiny-llama", device="cpu", precision="bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")  # type: ignore[attr-defined]
    assert bf16.fingerprint == fp32.fingerprint
    assert bf16.loaded is not fp32.loaded  # type: ignore[attr-defined]
    ids = PROMPTS
    own = _own_logits(fp32.loaded, ids)  # type: ignore[attr-defined]
    low = _TransformersDecoder(bf16.loaded).prefill(ids)  # type: ignore[attr-defined]
    assert low.dtype == torch.float32
    assert float((low - own).abs().max()) < 0.1 * float(own.abs().max())


def test_precision_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="precision='fp16'"):
        open_backend("transformers", "tiny-llama", precision="fp16")
    with pytest.raises(ConfigError, match="transformers-backend option; backend='llamacpp'"):
        open_backend("llamacpp", "gemma3-270m", precision="bf16")
    monkeypatch.setattr(output_head, "native_bf16", lambda: False)
    with pytest.raises(ConfigError, match="no native bf16 products"):
        open_backend("transformers", "tiny-llama", device="cpu", precision="bf16")
    assert precision_dtype("bf16", torch.device("cuda")) == torch.bfloat16
    assert precision_dtype("auto", torch.device("cpu")) is None
    assert precision_dtype("fp32", torch.device("cpu")) == torch.float32
    backends.check_precision_backend("llamacpp", "auto")  # the default passes everywhere


def test_default_precision_is_the_devices() -> None:
    assert load_model("tiny-llama", device="cpu").model.dtype == torch.float32


def test_demo_generates_in_the_precision_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holders' fp32 model generates unless the demo asks for bf16 (loaded beside it)."""
    from fedsynth.simulations.demo import demo_config, generation_engine

    monkeypatch.setattr(output_head, "native_bf16", lambda: True)
    loaded = load_model("tiny-llama", device="cpu")
    auto = demo_config("quick", out_dir=tmp_path, model="tiny-llama")
    assert generation_engine(auto, loaded) is loaded
    low = demo_config("quick", out_dir=tmp_path, model="tiny-llama", precision="bf16")
    engine = generation_engine(low, loaded)
    assert engine.precision == "bf16"  # type: ignore[union-attr]
    assert engine.fingerprint == loaded.fingerprint
    assert loaded.model.dtype == torch.float32  # the holders' copy is untouched
    with pytest.raises(ConfigError, match="transformers-backend option"):
        demo_config("quick", out_dir=tmp_path, backend="llamacpp", precision="bf16")
    with pytest.raises(ConfigError, match="precision='half'"):
        demo_config("quick", out_dir=tmp_path, precision="half")


def test_cli_generate_in_bf16_and_its_refusals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from typer.testing import CliRunner

    from fedsynth.server.release import save_release
    from fedsynth.server.synthesis_client import synthesis_app
    from fedsynth.simulations.cli import app
    from tests.server.releases import make_test_release

    release = make_test_release(load_model("tiny-llama"))
    path = save_release(release, tmp_path / "r.safetensors")
    out = tmp_path / "out.jsonl"
    runner = CliRunner()
    args = ["generate", "--release", str(path), "--n", "2", "--out", str(out)]
    result = runner.invoke(app, [*args, "--precision", "half"])
    assert result.exit_code == 2 and "precision='half': expected one of auto" in result.output
    result = runner.invoke(app, [*args, "--backend", "llamacpp", "--precision", "bf16"])
    assert result.exit_code == 2 and "a transformers-backend option" in result.output
    assert not out.exists()
    serve = ["serve", "--releases", str(tmp_path), "--model", "no-such-model"]
    result = runner.invoke(
        synthesis_app,
        [*serve, "--token-file", str(tmp_path / "t"), "--backend", "llamacpp", "--precision",
         "bf16"],
    )  # fmt: skip
    assert result.exit_code == 2 and "a transformers-backend option" in result.output
    monkeypatch.setattr(output_head, "native_bf16", lambda: True)
    result = runner.invoke(app, [*args, "--precision", "bf16"])
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 2 * len(release.labels)
    report = json.loads(out.with_name(out.name + ".report.json").read_text())
    assert report["generation"]["precision"] == "bf16"
    # The bf16 model also reads the samples it keeps (--select) and the public basis (--denoise).
    for extra in (["--select", "0.5"], ["--denoise"]):
        result = runner.invoke(app, [*args, "--precision", "bf16", *extra])
        assert result.exit_code == 0, result.output
        assert len(out.read_text().splitlines()) == 2 * len(release.labels)
