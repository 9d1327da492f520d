"""A data holder's local configuration (never sent to the coordinator)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedsynth.client.policy import ClientPolicy
from fedsynth.protocol.errors import IdentityError
from fedsynth.protocol.identity import (
    ROSTER_FILE,
    HolderIdentity,
    Roster,
    load_identity,
    simulated_member,
)


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
        identity: The holder's long-term signing identity (None: the node refuses every task).
        roster: The consortium roster the holder pins (None: the node refuses every task).
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
    identity: HolderIdentity | None = field(default=None, repr=False)
    roster: Roster | None = field(default=None, repr=False)


def load_credentials(
    node_config: Mapping[str, object], *, simulated_dir: Path | None = None, partition_id: int = 0
) -> tuple[HolderIdentity | None, Roster | None]:
    """The holder's signing identity and pinned roster, from its node config or a simulation.

    A deployed node names both files in its own node config (``identity-path``: its Ed25519
    private key in PEM, mode 0600; ``roster-path``: the consortium roster JSON). A simulated
    holder reads ``identity-<partition_id>.pem`` and ``roster.json`` from ``simulated_dir``
    (written by :func:`fedsynth.protocol.identity.write_simulated_consortium`). Without either,
    both are None and the node refuses every task.

    Raises:
        IdentityError: If only one of the two keys is set, or a file is missing or malformed.
    """
    identity_path, roster_path = node_config.get("identity-path"), node_config.get("roster-path")
    if identity_path or roster_path:
        if not (identity_path and roster_path):
            given = "identity-path" if identity_path else "roster-path"
            raise IdentityError(
                f"node config sets {given} alone; identity-path and roster-path go together"
            )
        roster = Roster.load(Path(str(roster_path)))
        return load_identity(Path(str(identity_path)), roster), roster
    if simulated_dir is not None and (Path(simulated_dir) / ROSTER_FILE).exists():
        return simulated_member(Path(simulated_dir), partition_id)
    return None, None
