"""Tests of the hashing embedder (the sentence-transformers model is not loaded here)."""

from __future__ import annotations

import numpy as np
import pytest

from fedsynth.protocol.embedding import HashingEmbedder, load_embedder
from fedsynth.protocol.errors import ConfigError

TEXTS = [
    "The pasta was delicious and the service was friendly.",
    "Terrible food, rude staff, never coming back.",
    "a",
    "Prices are reasonable; parking is easy to find downtown.",
]


def test_fingerprint_stable_and_depends_on_dim() -> None:
    a, b = HashingEmbedder(64), HashingEmbedder(64)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint.startswith("sha256:")
    assert len(a.fingerprint) == len("sha256:") + 64
    assert HashingEmbedder(128).fingerprint != a.fingerprint
    assert HashingEmbedder().fingerprint == HashingEmbedder(256).fingerprint
    assert a.name == "hashing-64"
    assert a.dim == 64


def test_embed_shape_dtype_unit_norm_deterministic() -> None:
    emb = HashingEmbedder(64)
    out = emb.embed(TEXTS)
    assert out.shape == (len(TEXTS), 64)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    assert np.all(out >= 0.0)  # alternate_sign=False: non-negative counts
    # Same text, same vector, in another batch and from another instance.
    again = HashingEmbedder(64).embed(TEXTS[::-1])[::-1]
    np.testing.assert_array_equal(out, again)
    np.testing.assert_array_equal(emb.embed(TEXTS[:1])[0], out[0])
    # Different texts, different vectors.
    assert not np.allclose(out[0], out[1])
    # A tuple works as well as a list.
    np.testing.assert_array_equal(emb.embed(tuple(TEXTS)), out)


def test_similar_texts_are_closer_than_unrelated() -> None:
    emb = HashingEmbedder(256)
    anchor, near, far = emb.embed(
        [
            "the pizza was great and the staff were very friendly",
            "the pizza was great and the staff were really friendly",
            "quarterly tax filings are due for corporations in april",
        ]
    )
    assert np.linalg.norm(anchor - near) < np.linalg.norm(anchor - far)
    assert float(anchor @ near) > float(anchor @ far)
    assert float(anchor @ near) > 0.8


def test_empty_input() -> None:
    emb = HashingEmbedder(32)
    for empty in ([], ()):
        out = emb.embed(empty)
        assert out.shape == (0, 32)
        assert out.dtype == np.float32


def test_dim_too_small() -> None:
    with pytest.raises(ConfigError, match="dim=4"):
        HashingEmbedder(4)
    assert HashingEmbedder(8).dim == 8


def test_load_embedder_hashing() -> None:
    emb = load_embedder("hashing-64")
    assert isinstance(emb, HashingEmbedder)
    assert emb.dim == 64
    assert emb.name == "hashing-64"
    assert emb.fingerprint == HashingEmbedder(64).fingerprint
    # Cached per process.
    assert load_embedder("hashing-64") is emb
    np.testing.assert_array_equal(emb.embed(TEXTS), HashingEmbedder(64).embed(TEXTS))


@pytest.mark.parametrize("name", ["nope", "hashing-", "hashing-abc"])
def test_load_embedder_unknown(name: str) -> None:
    with pytest.raises(ConfigError, match="embedder"):
        load_embedder(name)


def test_load_embedder_hashing_too_small() -> None:
    with pytest.raises(ConfigError, match="dim=2"):
        load_embedder("hashing-2")


def test_text_without_ngrams_is_not_a_zero_vector() -> None:
    emb = HashingEmbedder(64)
    try:
        out = emb.embed(["", "   ", "hello there"])
    except ConfigError:
        return  # refusing such texts would be a fix as well
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
