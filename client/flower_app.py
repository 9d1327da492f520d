"""Flower ClientApp of a data holder: routes protocol stages to the Contributor.

Settings come from a factory argument (in-process simulation) or from the node config
(``flower-supernode --node-config "data-path=... budget-path=... policy-path=..."``); the run
config (the coordinator's) may name the model, never a privacy term. A refusing node replies
with its refusal's category only (policy, budget, model, data, protocol); the details go to
its own log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from fedsynth.client.contributor import ClientSettings, Contributor, refusal_reason
from fedsynth.client.participant import SecureSumParticipant
from fedsynth.client.pe_voter import PEVoter
from fedsynth.client.policy_file import attach_log_file, node_policy
from fedsynth.client.settings import load_credentials
from fedsynth.protocol.errors import (
    BudgetStoreError,
    ConfigError,
    FedSynthError,
    PolicyViolationError,
    RefusalCategory,
    category_of,
)

log = logging.getLogger(__name__)
ACTION = "dataset_vector"
PE_ACTION = "pe_votes"
ERROR_CODE_REFUSED = 4100


RUN_CONFIG_REFUSED = ("allow-non-private",)
"""Run-config keys a holder refuses outright: consent to non-private releases is the holder's."""
SIMULATION_NODE_KEY = "num-partitions"
"""A node-config key Flower's simulation engine sets on every simulated node."""


def settings_from_context(
    context: Context, *, default_budget_path: Path | None = None
) -> ClientSettings:
    """Build settings from ``node_config`` (deployment) or partition files (simulation).

    Privacy consent (``allow-non-private``) comes only from the holder's own node config: a run
    config, which the coordinator writes, that names it is refused. Booleans parse strictly.
    A node with its own data file (deployment) must name its ``budget-path``; only a simulated
    node (Flower sets ``num-partitions`` in its node config) reads a partition from the run's
    ``data-dir`` and keeps its store beside it.

    Raises:
        PolicyViolationError: The run config carries ``allow-non-private``.
        BudgetStoreError: No budget store: the node refuses every task.
        ConfigError: A node-config value does not parse (the message names key and value), or
            a node that is not simulated names no ``data-path``.
    """
    node = context.node_config
    run = context.run_config
    for key in RUN_CONFIG_REFUSED:
        if key in run:
            raise PolicyViolationError(
                f"run config {key}={run[key]!r}: the coordinator's run config may not enable "
                "non-private releases; only this holder's node config can"
            )
    budget_path = default_budget_path
    if "data-path" in node:
        data_path = Path(str(node["data-path"]))
    elif SIMULATION_NODE_KEY not in node:
        # The run config is the coordinator's: it may not choose which file on this machine
        # is read, nor (beside it) which budget store and identity hold this holder's word.
        raise ConfigError(
            "the node config names no data-path; a deployed SuperNode must set data-path (and "
            "budget-path) itself. Partitions under the run's data-dir are read only by "
            f"Flower's simulated nodes (whose node config carries {SIMULATION_NODE_KEY})"
        )
    else:
        from fedsynth.protocol.models import cache_root  # imports torch: only on this path

        data_dir = Path(str(run.get("data-dir") or cache_root() / "flwr-run" / "clients"))
        pid = int(node.get("partition-id", 0))
        data_path = data_dir / f"partition-{pid}.jsonl"
        budget_path = budget_path or data_dir / f"budget-{pid}.sqlite"
    # The holder's terms: its POLICY.toml (policy-path) or the inline keys; never the run's.
    local_policy = node_policy(node)
    if local_policy.budget_path is not None:
        budget_path = local_policy.budget_path
    if local_policy.log_file is not None:
        attach_log_file(local_policy.log_file)
    # Signing identity and pinned roster: identity-path and roster-path in the node config, or
    # a simulated consortium's files beside the partitions; without them every task is refused.
    identity, roster = load_credentials(
        node,
        simulated_dir=None if "data-path" in node else data_path.parent,
        partition_id=int(node.get("partition-id", 0)),
    )
    settings = ClientSettings(
        data_path=data_path,
        text_field=str(node.get("text-field", "text")),
        label_field=str(node.get("label-field", "label")),
        model=_named_by(node, run, "model", deployed="data-path" in node),
        embedder=_named_by(node, run, "embedder", deployed="data-path" in node),
        policy=local_policy.policy,
        budget_path=budget_path,
        identity=identity,
        roster=roster,
    )
    require_budget_store(settings)
    return settings


def _named_by(node: Any, run: Any, key: str, *, deployed: bool) -> str:
    """The model or embedder this node loads: its own config's, else the run's by name only.

    A deployed node (one with its own data-path) takes from the coordinator's run config only
    a packaged model or embedder by name, never a path on this machine or a hub id: which
    files a holder loads is the holder's choice, as its data file is. Nor a random-weight test
    model (``tiny-llama``) or a hashing embedder of any width (``hashing-<dim>``): its budget
    would buy a release no one can use, and a width the coordinator picks sizes the holder's
    memory.
    """
    from fedsynth.protocol.embedding import DEFAULT_EMBEDDER
    from fedsynth.protocol.models import DEFAULT_MODEL, is_packaged_model

    if key in node:
        return str(node[key])
    default, packaged = (
        (DEFAULT_MODEL, is_packaged_model)
        if key == "model"
        else (DEFAULT_EMBEDDER, lambda name: name == DEFAULT_EMBEDDER)
    )
    value = str(run.get(key) or default)
    if deployed and not packaged(value):
        raise PolicyViolationError(
            f"run config {key}={value!r}: the coordinator's run config may name only a "
            f"packaged {key}; set {key}= in this node's config to load another"
        )
    return value


def require_budget_store(settings: ClientSettings) -> None:
    """Refuse to take part without a budget store: budgets fail closed.

    Without one a node could neither charge epsilon against its lifetime cap nor refuse a task
    it already contributed to (a replay with fresh noise).
    """
    if settings.budget_path is None:
        raise BudgetStoreError(
            "budget-path is not set: this node keeps no privacy budget store and refuses every "
            'task; set budget-path="/path/to/budget.sqlite" in its node config'
        )


def make_client_app(
    settings: ClientSettings | None = None, *, partition_dir: Path | None = None
) -> ClientApp:
    """A ClientApp with fixed settings, or reading them from each node's context.

    With ``partition_dir`` (simulation), node ``partition-id`` i reads
    ``partition_dir/partition-i.jsonl`` and keeps its budget in ``budget-i.sqlite`` there.
    It signs with ``identity-i.pem`` and pins ``roster.json`` from there (see
    :func:`fedsynth.protocol.identity.write_simulated_consortium`).
    Whatever the source, a node without a budget store refuses every task.
    """
    app = ClientApp()

    def local_settings(context: Context) -> ClientSettings:
        pid = int(context.node_config.get("partition-id", 0))
        simulated_budget = (
            partition_dir / f"budget-{pid}.sqlite" if partition_dir is not None else None
        )
        if settings is None:
            local = settings_from_context(context, default_budget_path=simulated_budget)
        else:
            local = settings
        if partition_dir is not None:
            identity, roster = load_credentials({}, simulated_dir=partition_dir, partition_id=pid)
            local = replace(
                local,
                data_path=partition_dir / f"partition-{pid}.jsonl",
                budget_path=simulated_budget,
                identity=identity,
                roster=roster,
            )
        require_budget_store(local)
        return local

    def serve(
        msg: Message,
        context: Context,
        make: Callable[[ClientSettings], SecureSumParticipant[Any]],
    ) -> Message:
        stage = "setup"
        try:
            stage = str(msg.content.config_records["fedsynth"]["stage"])
            try:
                local = local_settings(context)
            except FedSynthError as exc:
                # The holder's own configuration refuses: the coordinator learns budget or
                # policy, never which key or value.
                log.warning("node %s refused stage %s: %s", context.node_id, stage, exc)
                category = category_of(exc)
                if category is not RefusalCategory.BUDGET:
                    category = RefusalCategory.POLICY
                return _refusal(msg, category.value)
            reply = make(local).handle(stage, msg.content, context.state)
        except FedSynthError as exc:
            log.warning("node %s refused stage %s: %s", context.node_id, stage, exc)
            return _refusal(msg, refusal_reason(exc))
        except Exception as exc:  # refused; logged here in full, never forwarded
            # An unexpected error's text may quote private data (a decode error quotes bytes of
            # the data file): the coordinator gets the category only.
            log.exception("node %s failed stage %s", context.node_id, stage)
            return _refusal(msg, refusal_reason(exc))
        return Message(reply, reply_to=msg)

    @app.query(ACTION)
    def dataset_vector(msg: Message, context: Context) -> Message:
        return serve(msg, context, lambda s: Contributor(s, node_id=context.node_id))

    @app.query(PE_ACTION)
    def pe_votes(msg: Message, context: Context) -> Message:
        return serve(msg, context, lambda s: PEVoter(s, node_id=context.node_id))

    return app


def _refusal(msg: Message, reason: str) -> Message:
    """The reply of a refusing node: a fixed code and the refusal's category only."""
    return Message(Error(code=ERROR_CODE_REFUSED, reason=reason), reply_to=msg)


app = make_client_app()
