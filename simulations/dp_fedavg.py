"""DP-FedAvg baseline on Flower: holders fine-tune LoRA adapters with DP-SGD, the server averages.

Every holder trains the adapters with DP-SGD (Opacus) on its own records, the server averages
them (uniform weights), for R rounds.

Each holder calibrates its noise so that all its local steps over all rounds spend the target
(ε, δ); a record lives at one holder only, so every record gets (ε, δ)-DP against the server and
anyone who sees the averaged model (parallel composition). Uniform averaging keeps the holders'
sizes out of the model. The server runs in the same ServerApp shell as fedsynth's own tasks;
the holders answer Flower ``train`` messages.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedsynth.client.contributor import refusal_reason
from fedsynth.client.data import load_records
from fedsynth.protocol.errors import FedSynthError, ProtocolError
from fedsynth.protocol.features import PromptTemplate
from fedsynth.protocol.models import LoadedModel, load_model
from fedsynth.server.secure_round import Transport
from fedsynth.simulations.dp_finetune import (
    DPTrainSettings,
    adapter_state,
    dp_train,
    dpsgd_epsilon,
    dpsgd_noise_multiplier,
    encode_examples,
    load_adapter_state,
    lora_model,
    steps_per_epoch,
)

log = logging.getLogger(__name__)

TRAIN_ACTION = "train"


@dataclass(frozen=True)
class FedAvgTask:
    """What every holder needs to train one round (sent with the global adapters)."""

    model: str
    template: PromptTemplate
    epsilon: float
    delta: float
    rounds: int
    settings: DPTrainSettings

    def to_config(self, round_index: int) -> ConfigRecord:
        """The task as a Flower ConfigRecord (plain values)."""
        s = self.settings
        return ConfigRecord(
            {
                "model": self.model,
                "template": str(self.template.to_dict()),
                "epsilon": str(self.epsilon),
                "delta": self.delta,
                "rounds": self.rounds,
                "round": round_index,
                "epochs": s.epochs,
                "batch_size": s.batch_size,
                "learning_rate": s.learning_rate,
                "max_grad_norm": s.max_grad_norm,
                "lora_rank": s.lora_rank,
                "max_tokens": s.max_tokens,
            }
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> tuple[FedAvgTask, int]:
        """Inverse of :meth:`to_config`: the task and the round index."""
        import ast

        settings = DPTrainSettings(
            epochs=int(config["epochs"]),
            batch_size=int(config["batch_size"]),
            learning_rate=float(config["learning_rate"]),
            max_grad_norm=float(config["max_grad_norm"]),
            lora_rank=int(config["lora_rank"]),
            max_tokens=int(config["max_tokens"]),
        )
        task = cls(
            model=str(config["model"]),
            template=PromptTemplate.from_dict(ast.literal_eval(str(config["template"]))),
            epsilon=float(str(config["epsilon"])),
            delta=float(config["delta"]),
            rounds=int(config["rounds"]),
            settings=settings,
        )
        return task, int(config["round"])


def holder_noise(task: FedAvgTask, n_records: int) -> tuple[float, float, int]:
    """(noise multiplier, sample rate, steps per round) of one holder for the whole task."""
    s = task.settings
    sample_rate = min(s.batch_size, n_records) / n_records
    per_round = steps_per_epoch(n_records, s.batch_size) * s.epochs
    sigma = dpsgd_noise_multiplier(
        epsilon=task.epsilon,
        delta=task.delta,
        sample_rate=sample_rate,
        steps=per_round * task.rounds,
    )
    return sigma, sample_rate, per_round


_MODELS: dict[str, LoadedModel] = {}


def make_fedavg_client_app(partition_dir: Path) -> ClientApp:
    """The holders' side: node ``partition-id`` i trains on ``partition_dir/partition-i.jsonl``."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        pid = int(context.node_config.get("partition-id", 0))
        task, round_index = FedAvgTask.from_config(message.content.config_records["config"])
        try:
            records = load_records(partition_dir / f"partition-{pid}.jsonl")
        except FedSynthError as exc:  # the server learns only the reason, never the data
            log.warning("holder %s: %s", pid, exc)
            raise ProtocolError(refusal_reason(exc)) from None
        if task.model not in _MODELS:
            _MODELS[task.model] = load_model(task.model)
        loaded = _MODELS[task.model]
        model = lora_model(loaded, rank=task.settings.lora_rank)
        adapters = message.content.array_records["adapters"].to_torch_state_dict()
        load_adapter_state(model, adapters)
        dataset = encode_examples(loaded, records, task.template, task.settings.max_tokens)
        sigma, sample_rate, _ = holder_noise(task, len(records))
        taken = dp_train(
            model,
            dataset,
            settings=task.settings,
            noise_multiplier=sigma,
            epochs=task.settings.epochs,
            seed=1000 * pid + round_index,
        )
        spent = dpsgd_epsilon(
            noise_multiplier=sigma,
            delta=task.delta,
            sample_rate=sample_rate,
            steps=taken * (round_index + 1),
        )
        content = RecordDict(
            {
                "adapters": ArrayRecord(torch_state_dict=adapter_state(model)),
                "report": ConfigRecord(
                    {"noise_multiplier": sigma, "epsilon_spent": str(spent), "steps": taken}
                ),
            }
        )
        return Message(content=content, reply_to=message)

    return app


@dataclass
class FedAvgOutcome:
    """The server's result: the final global adapters and per-round holder reports."""

    adapters: dict[str, torch.Tensor] | None = None
    reports: list[dict[int, dict[str, Any]]] = field(default_factory=list)


def make_fedavg_job(
    task: FedAvgTask, initial: dict[str, torch.Tensor], outcome: FedAvgOutcome, *, timeout: float
) -> Any:
    """The server's half: R rounds of send global adapters → DP local training → mean."""

    def job(transport: Transport, nodes: tuple[int, ...], _context: Any) -> None:
        train = getattr(transport, "for_action", lambda _a: transport)(TRAIN_ACTION)
        state = initial
        for r in range(task.rounds):
            requests = {
                node: RecordDict(
                    {"adapters": ArrayRecord(torch_state_dict=state), "config": task.to_config(r)}
                )
                for node in nodes
            }
            replies = train.exchange(f"round-{r}", requests, timeout=timeout)
            updates = [rep.content for rep in replies.values() if rep.content is not None]
            if not updates:
                errors = "; ".join(str(rep.error) for rep in replies.values())
                raise ProtocolError(f"DP-FedAvg round {r}: no holder answered ({errors})")
            states = [u.array_records["adapters"].to_torch_state_dict() for u in updates]
            state = {k: torch.stack([s[k] for s in states]).mean(dim=0) for k in state}
            outcome.reports.append(
                {
                    node: dict(rep.content.config_records["report"])
                    for node, rep in replies.items()
                    if rep.content is not None
                }
            )
            log.info("DP-FedAvg round %d/%d: %d holders", r + 1, task.rounds, len(updates))
        outcome.adapters = state

    return job
