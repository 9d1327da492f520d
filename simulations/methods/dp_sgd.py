"""``dp-sgd``: LoRA adapters fine-tuned with DP-SGD (Opacus) on the pooled data, then sampling."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from fedsynth.simulations.methods.base import CellOutput, StudyContext
from fedsynth.simulations.methods.common import dp_train_settings, model_samples

if TYPE_CHECKING:
    from fedsynth.simulations.study_config import Cell


def run(ctx: StudyContext, cell: Cell) -> CellOutput:
    """Fine-tune on every holder's records at the cell's ε, then sample the class prompts."""
    from fedsynth.simulations.dp_finetune import finetune_pooled

    state = ctx.seed_state(cell.seed)
    start = time.monotonic()
    model, report = finetune_pooled(
        ctx.loaded,
        state.pooled,
        ctx.demo_config(cell).template,
        epsilon=cell.epsilon,
        delta=ctx.config.delta,
        settings=dp_train_settings(ctx),
        seed=cell.seed,
    )
    perf = {
        "client_seconds": time.monotonic() - start,
        "noise_multiplier": report["noise_multiplier"],
    }
    return model_samples(ctx, cell, model, perf)
