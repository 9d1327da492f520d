"""The interface between the study runner and its methods.

A method is a function ``run(ctx, cell) -> CellOutput``: it reads what every cell of a seed
shares through the :class:`StudyContext` (the model, the public reference, the seed's data
split, the cell's demo settings) and returns its samples with their performance figures and,
where the method releases a generator, that generator (for the canary exposure). Scoring is not
the method's business (:mod:`fedsynth.simulations.scoring`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fedsynth.client.data import Record
from fedsynth.server.synthesize import SyntheticSample

if TYPE_CHECKING:
    from fedsynth.client.policy import ClientPolicy
    from fedsynth.protocol.manifest import TaskManifest
    from fedsynth.protocol.models import LoadedModel
    from fedsynth.server.coordinator import PublicReference
    from fedsynth.simulations.demo import DemoConfig
    from fedsynth.simulations.study_config import Cell, StudyConfig


@dataclass
class SeedState:
    """What every cell of one seed shares: data split, evaluators, pooled features."""

    train: list[Record]
    test: list[Record]
    members: list[Record]
    non_members: list[Record]
    judge: list[Record] = field(default_factory=list)
    classifier: Any = None
    test_embeddings: np.ndarray | None = None
    member_embeddings: np.ndarray | None = None
    non_member_embeddings: np.ndarray | None = None
    canaries: list[Record] = field(default_factory=list)
    canary_secret: str = ""
    candidate_secrets: list[str] = field(default_factory=list)
    pooled_features: np.ndarray | None = None
    pooled_seconds: float = 0.0

    @property
    def pooled(self) -> list[Record]:
        """Everything the holders hold together: the private records plus the canaries."""
        return self.train + self.canaries


@dataclass(frozen=True)
class Generator:
    """What a method releases for generation: a prompt per label and optional steering."""

    prompts: Mapping[str, str]
    deltas_by_label: Mapping[str, Mapping[int, Any]] | None = None
    model: LoadedModel | None = None  # a fine-tuned model (default: the study's model)


@dataclass
class CellOutput:
    """Samples of one cell, its performance figures and its generator (for canary exposure)."""

    samples: list[SyntheticSample]
    status: str = "ok"
    perf: dict[str, float] = field(default_factory=dict)
    generator: Generator | None = None
    members: list[Record] | None = None  # records the method read, if not all private ones


class StudyContext(Protocol):
    """What a method may use of the study: shared, cached state and the cell's settings."""

    config: StudyConfig
    out_dir: Path

    @property
    def loaded(self) -> LoadedModel:
        """The coordinator's model."""
        ...

    @property
    def reference(self) -> PublicReference:
        """The public prior and reference (one per study)."""
        ...

    def seed_state(self, seed: int) -> SeedState:
        """Data split and evaluators of one seed."""
        ...

    def demo_config(self, cell: Cell) -> DemoConfig:
        """The demo settings that run ``cell`` through the real federated code."""
        ...

    def partitions(self, cell: Cell) -> list[list[Record]]:
        """The holders' data of ``cell``."""
        ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Sentence embeddings of ``texts`` (the metrics' embedder)."""
        ...

    def pooled_features(self, state: SeedState, manifest: TaskManifest) -> np.ndarray:
        """Features of every private record of the seed (computed once)."""
        ...

    def holder_policy(self) -> ClientPolicy:
        """The simulated holders' policy."""
        ...

    def cell_dir(self, cell: Cell) -> Path:
        """The folder of ``cell``'s files."""
        ...


MethodRunner = Callable[["StudyContext", "Cell"], CellOutput]
"""A method: produce one cell's samples."""
