"""Flower ClientApp of a data holder: routes protocol stages to the Contributor.

Settings come from a factory argument (in-process simulation) or from the node config
(``flower-supernode --node-config "data-path=... model=..."``) and the run config.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from fedsynth.client.contributor import ClientSettings, Contributor, refusal_reason
from fedsynth.client.participant import SecureSumParticipant
from fedsynth.client.pe_voter import PEVoter
from fedsynth.client.policy import ClientPolicy
from fedsynth.protocol.errors import FedSynthError
from fedsynth.protocol.models import cache_root

log = logging.getLogger(__name__)
ACTION = "dataset_vector"
PE_ACTION = "pe_votes"
ERROR_CODE_REFUSED = 4100


def settings_from_context(context: Context) -> ClientSettings:
    """Build settings from ``node_config`` (deployment) or partition files (simulation)."""
    node = context.node_config
    run = context.run_config
    if "data-path" in node:
        data_path = Path(str(node["data-path"]))
    else:
        data_dir = Path(str(run.get("data-dir") or cache_root() / "flwr-run" / "clients"))
        data_path = data_dir / f"partition-{int(node.get('partition-id', 0))}.jsonl"
    budget = node.get("budget-path")
    return ClientSettings(
        data_path=data_path,
        text_field=str(node.get("text-field", "text")),
        label_field=str(node.get("label-field", "label")),
        model=str(node.get("model", run.get("model", "gemma3-270m"))),
        embedder=str(node.get("embedder", run.get("embedder", "all-minilm-l6-v2"))),
        policy=ClientPolicy(
            max_epsilon_per_task=float(node.get("max-epsilon", 8.0)),
            allow_non_private=bool(
                node.get("allow-non-private", run.get("allow-non-private", False))
            ),
        ),
        budget_path=Path(str(budget)) if budget else None,
    )


def make_client_app(
    settings: ClientSettings | None = None, *, partition_dir: Path | None = None
) -> ClientApp:
    """A ClientApp with fixed settings, or reading them from each node's context.

    With ``partition_dir`` (simulation), node ``partition-id`` i reads
    ``partition_dir/partition-i.jsonl`` and keeps its budget in ``budget-i.jsonl`` there.
    """
    app = ClientApp()

    def local_settings(context: Context) -> ClientSettings:
        local = settings if settings is not None else settings_from_context(context)
        if partition_dir is not None:
            pid = int(context.node_config.get("partition-id", 0))
            local = replace(
                local,
                data_path=partition_dir / f"partition-{pid}.jsonl",
                budget_path=partition_dir / f"budget-{pid}.jsonl",
            )
        return local

    def serve(msg: Message, context: Context, participant: SecureSumParticipant[Any]) -> Message:
        stage = str(msg.content.config_records["fedsynth"]["stage"])
        try:
            reply = participant.handle(stage, msg.content, context.state)
        except FedSynthError as exc:
            log.warning("node %s refused stage %s: %s", context.node_id, stage, exc)
            return Message(Error(code=ERROR_CODE_REFUSED, reason=refusal_reason(exc)), reply_to=msg)
        return Message(reply, reply_to=msg)

    @app.query(ACTION)
    def dataset_vector(msg: Message, context: Context) -> Message:
        return serve(msg, context, Contributor(local_settings(context), node_id=context.node_id))

    @app.query(PE_ACTION)
    def pe_votes(msg: Message, context: Context) -> Message:
        return serve(msg, context, PEVoter(local_settings(context), node_id=context.node_id))

    return app


app = make_client_app()
