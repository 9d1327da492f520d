"""The four secure-sum stages every kind of client contribution shares.

Subclasses (dataset vectors, PE votes) decide what a task looks like and what vector the client
contributes; this base class runs the key agreement, masking and unmasking and keeps the state
between stages in the node's persistent RecordDict. Only public keys, encrypted shares and
masked field elements ever leave the node.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from typing import Any, Generic, TypeVar

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedsynth.client.data import Record, load_records
from fedsynth.client.settings import ClientSettings
from fedsynth.protocol.errors import ProtocolError, StageOrderError
from fedsynth.protocol.messages import (
    Envelope,
    blobs_from_fields,
    blobs_to_fields,
    field_to_bytes,
    ints_from_field,
    keys_from_fields,
    pack,
    unpack,
)
from fedsynth.protocol.secagg import SecAggClient, SecureSumTask

TaskT = TypeVar("TaskT", bound=SecureSumTask)


class SecureSumParticipant(ABC, Generic[TaskT]):
    """One node's side of a secure-sum round; subclasses supply the task and the vector."""

    state_key: str = "fedsynth.participant"

    def __init__(self, settings: ClientSettings, *, node_id: int) -> None:
        self.settings = settings
        self.node_id = node_id
        self._records: list[Record] | None = None

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

    # -- hooks -----------------------------------------------------------------------------------

    @abstractmethod
    def accept(self, fields: dict[str, Any], state: RecordDict) -> tuple[TaskT, bytes]:
        """Validate a setup request against local policy; return the task and its payload."""

    @abstractmethod
    def restore(self, manifest_json: str, payload: bytes) -> TaskT:
        """Rebuild the task saved at setup."""

    @abstractmethod
    def contribution(self, task: TaskT, payload: bytes, state: RecordDict) -> np.ndarray:
        """This node's (noised) vector as field elements; called once per round."""

    def committed(self, task: TaskT, state: RecordDict) -> None:
        """Called after masking succeeded, before the masked vector leaves (charge budgets)."""

    def setup_reply_fields(self, task: TaskT) -> dict[str, Any]:
        """Extra public fields of the setup reply."""
        return {}

    # -- dispatch --------------------------------------------------------------------------------

    def rng(self) -> np.random.Generator:
        """Secure randomness, or a fixed per-node seed in tests."""
        seed = self.settings.seed
        if seed is None:
            return np.random.default_rng(secrets.randbits(128))
        return np.random.default_rng([seed, self.node_id % 2**32])

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

    def _setup(self, content: RecordDict, state: RecordDict) -> RecordDict:
        fields = unpack(content, stage="setup")
        task, payload = self.accept(fields, state)
        if self.node_id not in task.node_ids:
            raise ProtocolError(f"node {self.node_id} is not a participant of {task.task_id}")
        client = SecAggClient(self.node_id, task.secagg_config())
        keys = client.setup()
        self._save(state, task, payload, client)
        return pack(
            Envelope(task.task_id, "setup"),
            {"enc_pk": keys.enc_pk, "mask_pk": keys.mask_pk, **self.setup_reply_fields(task)},
        )

    def _share_keys(self, content: RecordDict, state: RecordDict) -> RecordDict:
        task, payload, client = self._load(state)
        fields = unpack(content, task_id=task.task_id, stage="share_keys")
        ciphertexts = client.share_keys(keys_from_fields(fields))
        self._save(state, task, payload, client)
        return pack(Envelope(task.task_id, "share_keys"), blobs_to_fields("ct:", ciphertexts))

    def _masked_input(self, content: RecordDict, state: RecordDict) -> RecordDict:
        task, payload, client = self._load(state)
        fields = unpack(content, task_id=task.task_id, stage="masked_input")
        ciphertexts = blobs_from_fields("ct:", fields)
        value = self.contribution(task, payload, state)
        masked = client.masked_input(ciphertexts, value)
        del value
        self.committed(task, state)
        self._save(state, task, payload, client)
        return pack(
            Envelope(task.task_id, "masked_input"),
            {"masked": field_to_bytes(masked, bits=task.secagg_config().bits)},
        )

    def _unmask(self, content: RecordDict, state: RecordDict) -> RecordDict:
        task, payload, client = self._load(state)
        fields = unpack(content, task_id=task.task_id, stage="unmask")
        shares = client.unmask(
            ints_from_field(fields["survivors"], name="survivors"),
            ints_from_field(fields["dropped"], name="dropped"),
        )
        self._save(state, task, payload, client)
        return pack(Envelope(task.task_id, "unmask"), blobs_to_fields("sh:", shares))

    # -- state -----------------------------------------------------------------------------------

    def _save(self, state: RecordDict, task: TaskT, payload: bytes, client: SecAggClient) -> None:
        secagg = {f"secagg.{k}": v for k, v in client.export_state().items()}
        state.config_records[self.state_key] = ConfigRecord(
            {"manifest": task.to_json(), "payload": payload, **secagg}
        )

    def _load(self, state: RecordDict) -> tuple[TaskT, bytes, SecAggClient]:
        if self.state_key not in state.config_records:
            raise StageOrderError("no task in progress: the setup stage must come first")
        record = state.config_records[self.state_key]
        payload = record["payload"]
        if not isinstance(payload, bytes):
            raise StageOrderError("corrupt node state: payload is not bytes")
        task = self.restore(str(record["manifest"]), payload)
        secagg: dict[str, Any] = {
            k[len("secagg.") :]: record[k] for k in record if k.startswith("secagg.")
        }
        return task, payload, SecAggClient.from_state(secagg)
