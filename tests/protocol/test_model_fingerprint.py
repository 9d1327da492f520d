"""The fingerprint a release is checked against: the weights whatever their precision, and the
tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from fedsynth.protocol import models
from fedsynth.protocol.models import CharTokenizer, LoadedModel, tiny_model, weight_fingerprint


def _bf16_copy(saved: LoadedModel, folder: Path, monkeypatch: pytest.MonkeyPatch) -> LoadedModel:
    """Save ``saved``'s fp32 weights to ``folder`` and load them as a GPU would (bf16)."""
    saved.model.save_pretrained(folder)
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: CharTokenizer()
    )
    monkeypatch.setattr(models, "model_dtype", lambda device: torch.bfloat16)
    monkeypatch.setattr(models, "_LOADED", {})
    return models.load_model(str(folder), device="cpu")


def test_a_bf16_copy_carries_the_fp32_fingerprint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A coordinator on a GPU (bf16) applies releases that fp32 CPU holders made with the same
    weights: its loaded model carries their fingerprint, not the hash of its rounded copy."""
    tiny = tiny_model(seed=3)
    loaded = _bf16_copy(tiny, tmp_path, monkeypatch)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert weight_fingerprint(loaded.model) != tiny.fingerprint  # rounding changed the weights
    assert loaded.fingerprint == tiny.fingerprint


def test_other_weights_keep_another_fingerprint_in_bf16(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bf16 path reads the fingerprint of the weights on disk: other weights, other hash."""
    other = tiny_model(seed=4)
    loaded = _bf16_copy(other, tmp_path, monkeypatch)
    assert loaded.fingerprint == other.fingerprint != tiny_model(seed=3).fingerprint


class _OtherTokenizer(CharTokenizer):
    """The same vocabulary, but "é" split as two ids of its own: text encodes otherwise."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        for part in text.split("é"):
            ids += [*super().encode(part, add_special_tokens=False), 250, 251]
        ids = ids[:-2]
        return ([self.bos_token_id] if add_special_tokens else []) + ids


class _OtherEnd(CharTokenizer):
    eos_token_id = 0


def test_the_tokenizer_fingerprint_follows_what_it_encodes() -> None:
    same = models.tokenizer_fingerprint(CharTokenizer())
    assert models.tokenizer_fingerprint(CharTokenizer()) == same  # another object, same encoding
    assert models.tokenizer_fingerprint(_OtherTokenizer()) != same  # one character otherwise
    assert models.tokenizer_fingerprint(_OtherEnd()) != same  # another end-of-text id


def _load_fp32(folder: Path, tokenizer: CharTokenizer, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    monkeypatch.setattr(models, "_LOADED", {})
    return models.load_model(str(folder), device="cpu").fingerprint


def test_the_same_weights_with_another_tokenizer_are_another_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Holders and coordinator agree on a model only if both split text alike: a tokenizer
    that encodes otherwise changes the fingerprint, loaded (fp32) or read from the cache."""
    from types import SimpleNamespace

    from fedsynth.client.contributor import manifest_model_matches
    from fedsynth.protocol.errors import ModelMismatchError

    tiny = tiny_model(seed=3)
    tiny.model.save_pretrained(tmp_path)
    assert _load_fp32(tmp_path, CharTokenizer(), monkeypatch) == tiny.fingerprint
    other = _load_fp32(tmp_path, _OtherTokenizer(), monkeypatch)
    assert other != tiny.fingerprint
    # The kept record beside the weights holds the weights' part only: it follows the tokenizer.
    monkeypatch.setattr(models, "_LOADED", {})
    assert models.model_fingerprint(str(tmp_path)) == other
    assert (tmp_path / models.FINGERPRINT_FILE).exists()
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: CharTokenizer()
    )
    assert models.model_fingerprint(str(tmp_path)) == tiny.fingerprint
    # A holder whose tokenizer encodes otherwise refuses the task, naming the tokenizer's part.
    holder = models.load_model(str(tmp_path), device="cpu")
    manifest = SimpleNamespace(model_fingerprint=other, hidden_size=holder.hidden_size)
    with pytest.raises(ModelMismatchError, match="tokenizer's part is sha256:"):
        manifest_model_matches(holder, manifest)  # type: ignore[arg-type]
