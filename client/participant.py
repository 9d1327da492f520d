"""The five secure-sum stages every kind of client contribution shares.

Subclasses (dataset vectors, PE votes) decide what a task looks like and what vector the client
contributes; this base class runs the signed key agreement, masking, the consistency check and
unmasking, and keeps the state between stages in the node's persistent RecordDict. Only signed
public keys, encrypted shares, share commitments, masked field elements and a signature over the
survivor set ever leave the node. A node without a signing identity and a pinned roster refuses
every task.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedsynth.client.budget import ClientBudget, SpendCheck
from fedsynth.client.data_index import DataIndex, index_path_for
from fedsynth.client.policy import PolicySubject
from fedsynth.client.settings import ClientSettings
from fedsynth.protocol.contribution import noise_schedule
from fedsynth.protocol.errors import (
    IdentityError,
    PolicyViolationError,
    ProtocolError,
    StageOrderError,
)
from fedsynth.protocol.exact_noise import (
    NOISE_EXCESS_FIELD,
    NOISE_SEED_FIELD,
    REMOVAL_FIELD,
    REMOVAL_MODES,
    REMOVAL_SEED,
    REMOVAL_UPLOAD,
    SEED_BYTES,
    excess_noise,
    revealed_seed,
)
from fedsynth.protocol.identity import HolderIdentity, Roster
from fedsynth.protocol.messages import (
    Envelope,
    blobs_from_fields,
    blobs_to_fields,
    check_clock,
    field_to_bytes,
    ints_from_field,
    ints_to_bytes,
    keys_from_fields,
    pack,
    unpack,
)
from fedsynth.protocol.secagg import ROUND_STAGES, SecAggClient, SecureSumTask, Stage
from fedsynth.protocol.secagg.stages import check_stage
from fedsynth.protocol.verification import VerifiedTerms

log = logging.getLogger(__name__)

OVERSTATED_EPSILON_RATIO = 0.5
"""A task whose noise gives less than this share of its stated epsilon is logged as a warning."""
_clock = time.monotonic  # replaced in tests
_sleep = time.sleep
TaskT = TypeVar("TaskT", bound=SecureSumTask)


class SecureSumParticipant(ABC, Generic[TaskT]):
    """One node's side of a secure-sum round; subclasses supply the task and the vector."""

    state_key: str = "fedsynth.participant"

    def __init__(self, settings: ClientSettings, *, node_id: int) -> None:
        self.settings = settings
        self.node_id = node_id
        self._counted: int | None = None  # records found by this object's validation pass
        self.file_records: int | None = None  # every record of the file, whatever its label

    def record_count(self, labels: tuple[str, ...]) -> int:
        """The data file's records with the task's labels, the whole file validated.

        Read from the holder's :class:`~fedsynth.client.data_index.DataIndex`: the file is
        validated and counted once per version (one streaming pass that keeps no record), so
        how long a setup takes does not grow with the file for a coordinator to time. Records
        whose label the task does not list are left out, not refused (whether the file holds
        such a label is private); the holder's log says how many. :attr:`file_records` keeps
        the count of every record, for :meth:`check_file_size`.
        """
        counts = DataIndex(index_path_for(self.settings.budget_path)).counts(
            self.settings.data_path,
            text_field=self.settings.text_field,
            label_field=self.settings.label_field,
        )
        self._counted = counts.of(labels)
        self.file_records = counts.total
        self._log_skipped(counts.total - self._counted)
        return self._counted

    def log_accepted(
        self, what: str, task_id: str, epsilon: float, verified: VerifiedTerms
    ) -> None:
        """Log an accepted task with the epsilon this holder's own accountant gives its noise.

        The budget is charged the stated epsilon (the release states it too). A coordinator
        stating far more than its noise gives only overcharges this holder, never weakens its
        guarantee, but the operator should see it: a warning names both figures.
        """
        achieved = verified.epsilon
        if math.isfinite(epsilon) and achieved < OVERSTATED_EPSILON_RATIO * epsilon:
            log.warning(
                "node %s: %s %s states epsilon=%g but its noise gives epsilon=%.4g by this "
                "holder's accountant; the budget is charged the stated %g",
                self.node_id,
                what,
                task_id,
                epsilon,
                achieved,
                epsilon,
            )
        log.info(
            "node %s accepted %s %s (stated epsilon=%g; this holder's accountant: %.6g)",
            self.node_id,
            what,
            task_id,
            epsilon,
            achieved,
        )

    def check_file_size(self) -> None:
        """The holder's ``max_records`` against its whole file (after :meth:`record_count`).

        Every record counts, whatever its label: compared with only the task's labels, a
        coordinator could learn how many records each label set holds from free refusals.
        """
        if self.file_records is None:
            raise RuntimeError("check_file_size before record_count")
        self.settings.policy.check_records(self.file_records)

    def check_policy(
        self, task: PolicySubject, n_records: int, *, exclude: str | None = None
    ) -> None:
        """This holder's policy against ``task``, with its spending so far.

        ``exclude``: a task whose charge must not count against itself (a PE task charged at an
        earlier round).
        """
        spent, spent_delta = ClientBudget(self.settings.budget_path).spending(exclude=exclude)
        self.settings.policy.check(task, spent=spent, spent_delta=spent_delta, n_records=n_records)

    def spend_check(self, task: PolicySubject, n_records: int) -> SpendCheck:
        """The policy re-check the budget store runs inside its charging transaction."""
        return lambda spent, spent_delta: self.settings.policy.check(
            task, spent=spent, spent_delta=spent_delta, n_records=n_records
        )

    @staticmethod
    def _log_skipped(count: int) -> None:
        """Tell the holder's own log (never the coordinator) how many records were left out."""
        if count:
            log.warning(
                "%d record(s) carry a label this task does not list; they are left out of it",
                count,
            )

    # -- hooks -----------------------------------------------------------------------------------

    @abstractmethod
    def accept(self, fields: dict[str, Any], state: RecordDict) -> tuple[TaskT, bytes]:
        """Validate a setup request against local policy; return the task and its payload."""

    @abstractmethod
    def restore(self, manifest_json: str) -> TaskT:
        """Rebuild the task saved at setup (its payload is kept beside it, not inside)."""

    @abstractmethod
    def contribution(self, task: TaskT, payload: bytes, state: RecordDict) -> np.ndarray:
        """This node's (noised) vector as field elements; called once per round."""

    def noise_seed(self, task: TaskT, state: RecordDict) -> bytes | None:
        """This round's chain seed of an exact-sharing task (made at masked_input), else None."""
        record = state.config_records.get(self._noise_key)
        if record is None or record.get("task_id") != task.task_id:
            return None
        seed = record.get("seed")
        return seed if isinstance(seed, bytes) else None

    def prepare(self, task: TaskT, payload: bytes, state: RecordDict) -> None:
        """Checks of the masked-input stage that read no record (the model, a repeated task).

        Run before :meth:`committed`, so a refusal here charges nothing and depends on public
        terms only.
        """

    def committed(self, task: TaskT, state: RecordDict) -> None:
        """Charge budgets; called before :meth:`contribution` reads the data file."""

    def setup_reply_fields(self, task: TaskT) -> dict[str, Any]:
        """Extra public fields of the setup reply."""
        return {}

    # -- dispatch --------------------------------------------------------------------------------

    @property
    def _noise_key(self) -> str:
        return f"{self.state_key}.noise"

    def _new_noise_seed(self, task_id: str) -> bytes:
        """A fresh chain seed (exact noise sharing), fixed per node and task in seeded runs."""
        seed = self.settings.seed
        if seed is None:
            return secrets.token_bytes(SEED_BYTES)
        return np.random.default_rng(self._seed_words(seed, task_id, 1)).bytes(SEED_BYTES)

    def rng(self, task_id: str) -> np.random.Generator:
        """Secure randomness, or a seed fixed per node and task in seeded runs."""
        seed = self.settings.seed
        if seed is None:
            return np.random.default_rng(secrets.randbits(128))
        return np.random.default_rng(self._seed_words(seed, task_id))

    def _seed_words(self, seed: int, task_id: str, *extra: int) -> list[int]:
        """A seeded run's generator words: the seed, the node and the task.

        A PE round's task id names its round, so a seeded holder's noise differs between tasks
        and rounds (the same noise twice would cancel in the difference of two releases).
        """
        digest = hashlib.sha256(task_id.encode("utf-8")).digest()
        task_words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
        return [seed, self.node_id % 2**32, *task_words, *extra]

    def credentials(self) -> tuple[HolderIdentity, Roster]:
        """This holder's signing identity and pinned roster; without them it takes no task.

        Raises:
            IdentityError: If either is missing or the identity is not the roster's.
        """
        identity, roster = self.settings.identity, self.settings.roster
        if identity is None or roster is None:
            missing = [n for n, v in (("identity", identity), ("roster", roster)) if v is None]
            raise IdentityError(
                f"this holder has no {' and no '.join(missing)}: it cannot sign its round keys "
                "or check its peers', so it refuses every task (set identity-path and "
                "roster-path in the node config)"
            )
        if identity.name not in roster or roster.key_of(identity.name) != identity.public_key:
            raise IdentityError(
                f"identity {identity.name!r} is not in the pinned roster with this key"
            )
        return identity, roster

    def handle(self, stage: str, content: RecordDict, state: RecordDict) -> RecordDict:
        """Dispatch one stage; raises a FedSynthError subclass on any refusal."""
        handlers = {
            Stage.SETUP: self._setup,
            Stage.SHARE_KEYS: self._share_keys,
            Stage.MASKED_INPUT: self._masked_input,
            Stage.CONSISTENCY: self._consistency,
            Stage.UNMASK: self._unmask,
        }
        if stage not in {s.value for s in ROUND_STAGES}:
            raise ProtocolError(
                f"unknown stage {stage!r}; expected one of {[s.value for s in ROUND_STAGES]}"
            )
        handler = handlers[Stage(stage)]
        if stage != Stage.MASKED_INPUT.value:
            check_clock(content, now=time.time())  # before anything is read, computed or charged
            return handler(content, state)
        # The one stage whose work grows with the records: its answer, a refusal included,
        # leaves at the holder's fixed time, not when the work is done.
        arrived = _clock()
        try:
            check_clock(content, now=time.time())
            reply = handler(content, state)
        except Exception:
            self._hold_reply(arrived)
            raise
        self._hold_reply(arrived)
        return reply

    def _hold_reply(self, arrived: float) -> None:
        """Wait until ``masked_input_reply_s`` after the request arrived (the policy's term).

        Past it already, the reply goes at once and the holder's log says that its time now
        depends on the data (the term is too short for this file).
        """
        reply_s = self.settings.policy.masked_input_reply_s
        elapsed = _clock() - arrived
        # The holder's own log only: what to set masked_input_reply_s above.
        log.info("masked input computed in %.1f s (masked_input_reply_s=%g)", elapsed, reply_s)
        if not reply_s:
            return
        if elapsed < reply_s:
            _sleep(reply_s - elapsed)
        else:
            log.warning(
                "the masked input took %.1f s, beyond masked_input_reply_s=%g: this reply's "
                "time depends on the data; raise masked_input_reply_s in the policy",
                elapsed,
                reply_s,
            )

    def _colluders(self, task: TaskT) -> int:
        """Colluding holders the threshold floor guards against: this holder's or the task's."""
        return max(self.settings.policy.max_colluders, task.privacy.colluders)

    def _secagg_client(self, task: TaskT) -> SecAggClient:
        identity, roster = self.credentials()
        return SecAggClient(
            self.node_id,
            task.secagg_config(),
            identity=identity,
            roster=roster,
            max_colluders=self._colluders(task),
        )

    def _setup(self, content: RecordDict, state: RecordDict) -> RecordDict:
        self.credentials()  # refuse before reading the task, the data or the model
        fields = unpack(content, stage=Stage.SETUP.value)
        task, payload = self.accept(fields, state)
        if self.node_id not in task.node_ids:
            raise ProtocolError(f"node {self.node_id} is not a participant of {task.task_id}")
        client = self._secagg_client(task)  # refuses a threshold below the safe floor
        keys = client.setup()
        self._save(state, task, payload, client)
        return pack(
            Envelope(task.task_id, Stage.SETUP.value),
            {**keys.to_dict(), **self.setup_reply_fields(task)},
        )

    def _share_keys(self, content: RecordDict, state: RecordDict) -> RecordDict:
        task, payload, client = self._load(state)
        fields = unpack(content, task_id=task.task_id, stage=Stage.SHARE_KEYS.value)
        shares = client.share_keys(keys_from_fields(fields))
        self._save(state, task, payload, client)
        return pack(
            Envelope(task.task_id, Stage.SHARE_KEYS.value),
            {
                **blobs_to_fields("ct:", shares.ciphertexts),
                **blobs_to_fields("cm:", shares.commitments),
            },
        )

    def _masked_input(self, content: RecordDict, state: RecordDict) -> RecordDict:
        task, payload, client = self._load(state)
        fields = unpack(content, task_id=task.task_id, stage=Stage.MASKED_INPUT.value)
        ciphertexts = blobs_from_fields("ct:", fields)
        # Every sender's share authenticated before anything is paid: a coordinator sending
        # garbage is refused for free (no record is read), not after the budget is charged.
        client.check_ciphertexts(ciphertexts)
        # The holders that exchanged keys (each sender's share authenticated above): listing
        # roster members who never take part does not make K.
        exchanged = len(ciphertexts) + 1
        if exchanged < self.settings.policy.min_holders:
            raise PolicyViolationError(
                f"{exchanged} holders exchanged keys, below min_holders="
                f"{self.settings.policy.min_holders}"
            )
        if noise_schedule(task.privacy, clients=len(task.node_ids)) is not None:
            state.config_records[self._noise_key] = ConfigRecord(
                {"task_id": task.task_id, "seed": self._new_noise_seed(task.task_id)}
            )
        self.prepare(task, payload, state)
        # Charged before the data file is read for this task: whatever the computation on the
        # records then does, a refusal included, it is paid for, so a coordinator cannot repeat
        # a task under fresh ids to read a data-dependent failure for free.
        self.committed(task, state)
        value = self.contribution(task, payload, state)
        masked = client.masked_input(ciphertexts, value)
        del value
        self._save(state, task, payload, client)
        return pack(
            Envelope(task.task_id, Stage.MASKED_INPUT.value),
            {"masked": field_to_bytes(masked, bits=task.secagg_config().bits)},
        )

    def _check_survivor_count(self, survivors: Sequence[int]) -> None:
        """Refuse to sign a sum over fewer holders than ``min_holders``, dropouts included.

        The policy's floor on K would mean little if the coordinator could declare holders
        dropped after their masked input and release a sum over fewer (still at least t).
        Checked at consistency only: unmask releases shares only for the set signed there.
        """
        floor = self.settings.policy.min_holders
        count = len(set(survivors))
        if count < floor:
            raise PolicyViolationError(
                f"{count} survivors would make the sum, below min_holders={floor}"
            )

    def _consistency(self, content: RecordDict, state: RecordDict) -> RecordDict:
        task, payload, client = self._load(state)
        fields = unpack(content, task_id=task.task_id, stage=Stage.CONSISTENCY.value)
        if "survivors" not in fields:
            raise ProtocolError("consistency request lacks 'survivors'")
        survivors = ints_from_field(fields["survivors"], name="survivors")
        check_stage(client.stage, Stage.CONSISTENCY, "consistency")
        self._check_survivor_count(survivors)
        signature = client.consistency(survivors)
        self._save(state, task, payload, client)
        return pack(Envelope(task.task_id, Stage.CONSISTENCY.value), {"signature": signature})

    def _unmask(self, content: RecordDict, state: RecordDict) -> RecordDict:
        task, payload, client = self._load(state)
        fields = unpack(content, task_id=task.task_id, stage=Stage.UNMASK.value)
        for key in ("survivors", "dropped"):
            if key not in fields:
                raise ProtocolError(f"unmask request lacks {key!r}")
        survivors = ints_from_field(fields["survivors"], name="survivors")
        removal = fields.get(REMOVAL_FIELD, REMOVAL_SEED)
        if removal not in REMOVAL_MODES:
            raise ProtocolError(
                f"unmask request asks for noise removal {removal!r}; expected one of "
                f"{list(REMOVAL_MODES)}"
            )
        shares = client.unmask(
            survivors,
            ints_from_field(fields["dropped"], name="dropped"),
            signatures=blobs_from_fields("sg:", fields),
        )
        self._save(state, task, payload, client)
        reply: dict[str, Any] = blobs_to_fields("sh:", shares)
        # The survivor set is the one t holders signed (checked by unmask above): revealing the
        # excess noise of len(survivors) inputs leaves exactly the target in their sum.
        schedule = noise_schedule(task.privacy, clients=len(task.node_ids))
        seed = self.noise_seed(task, state)
        if schedule is not None and seed is not None:
            if removal == REMOVAL_UPLOAD:
                # The sum of the same components the seed would give, drawn here: the
                # coordinator learns their total only, and saves redrawing them.
                excess = excess_noise(seed, schedule, len(survivors), task.dim)
                if excess is not None:
                    reply[NOISE_EXCESS_FIELD] = ints_to_bytes(excess)
            else:
                revealed = revealed_seed(seed, schedule, len(survivors))
                if revealed is not None:
                    reply[NOISE_SEED_FIELD] = revealed
        # The chain seed has done its work (unmask is answered once): keep no noise secret.
        if self._noise_key in state.config_records:
            del state.config_records[self._noise_key]
        return pack(Envelope(task.task_id, Stage.UNMASK.value), reply)

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
        task = self.restore(str(record["manifest"]))
        secagg: dict[str, Any] = {
            k[len("secagg.") :]: record[k] for k in record if k.startswith("secagg.")
        }
        identity, roster = self.credentials()
        client = SecAggClient.from_state(
            secagg,
            identity=identity,
            roster=roster,
            max_colluders=self._colluders(task),
        )
        return task, payload, client
