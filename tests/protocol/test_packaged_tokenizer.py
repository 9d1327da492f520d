"""A tokenizer rebuilt wrongly from a packaged GGUF is refused before it writes a sample."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import transformers

from fedsynth.protocol import models
from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.models import (
    PACKAGED_MODELS,
    PROBE_TEXT,
    check_tokenizer,
    resolve_model_dir,
)


class _CharacterTokenizer:
    """What transformers 5.17 rebuilt from Gemma's GGUF: one id per character, no <bos>."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]


@pytest.mark.parametrize("name", sorted(PACKAGED_MODELS))
def test_each_packaged_models_own_tokenizer_passes_its_probe(name: str) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model_dir(name))
    check_tokenizer(PACKAGED_MODELS[name], tokenizer, where="the cache")
    assert PACKAGED_MODELS[name].probe == (PROBE_TEXT, PACKAGED_MODELS[name].probe[1])
    assert len(PACKAGED_MODELS[name].probe[1]) > 5


def test_a_character_level_rebuild_is_refused_with_what_to_do() -> None:
    with pytest.raises(ConfigError) as caught:
        check_tokenizer(PACKAGED_MODELS["gemma3-270m"], _CharacterTokenizer(), where="/cache/x")
    message = str(caught.value)
    assert "gemma3-270m" in message and "/cache/x" in message
    assert "[2, 236776" in message and transformers.__version__ in message


def test_one_id_off_is_refused() -> None:
    model = PACKAGED_MODELS["smollm2-135m"]

    class _OffByOne:
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            ids = list(model.probe[1])
            return [*ids[:-1], ids[-1] + 1]

    with pytest.raises(ConfigError):
        check_tokenizer(model, _OffByOne(), where="here")


def test_load_model_refuses_a_cache_with_a_wrong_tokenizer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    resolve_model_dir("smollm2-135m")  # converted (or cached) with the right tokenizer first
    monkeypatch.setattr(models, "_LOADED", {})

    def wrong(*args: Any, **kwargs: Any) -> _CharacterTokenizer:
        return _CharacterTokenizer()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", wrong)
    with pytest.raises(ConfigError, match="rebuilt wrongly"):
        models.load_model("smollm2-135m", device="cpu")


def test_a_conversion_with_a_wrong_tokenizer_writes_no_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def wrong(*args: Any, **kwargs: Any) -> _CharacterTokenizer:
        return _CharacterTokenizer()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", wrong)
    target = tmp_path / "smollm2-135m"
    with pytest.raises(ConfigError, match="rebuilt wrongly"):
        models._convert_packaged(PACKAGED_MODELS["smollm2-135m"], target)
    assert not target.exists() and not target.with_name(target.name + ".tmp").exists()
