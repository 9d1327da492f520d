"""The data holder's side of a federated Private Evolution round: embed, vote, noise, mask.

The client runs only the embedder, never the generator. Each round it receives the candidates'
embeddings (checked against the manifest's hash, dimension and embedder fingerprint), finds each
private example's nearest candidates of its own label, builds an integer vote histogram, adds its
Skellam noise share and masks the result. The private embeddings are computed once per process,
reading the data file a chunk at a time (what stays in memory is one float vector and one label
index per record, not the records), and kept in memory only; raw records, embeddings and
unmasked votes are never logged or saved.

Replay protection: a node answers each round of a PE task at most once, in increasing order,
and refuses a change of the task's terms (privacy, rounds, embedder, labels, top_k) between
rounds. The whole task's epsilon is charged to the holder's budget store at its first round,
with the terms; both persist, so a restarted node holds the task to the same terms.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedsynth.client.budget import ClientBudget, canonical_terms, pe_task_terms
from fedsynth.client.data import iter_record_batches
from fedsynth.client.data_index import FileIdentity
from fedsynth.client.participant import SecureSumParticipant
from fedsynth.client.settings import ClientSettings
from fedsynth.protocol.embedding import load_embedder
from fedsynth.protocol.errors import (
    ModelMismatchError,
    PolicyViolationError,
    ProtocolError,
    StageOrderError,
)
from fedsynth.protocol.messages import vector_from_bytes
from fedsynth.protocol.pe import Embedder, vote_histogram
from fedsynth.protocol.pe_manifest import PERoundManifest, encode_votes
from fedsynth.protocol.verification import verify_manifest

PE_STATE_KEY = "fedsynth.pe"
PE_ROUNDS_KEY = "fedsynth.pe.rounds"

# Per-process cache of private embeddings (memory only, never persisted), keyed by the data
# file's identity and the embedder fingerprint, so later rounds cost only the vote. A process
# may serve several simulated nodes (Flower's simulation actors), hence a few entries.
_EMBEDDINGS: OrderedDict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = OrderedDict()
_EMBEDDINGS_MAX = 8
EMBED_CHUNK = 2048
"""Records read and embedded at a time: the texts of one chunk are all a voter holds at once."""


def embed_data_file(
    path: Path,
    labels: Sequence[str],
    embedder: Embedder,
    *,
    text_field: str = "text",
    label_field: str = "label",
    chunk: int = EMBED_CHUNK,
    skip_unknown_labels: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) embeddings and (n,) label indices of a data file, read ``chunk`` records at a time.

    The file is validated as :func:`~fedsynth.client.data.load_records` validates it (the
    error comes once the end is reached; nothing computed here leaves before that), or, with
    ``skip_unknown_labels`` (a holder's vote), rows of a label the round omits are left out.
    """
    index = {label: i for i, label in enumerate(labels)}
    parts: list[np.ndarray] = []
    label_ids: list[np.ndarray] = []
    batches = iter_record_batches(
        path,
        text_field=text_field,
        label_field=label_field,
        labels=labels,
        batch_size=chunk,
        skip_unknown_labels=skip_unknown_labels,
    )
    for batch in batches:
        parts.append(np.asarray(embedder.embed([r.text for r in batch])))
        label_ids.append(np.array([index[r.label] for r in batch], dtype=np.int64))
    if not parts:  # every record left out: this holder votes nothing
        return np.zeros((0, embedder.dim), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return _stack_releasing(parts), np.concatenate(label_ids)


def _stack_releasing(parts: list[np.ndarray]) -> np.ndarray:
    """``np.concatenate(parts)``, each part released once copied (the list is emptied).

    The result's pages are only touched as they are written, so the peak holds the
    embeddings about once plus a chunk, not twice as a plain concatenation does.
    """
    rows = sum(len(part) for part in parts)
    out = np.empty((rows, *parts[0].shape[1:]), dtype=np.result_type(*parts))
    at = 0
    parts.reverse()
    while parts:
        part = parts.pop()
        out[at : at + len(part)] = part
        at += len(part)
        del part
    return out


def embedder_matches(embedder: Embedder, manifest: PERoundManifest) -> None:
    """Refuse a manifest whose embedder differs from the local one."""
    if embedder.fingerprint != manifest.embedder_fingerprint:
        raise ModelMismatchError(
            f"embedder_fingerprint: manifest has {manifest.embedder_fingerprint}, the local "
            f"embedder {embedder.name!r} has {embedder.fingerprint}"
        )
    if embedder.dim != manifest.embedding_dim:
        raise ModelMismatchError(
            f"embedding_dim: manifest has {manifest.embedding_dim}, local embedder {embedder.dim}"
        )


class PEVoter(SecureSumParticipant[PERoundManifest]):
    """Handles the five secure-sum stages of one PE round for one node."""

    state_key = PE_STATE_KEY

    def __init__(
        self,
        settings: ClientSettings,
        *,
        node_id: int,
        embedder_loader: Callable[[], Embedder] | None = None,
    ) -> None:
        super().__init__(settings, node_id=node_id)
        self._embedder_loader = embedder_loader or (
            lambda: load_embedder(settings.embedder, settings.device)
        )

    # -- hooks -----------------------------------------------------------------------------------

    def accept(self, fields: dict[str, Any], state: RecordDict) -> tuple[PERoundManifest, bytes]:
        """Check manifest, candidates, embedder, round order, data and policy; nothing spent."""
        manifest = PERoundManifest.from_json(str(fields["manifest"]))
        verified = verify_manifest(manifest)  # noise and sensitivity recomputed by this holder
        candidates = self._candidates(manifest, fields.get("candidates"))
        manifest.check_candidates(candidates)
        if self.node_id not in manifest.node_ids:
            raise ProtocolError(f"node {self.node_id} is not a participant of {manifest.task_id}")
        self._check_round(manifest, state)
        n_records = self.record_count(manifest.labels)
        self.check_file_size()
        # A task already charged (earlier rounds) is not counted twice against the cap.
        self.check_policy(manifest, n_records, exclude=manifest.pe_task_id)
        embedder_matches(self._embedder_loader(), manifest)
        self.log_accepted("PE round", manifest.task_id, manifest.privacy.epsilon, verified)
        return manifest, candidates.tobytes()

    def restore(self, manifest_json: str) -> PERoundManifest:
        """The round manifest saved at setup."""
        return PERoundManifest.from_json(manifest_json)

    def contribution(self, task: PERoundManifest, payload: bytes, state: RecordDict) -> np.ndarray:
        """Votes of every private example for its nearest candidates, plus the noise share."""
        candidates = self._candidates(task, payload)
        embedder = self._embedder_loader()
        private, label_ids = self.private_embeddings(task, embedder)
        votes = vote_histogram(
            private,
            label_ids,
            candidates,
            n_labels=len(task.labels),
            per_label=task.per_label,
            top_k=task.top_k,
        )
        return encode_votes(
            votes,
            manifest=task,
            rng=self.rng(task.task_id),
            noise_seed=self.noise_seed(task, state),
        )

    def prepare(self, task: PERoundManifest, payload: bytes, state: RecordDict) -> None:
        """Before the charge: the round's order and terms, its candidates, the same embedder."""
        self._check_round(task, state)
        self._candidates(task, payload)
        embedder_matches(self._embedder_loader(), task)

    def committed(self, task: PERoundManifest, state: RecordDict) -> None:
        """Charge the task once and record the round before the data file is read.

        One transaction of the holder's store: the task's terms (persisted at its first
        charge), the round order and, at the first round, the policy with the lifetime cap are
        re-checked and the charge written together, so a refusal reads no record.
        """
        n_records = self.record_count(task.labels)
        ClientBudget(self.settings.budget_path).charge_pe_round(
            task,
            check=self.spend_check(task, n_records),
        )
        rounds = self._rounds_record(state)
        rounds[task.pe_task_id] = task.round
        if f"terms:{task.pe_task_id}" not in rounds:
            rounds[f"terms:{task.pe_task_id}"] = task.to_json()

    # -- helpers ---------------------------------------------------------------------------------

    def private_embeddings(
        self, manifest: PERoundManifest, embedder: Embedder
    ) -> tuple[np.ndarray, np.ndarray]:
        """(n, D) embeddings and (n,) label indices of the private records (cached in memory)."""
        path = self.settings.data_path
        version = FileIdentity.of(
            path, text_field=self.settings.text_field, label_field=self.settings.label_field
        )
        key = (version, tuple(manifest.labels), embedder.fingerprint)
        if key not in _EMBEDDINGS:
            _EMBEDDINGS[key] = embed_data_file(
                path,
                manifest.labels,
                embedder,
                text_field=self.settings.text_field,
                label_field=self.settings.label_field,
                skip_unknown_labels=True,
            )
            while len(_EMBEDDINGS) > _EMBEDDINGS_MAX:
                _EMBEDDINGS.popitem(last=False)
        _EMBEDDINGS.move_to_end(key)
        return _EMBEDDINGS[key]

    def _candidates(self, manifest: PERoundManifest, data: Any) -> np.ndarray:
        return vector_from_bytes(
            data, dtype="float32", length=manifest.dim * manifest.embedding_dim, name="candidates"
        ).reshape(manifest.dim, manifest.embedding_dim)

    def _rounds_record(self, state: RecordDict) -> ConfigRecord:
        if PE_ROUNDS_KEY not in state.config_records:
            state.config_records[PE_ROUNDS_KEY] = ConfigRecord()
        return state.config_records[PE_ROUNDS_KEY]

    def _check_round(self, manifest: PERoundManifest, state: RecordDict) -> None:
        """Refuse a stale or replayed round, or changed terms, before anything is computed."""
        rounds = self._rounds_record(state)
        budget = ClientBudget(self.settings.budget_path)
        last_in_state = rounds.get(manifest.pe_task_id, 0)
        last = max(
            int(last_in_state) if isinstance(last_in_state, int) else 0,
            budget.last_round(manifest.pe_task_id),
        )
        if manifest.round <= last:
            kind = "replayed" if manifest.round == last else "stale"
            raise StageOrderError(
                f"round {manifest.round} of PE task {manifest.pe_task_id!r} is {kind}: this node "
                f"already answered round {last}; answering again would release its votes twice"
            )
        # The terms come from the holder's store (they survive a restart of this node); the
        # node state only covers a node without a store (in-process tests).
        stored = budget.terms(manifest.pe_task_id)
        wanted = pe_task_terms(manifest)
        if stored is not None and canonical_terms(stored) != canonical_terms(wanted):
            raise PolicyViolationError(
                f"PE task {manifest.pe_task_id!r} was charged under other terms (privacy, "
                "rounds, embedder, labels or top_k) than this round's; refusing"
            )
        terms = rounds.get(f"terms:{manifest.pe_task_id}")
        if isinstance(terms, str) and not manifest.same_task_terms(
            PERoundManifest.from_json(terms)
        ):
            raise PolicyViolationError(
                f"PE task {manifest.pe_task_id!r} changed its terms (privacy, embedder, labels or "
                "top_k) after this node answered a round; refusing"
            )
