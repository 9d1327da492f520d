"""A data holder's local configuration (never sent to the coordinator)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedsynth.client.policy import ClientPolicy


@dataclass(frozen=True)
class ClientSettings:
    """A data holder's local configuration (never sent to the coordinator).

    Attributes:
        data_path: Private data file (jsonl, csv or parquet).
        text_field: Column/key holding the text.
        label_field: Column/key holding the label.
        model: Packaged model name, local path or hub id; must match the manifest fingerprint.
        embedder: Embedder for PE votes (``all-minilm-l6-v2``, ``hashing-<dim>`` or a path).
        policy: The holder's privacy policy.
        budget_path: Persistent epsilon ledger (None: no lifetime tracking).
        batch_size: Forward-pass batch size.
        device: torch device (None: CUDA if present).
        seed: Fixed seed for tests only; None draws from the OS's secure randomness.
    """

    data_path: Path
    text_field: str = "text"
    label_field: str = "label"
    model: str = "gemma3-270m"
    embedder: str = "all-minilm-l6-v2"
    policy: ClientPolicy = field(default_factory=ClientPolicy)
    budget_path: Path | None = None
    batch_size: int = 32
    device: str | None = None
    seed: int | None = None
