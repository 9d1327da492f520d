"""``dp-fedavg``: each holder fine-tunes the LoRA adapters with DP-SGD, the server averages."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from fedsynth.simulations.methods.base import CellOutput, StudyContext
from fedsynth.simulations.methods.common import (
    dp_train_settings,
    federated_failure,
    model_samples,
    run_federated,
)

if TYPE_CHECKING:
    from fedsynth.simulations.study_config import Cell


def run(ctx: StudyContext, cell: Cell) -> CellOutput:
    """All federated rounds through Flower's simulation, then sampling from the merged model."""
    from fedsynth.simulations import dp_fedavg as fa
    from fedsynth.simulations.dp_finetune import (
        adapter_state,
        load_adapter_state,
        lora_model,
        merged_model,
    )

    config = ctx.demo_config(cell)
    settings = dp_train_settings(ctx)
    task = fa.FedAvgTask(
        model=ctx.config.model,
        template=config.template,
        epsilon=cell.epsilon,
        delta=ctx.config.delta,
        rounds=ctx.config.dp_training.rounds,
        settings=settings,
    )
    model = lora_model(ctx.loaded, rank=settings.lora_rank)
    outcome = fa.FedAvgOutcome()
    perf, errors = run_federated(
        ctx,
        cell,
        config,
        lambda: fa.make_fedavg_job(task, adapter_state(model), outcome, timeout=3600.0),
        client_app=fa.make_fedavg_client_app(config.out_dir / "clients"),
    )
    if errors or outcome.adapters is None:
        federated_failure("DP-FedAvg", errors)
    load_adapter_state(model, outcome.adapters)
    sigmas = [float(r["noise_multiplier"]) for rep in outcome.reports[:1] for r in rep.values()]
    perf["noise_multiplier"] = min(sigmas) if sigmas else math.nan
    return model_samples(ctx, cell, merged_model(model, ctx.loaded), perf)
