"""A three-label test release made the way the coordinator makes one (stand-in noise values).

Shared by the release/generation tests and the Synthesis service harness.
"""

from __future__ import annotations

import math

import numpy as np

from fedsynth.protocol.contribution import DecodedRelease
from fedsynth.protocol.features import PromptTemplate
from fedsynth.protocol.manifest import PrivacySpec, TaskManifest, array_sha256
from fedsynth.protocol.models import LoadedModel
from fedsynth.server.release import Release, make_release
from fedsynth.server.secure_round import RoundResult

TEMPLATE = PromptTemplate(
    instruction="A {label} review: ",
    label_names=(("pos", "positive"), ("neg", "negative"), ("mix", "mixed")),
)
LAYERS = (1, 2)
DROPPED_REFUSAL = {4: "masked_input: gone"}


def make_manifest(
    loaded: LoadedModel,
    *,
    epsilon: float = 2.0,
    mode: str = "distributed",
    task_id: str = "release-1",
) -> TaskManifest:
    """The manifest of a K = 4, t = 2 task on ``loaded`` (no noise for epsilon = inf)."""
    reference = np.zeros((3, len(LAYERS), loaded.hidden_size), dtype=np.float32)
    return TaskManifest(
        task_id=task_id,
        model_name=loaded.name,
        model_fingerprint=loaded.fingerprint,
        hidden_size=loaded.hidden_size,
        template=TEMPLATE,
        layers=LAYERS,
        max_text_tokens=16,
        clip_norms=(2.0, 3.0),
        residual_norms=(5.0, 7.0),
        count_weight=0.5,
        scale=1000.0,
        bits=64,
        node_ids=(1, 2, 3, 4),
        privacy=PrivacySpec(
            epsilon=epsilon,
            delta=1e-5,
            mode=mode,
            threshold=2,
            total_variance=0.0 if math.isinf(epsilon) else 400.0,
            noise_multiplier=1.0,
            l2_sensitivity=20.0,
            l1_sensitivity=200.0,
            accountant="rdp",
        ),
        reference_sha256=array_sha256(reference),
    )


def make_test_release(
    loaded: LoadedModel,
    *,
    epsilon: float = 2.0,
    mode: str = "distributed",
    release_id: str = "release-1",
    refusals: dict[int, str] | None = None,
) -> Release:
    """Holders 1-3 survived, holder 4 dropped (with ``refusals`` as the round's report)."""
    manifest = make_manifest(loaded, epsilon=epsilon, mode=mode, task_id=release_id)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3, len(LAYERS), loaded.hidden_size)).astype(np.float32)
    decoded = DecodedRelease(vectors=vectors, counts=np.array([12.5, 7.25, 1.0]))
    result = RoundResult(
        field_sum=np.zeros(manifest.dim, dtype=np.uint64),
        survivors=[1, 2, 3],
        dropped=[4],
        refusals=dict(DROPPED_REFUSAL if refusals is None else refusals),
    )
    return make_release(manifest, decoded, result, model_name=loaded.name)
