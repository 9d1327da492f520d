"""A small dataset-vector task manifest shared by the holder-side policy and budget tests."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedsynth.protocol.features import PromptTemplate
from fedsynth.protocol.manifest import PrivacySpec, TaskManifest, array_sha256

TEMPLATE = PromptTemplate(instruction="{label}: ", label_names=(("a", "A"), ("b", "B")))
FINGERPRINT = "sha256:" + "cd" * 32


def make_manifest(
    task_id: str = "task-1", *, max_records: int = 1_000_000, **privacy_overrides: Any
) -> TaskManifest:
    fields: dict[str, Any] = {
        "epsilon": 4.0,
        "delta": 1e-6,
        "mode": "distributed",
        "threshold": 2,
        "total_variance": 100.0,
        "noise_multiplier": 1.0,
        "l2_sensitivity": 1.0,
        "l1_sensitivity": 1.0,
        "accountant": "rdp",
    }
    fields.update(privacy_overrides)
    if math.isinf(fields["epsilon"]):
        fields["total_variance"] = 0.0
    return TaskManifest(
        task_id=task_id,
        model_name="tiny",
        model_fingerprint=FINGERPRINT,
        hidden_size=4,
        template=TEMPLATE,
        layers=(0,),
        max_text_tokens=8,
        clip_norms=(1.0,),
        residual_norms=(1.0,),
        count_weight=0.5,
        scale=100.0,
        bits=48,
        node_ids=(1, 2, 3),
        privacy=PrivacySpec(**fields),
        reference_sha256=array_sha256(np.zeros((2, 1, 4), dtype=np.float32)),
        max_records=max_records,
    )
