"""The data holder's side of a dataset-vector round, as a stage-by-stage state machine.

Transport-agnostic: each stage takes the request's RecordDict and the node's persistent state
(a RecordDict that Flower keeps between messages) and returns the reply's RecordDict. Only
masked field elements, public keys and encrypted shares ever leave; raw records, features,
unmasked sums and noise shares stay in local variables and are never logged.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedsynth.client.data import Record, load_records
from fedsynth.client.policy import ClientBudget, ClientPolicy
from fedsynth.protocol.contribution import encode_contribution, integer_class_sums
from fedsynth.protocol.errors import (
    DataFileError,
    FedSynthError,
    ModelMismatchError,
    PolicyViolationError,
    ProtocolError,
    StageOrderError,
)
from fedsynth.protocol.features import extract_features
from fedsynth.protocol.manifest import TaskManifest
from fedsynth.protocol.messages import (
    Envelope,
    blobs_from_fields,
    blobs_to_fields,
    ints_from_field,
    keys_from_fields,
    pack,
    unpack,
    vector_from_bytes,
    vector_to_bytes,
)
from fedsynth.protocol.models import LoadedModel, load_model
from fedsynth.protocol.secagg import SecAggClient

log = logging.getLogger(__name__)
STATE_KEY = "fedsynth.client"


@dataclass(frozen=True)
class ClientSettings:
    """A data holder's local configuration (never sent to the coordinator).

    Attributes:
        data_path: Private data file (jsonl, csv or parquet).
        text_field: Column/key holding the text.
        label_field: Column/key holding the label.
        model: Packaged model name, local path or hub id; must match the manifest fingerprint.
        policy: The holder's privacy policy.
        budget_path: Persistent epsilon ledger (None: no lifetime tracking).
        batch_size: Forward-pass batch size.
        device: torch device (None: CUDA if present).
        seed: Fixed seed for tests only; None draws from the OS's secure randomness.
    """

    data_path: Path
    text_field: str = "text"
    label_field: str = "label"
    model: str = "gemma3-270m"
    policy: ClientPolicy = field(default_factory=ClientPolicy)
    budget_path: Path | None = None
    batch_size: int = 32
    device: str | None = None
    seed: int | None = None


def refusal_reason(exc: FedSynthError) -> str:
    """What a refusing client tells the coordinator: the error type and a safe message.

    Problems with the private data file (line numbers, label values, paths) stay in the
    holder's own log; the coordinator only learns that the data failed validation.
    """
    if isinstance(exc, DataFileError):
        return (
            f"{type(exc).__name__}: the holder's private data failed validation "
            "(details in the holder's local log)"
        )
    return f"{type(exc).__name__}: {exc}"


def manifest_model_matches(loaded: LoadedModel, manifest: TaskManifest) -> None:
    """Refuse a manifest whose model fingerprint differs from the local model's."""
    if loaded.fingerprint != manifest.model_fingerprint:
        raise ModelMismatchError(
            f"model_fingerprint: manifest has {manifest.model_fingerprint}, the local model "
            f"{loaded.name!r} has {loaded.fingerprint}"
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


class Contributor:
    """Handles the four stages for one node: setup, share_keys, masked_input, unmask."""

    def __init__(
        self,
        settings: ClientSettings,
        *,
        node_id: int,
        model_loader: Callable[[], LoadedModel] | None = None,
    ) -> None:
        self.settings = settings
        self.node_id = node_id
        self._model_loader = model_loader or (
            lambda: load_model(settings.model, device=settings.device)
        )
        self._records: list[Record] | None = None

    def _rng(self) -> np.random.Generator:
        seed = self.settings.seed
        if seed is None:
            return np.random.default_rng(secrets.randbits(128))
        return np.random.default_rng([seed, self.node_id % 2**32])

    def records(self, labels: tuple[str, ...]) -> list[Record]:
        """Load (once) and validate the private records against the task's labels."""
        if self._records is None:
            self._records = load_records(
                self.settings.data_path,
                text_field=self.settings.text_field,
                label_field=self.settings.label_field,
                labels=labels,
            )
        return self._records

    def handle(self, stage: str, content: RecordDict, state: RecordDict) -> RecordDict:
        """Dispatch one stage; raises a FedSynthError subclass on any refusal."""
        handlers = {
            "setup": self._setup,
            "share_keys": self._share_keys,
            "masked_input": self._masked_input,
            "unmask": self._unmask,
        }
        if stage not in handlers:
            raise ProtocolError(f"unknown stage {stage!r}; expected one of {list(handlers)}")
        return handlers[stage](content, state)

    # -- stages -------------------------------------------------------------------------------

    def _setup(self, content: RecordDict, state: RecordDict) -> RecordDict:
        fields = unpack(content, stage="setup")
        manifest = TaskManifest.from_json(str(fields["manifest"]))
        n_ref = len(manifest.labels) * len(manifest.layers) * manifest.hidden_size
        reference = vector_from_bytes(
            fields["reference"], dtype="float32", length=n_ref, name="reference"
        ).reshape(len(manifest.labels), len(manifest.layers), manifest.hidden_size)
        manifest.check_reference(reference)
        if self.node_id not in manifest.node_ids:
            raise ProtocolError(f"node {self.node_id} is not a participant of {manifest.task_id}")
        records = self.records(manifest.labels)
        if len(records) > manifest.max_records:
            raise ProtocolError(
                f"{len(records)} records exceed the task's max_records={manifest.max_records}"
            )
        budget = ClientBudget(self.settings.budget_path)
        refuse_repeated_task(budget, manifest)
        self.settings.policy.check(manifest, spent=budget.spent(), n_records=len(records))
        manifest_model_matches(self._model_loader(), manifest)
        client = SecAggClient(self.node_id, manifest.secagg_config())
        keys = client.setup()
        self._save(state, manifest, reference, client)
        log.info("node %s accepted task %s", self.node_id, manifest.task_id)
        return pack(
            Envelope(manifest.task_id, "setup"),
            {"enc_pk": keys.enc_pk, "mask_pk": keys.mask_pk, "n_labels": len(manifest.labels)},
        )

    def _share_keys(self, content: RecordDict, state: RecordDict) -> RecordDict:
        manifest, _reference, client = self._load(state)
        fields = unpack(content, task_id=manifest.task_id, stage="share_keys")
        ciphertexts = client.share_keys(keys_from_fields(fields))
        self._save(state, manifest, _reference, client)
        return pack(Envelope(manifest.task_id, "share_keys"), blobs_to_fields("ct:", ciphertexts))

    def _masked_input(self, content: RecordDict, state: RecordDict) -> RecordDict:
        manifest, reference, client = self._load(state)
        fields = unpack(content, task_id=manifest.task_id, stage="masked_input")
        budget = ClientBudget(self.settings.budget_path)
        refuse_repeated_task(budget, manifest)
        ciphertexts = blobs_from_fields("ct:", fields)
        records = self.records(manifest.labels)
        loaded = self._model_loader()
        manifest_model_matches(loaded, manifest)
        spec = manifest.feature_spec
        spec = type(spec)(
            spec.template, spec.layers, spec.max_text_tokens, self.settings.batch_size
        )
        features, _ = extract_features(
            loaded, [r.text for r in records], [r.label for r in records], spec
        )
        rng = self._rng()
        sums = integer_class_sums(
            features, [r.label for r in records], manifest=manifest, reference=reference, rng=rng
        )
        del features
        value = encode_contribution(sums, manifest=manifest, rng=rng)
        del sums
        masked = client.masked_input(ciphertexts, value)
        del value
        budget.charge(manifest)  # before the masked input leaves; not if masking was refused
        self._save(state, manifest, reference, client)
        return pack(Envelope(manifest.task_id, "masked_input"), {"masked": vector_to_bytes(masked)})

    def _unmask(self, content: RecordDict, state: RecordDict) -> RecordDict:
        manifest, reference, client = self._load(state)
        fields = unpack(content, task_id=manifest.task_id, stage="unmask")
        shares = client.unmask(
            ints_from_field(fields["survivors"], name="survivors"),
            ints_from_field(fields["dropped"], name="dropped"),
        )
        self._save(state, manifest, reference, client)
        return pack(Envelope(manifest.task_id, "unmask"), blobs_to_fields("sh:", shares))

    # -- state --------------------------------------------------------------------------------

    def _save(
        self, state: RecordDict, manifest: TaskManifest, reference: np.ndarray, client: SecAggClient
    ) -> None:
        secagg = {f"secagg.{k}": v for k, v in client.export_state().items()}
        state.config_records[STATE_KEY] = ConfigRecord(
            {
                "manifest": manifest.to_json(),
                "reference": vector_to_bytes(reference.reshape(-1)),
                **secagg,
            }
        )

    def _load(self, state: RecordDict) -> tuple[TaskManifest, np.ndarray, SecAggClient]:
        if STATE_KEY not in state.config_records:
            raise StageOrderError("no task in progress: the setup stage must come first")
        record = state.config_records[STATE_KEY]
        manifest = TaskManifest.from_json(str(record["manifest"]))
        n_ref = len(manifest.labels) * len(manifest.layers) * manifest.hidden_size
        reference = vector_from_bytes(record["reference"], dtype="float32", length=n_ref).reshape(
            len(manifest.labels), len(manifest.layers), manifest.hidden_size
        )
        secagg: dict[str, Any] = {
            k[len("secagg.") :]: record[k] for k in record if k.startswith("secagg.")
        }
        return manifest, reference, SecAggClient.from_state(secagg)
