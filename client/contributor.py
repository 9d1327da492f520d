"""The data holder's side of a dataset-vector round, as a stage-by-stage state machine.

Transport-agnostic: each stage takes the request's RecordDict and the node's persistent state
(a RecordDict that Flower keeps between messages) and returns the reply's RecordDict. Only
masked field elements, public keys and encrypted shares ever leave; raw records, features,
unmasked sums and noise shares stay in local variables and are never logged.

The data file is streamed: setup validates and counts it in one pass that keeps no record, and
the contribution reads it again a chunk of records at a time (features, clipping and rounding
per chunk, added to running per-class integer sums), so a holder's memory grows with its batch
size, not with the number of its records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import RecordDict

from fedsynth.client.budget import ClientBudget
from fedsynth.client.data import Record, iter_record_batches
from fedsynth.client.participant import SecureSumParticipant
from fedsynth.client.settings import ClientSettings as ClientSettings
from fedsynth.protocol.contribution import ClassSumAccumulator, encode_contribution
from fedsynth.protocol.errors import (
    DataFileError,
    ModelMismatchError,
    PolicyViolationError,
    ProtocolError,
    category_of,
)
from fedsynth.protocol.features import check_fits_context, extract_features
from fedsynth.protocol.manifest import TaskManifest
from fedsynth.protocol.messages import (
    vector_from_bytes,
    vector_to_bytes,
)
from fedsynth.protocol.verification import verify_manifest

if TYPE_CHECKING:  # torch loads with the model, not when a key-exchange stage starts
    from fedsynth.protocol.models import LoadedModel

STATE_KEY = "fedsynth.client"
#: Forward batches per chunk of records read from the data file: the contribution's memory
#: grows with ``STREAM_BATCHES * batch_size`` records; sorting a chunk by length keeps padding low.
STREAM_BATCHES = 16


def refusal_reason(exc: BaseException) -> str:
    """What a refusing client tells the coordinator: the refusal's category, nothing else.

    A coordinator can provoke refusals at will, so their text must carry no private number
    (record counts, 1/n, lifetime spend) and no data-file detail (lines, labels, paths): the
    full message stays in the holder's own log.
    """
    return category_of(exc).value


def manifest_model_matches(loaded: LoadedModel, manifest: TaskManifest) -> None:
    """Refuse a manifest whose model fingerprint differs from the local model's."""
    if loaded.fingerprint != manifest.model_fingerprint:
        from fedsynth.protocol.models import tokenizer_fingerprint

        raise ModelMismatchError(
            f"model_fingerprint: manifest has {manifest.model_fingerprint}, the local model "
            f"{loaded.name!r} has {loaded.fingerprint} (it covers the weights and the "
            f"tokenizer; the local tokenizer's part is {tokenizer_fingerprint(loaded.tokenizer)})"
        )
    if loaded.hidden_size != manifest.hidden_size:
        raise ModelMismatchError(
            f"hidden_size: manifest has {manifest.hidden_size}, local model {loaded.hidden_size}"
        )


def refuse_repeated_task(budget: ClientBudget, manifest: TaskManifest) -> None:
    """Refuse a task this holder already contributed to: its budget charges a task id once.

    A second contribution (new session keys, fresh noise) would hand the coordinator another
    noisy sum of the same records without any further charge.
    """
    if budget.has(manifest.task_id):
        raise PolicyViolationError(
            f"task_id={manifest.task_id!r} was already contributed to (charged in "
            f"{budget.path}); a second contribution would spend its epsilon again"
        )


class Contributor(SecureSumParticipant[TaskManifest]):
    """A data holder's dataset-vector contribution: features, class sums, noise share."""

    state_key = STATE_KEY

    def __init__(
        self,
        settings: ClientSettings,
        *,
        node_id: int,
        model_loader: Callable[[], LoadedModel] | None = None,
    ) -> None:
        super().__init__(settings, node_id=node_id)
        self._model_loader = model_loader or (lambda: _load_model(settings.model, settings.device))

    def accept(self, fields: dict[str, Any], state: RecordDict) -> tuple[TaskManifest, bytes]:
        """Check the manifest, reference, data, policy, budget and model before any key."""
        manifest = TaskManifest.from_json(str(fields["manifest"]))
        verified = verify_manifest(manifest)  # noise and sensitivity recomputed by this holder
        reference = self._reference(manifest, fields["reference"], name="reference")
        manifest.check_reference(reference)
        if self.node_id not in manifest.node_ids:
            raise ProtocolError(f"node {self.node_id} is not a participant of {manifest.task_id}")
        n_records = self.record_count(manifest.labels)  # one pass; no record is kept
        self.check_file_size()
        budget = ClientBudget(self.settings.budget_path)
        refuse_repeated_task(budget, manifest)
        self.check_policy(manifest, n_records)
        self._checked_model(manifest)
        self.log_accepted("task", manifest.task_id, manifest.privacy.epsilon, verified)
        return manifest, vector_to_bytes(reference.reshape(-1))

    def setup_reply_fields(self, task: TaskManifest) -> dict[str, Any]:
        """The number of labels (a public fact of the manifest, echoed as a sanity check)."""
        return {"n_labels": len(task.labels)}

    def restore(self, manifest_json: str) -> TaskManifest:
        """The manifest saved at setup (its reference travels as the payload)."""
        return TaskManifest.from_json(manifest_json)

    def contribution(self, task: TaskManifest, payload: bytes, state: RecordDict) -> np.ndarray:
        """Per-record rounded class sums of every record, streamed, plus the noise share.

        The file is read a chunk at a time; each chunk's features are clipped, scaled, rounded
        record by record and added to running per-class integer sums, then dropped. Nothing is
        returned unless the whole file validated again and still holds no more than
        ``max_records`` records (and as many as at setup, when this object ran it).
        """
        manifest = task
        reference = self._reference(manifest, payload)
        loaded = self._model_loader()
        spec = manifest.feature_spec
        spec = type(spec)(
            spec.template, spec.layers, spec.max_text_tokens, self.settings.batch_size
        )
        rng = self.rng(manifest.task_id)
        accumulator = ClassSumAccumulator(manifest=manifest, reference=reference)
        for chunk in self.record_batches(manifest.labels, size=spec.batch_size * STREAM_BATCHES):
            texts, labels = [r.text for r in chunk], [r.label for r in chunk]
            features, _ = extract_features(loaded, texts, labels, spec)  # (chunk, L, H)
            accumulator.add(features, labels, rng=rng)
            del features, texts
        n_records = accumulator.n_records
        self.settings.policy.check_records(n_records)
        if self._counted is not None and n_records != self._counted:
            raise DataFileError(
                f"{self.settings.data_path}: the data file changed while this task ran: it "
                f"held {self._counted} records at setup and {n_records} now"
            )
        sums = accumulator.sums
        del accumulator
        value = encode_contribution(
            sums, manifest=manifest, rng=rng, noise_seed=self.noise_seed(task, state)
        )
        del sums
        return value

    def prepare(self, task: TaskManifest, payload: bytes, state: RecordDict) -> None:
        """Before the charge: not a repeated task, the same model, its context long enough."""
        refuse_repeated_task(ClientBudget(self.settings.budget_path), task)
        self._checked_model(task)

    def _checked_model(self, manifest: TaskManifest) -> LoadedModel:
        """The local model, refused unless it is the manifest's and its context fits the task."""
        loaded = self._model_loader()
        manifest_model_matches(loaded, manifest)
        check_fits_context(loaded, manifest.feature_spec)
        return loaded

    def committed(self, task: TaskManifest, state: RecordDict) -> None:
        """Charge the budget before the data file is read for this task.

        The point of no return: the policy (lifetime cap included) is re-checked inside the
        store's charging transaction, with the number of records counted at setup, so of two
        tasks set up at once only what fits is charged, and a refused charge reads no record.
        """
        n_records = self._counted
        if n_records is None:
            n_records = self.record_count(task.labels)
        ClientBudget(self.settings.budget_path).charge(
            task,
            check=self.spend_check(task, n_records),
        )

    def record_batches(self, labels: tuple[str, ...], *, size: int) -> Iterator[list[Record]]:
        """The data file's records, validated as they are read, ``size`` at a time.

        The iterator raises the file's error only at its end: what was computed from earlier
        batches must be discarded then.
        """
        return iter_record_batches(
            self.settings.data_path,
            text_field=self.settings.text_field,
            label_field=self.settings.label_field,
            labels=labels,
            batch_size=size,
            skip_unknown_labels=True,
        )

    @staticmethod
    def _reference(
        manifest: TaskManifest, data: Any, *, name: str = "state reference"
    ) -> np.ndarray:
        n_ref = len(manifest.labels) * len(manifest.layers) * manifest.hidden_size
        return vector_from_bytes(data, dtype="float32", length=n_ref, name=name).reshape(
            len(manifest.labels), len(manifest.layers), manifest.hidden_size
        )


def _load_model(name: str, device: str | None) -> LoadedModel:
    """Load the holder's model (imports torch and transformers on first use)."""
    from fedsynth.protocol.models import load_model

    return load_model(name, device=device)
