"""The federated dataset-vector demo: K simulated holders, one DP release, synthetic data, scores.

Flow: split the bundled corpus into a private training part (partitioned across the holders)
and a held-out test part; the coordinator computes the public reference (prior texts); the
holders and the coordinator run the real client and server code in Flower's simulation (secure
sum, distributed noise) for the target epsilon and, as a ceiling, a non-private release; then the
coordinator generates labelled texts from the prior and from both releases, and the evaluator
scores them against the real data (label fidelity, train-on-synthetic accuracy, embedding
Fréchet distance).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedsynth.client.contributor import ClientSettings
from fedsynth.client.data import MAX_CHARS, Record, load_records
from fedsynth.client.policy import ClientPolicy
from fedsynth.protocol.cli_common import library_log_level
from fedsynth.protocol.errors import ConfigError, DataFileError, TooFewParticipantsError
from fedsynth.protocol.features import PromptTemplate, check_instruction, longest_prompt_tokens
from fedsynth.protocol.identity import write_simulated_consortium
from fedsynth.protocol.models import DEFAULT_MODEL, LoadedModel, cache_root, load_model
from fedsynth.protocol.secagg import Stage, min_safe_threshold
from fedsynth.server.backends import (
    GenerationBackend,
    check_backend_name,
    check_precision_backend,
    open_backend,
)
from fedsynth.server.coordinator import (
    PublicReference,
    TaskConfig,
    compute_public_reference,
    epsilon_label,
)
from fedsynth.server.flower_app import make_server_app
from fedsynth.server.generation import GenerationConfig
from fedsynth.server.ledger import PrivacyLedger, ledger_path
from fedsynth.server.public_basis import PublicBasis, basis_from_texts
from fedsynth.server.release import Release, check_contrast, check_strength
from fedsynth.server.secure_round import Transport
from fedsynth.server.selection import check_select, select_caution
from fedsynth.server.snr import DEFAULT_MIN_SIGNAL_SHARE, check_min_signal_share
from fedsynth.server.synthesize import (
    SyntheticSample,
    check_shots,
    check_variants,
    floor_samples,
    generate_from_release,
    shots_span,
    variant_templates,
)
from fedsynth.server.task_runner import run_vector_release
from fedsynth.server.vocabulary import check_vocabulary
from fedsynth.simulations.datasets import json_line, load_corpus, subsample_per_label, write_jsonl
from fedsynth.simulations.splits import DataSplit, holder_partitions, judge_set, split_records

log = logging.getLogger(__name__)
MODES = ("distributed", "central", "local")

TEMPLATES: dict[str, PromptTemplate] = {
    "rotten_tomatoes": PromptTemplate(
        instruction="Here is a {label} movie review snippet:\n",
        label_names=(("positive", "positive"), ("negative", "negative")),
    ),
    "bbc_news": PromptTemplate(
        instruction="Here is a BBC News article about {label}:\n",
        label_names=(
            ("business", "business"),
            ("entertainment", "entertainment"),
            ("politics", "politics"),
            ("sports", "sports"),
            ("tech", "technology"),
        ),
    ),
}


TEXT_TOKENS: dict[str, int] = {"rotten_tomatoes": 48, "bbc_news": 128}
"""The task's declared maximum record length in tokens, per bundled corpus (public, like the
template): features read at most this many tokens of a record and samples are as long at most.
Rotten Tomatoes snippets: 98 % fit in 48 Gemma tokens. BBC News articles (median 416 tokens):
the headline and first paragraph; longer samples cost generation time linearly."""
USER_DATA_TEXT_TOKENS = 64
"""The declared maximum for ``--data`` unless ``--max-text-tokens`` says otherwise."""
CORPUS_SHOTS: dict[str, int] = {"rotten_tomatoes": 1, "bbc_news": 0}
"""The demo's shots per sample per bundled corpus (``--data``: 1). Measured over three seeds
(README, "Other data"): one shot raised every score of a Rotten Tomatoes release; on BBC News
articles it lowered the prior and made the epsilon = 4 release less useful and far less stable
(TSTR accuracy 0.671 ± 0.145 with a shot, 0.771 ± 0.036 without)."""


@dataclass(frozen=True)
class DemoConfig:
    """One demo run; presets fix sizes so the run fits a time budget on 2 CPU cores."""

    out_dir: Path
    corpus: str = "rotten_tomatoes"
    model: str = DEFAULT_MODEL
    clients: int = 3
    threshold: int | None = None
    colluders: int = 0
    """Holders that may side with the coordinator and add no noise (distributed mode): the
    noise shares and the default threshold are sized for them, and the simulated holders
    refuse a task sized for fewer."""
    epsilon: float = 4.0
    delta: float = 1e-5
    mode: str = "distributed"
    layers: tuple[int, ...] = (8, 9, 10, 11)
    strength: float = 0.03
    contrast: float = 1.0
    snr_shrink: bool = True  # strength follows each class vector's SNR; False: as given
    denoise: bool = False
    """Let the SNR rule project each class direction onto the public basis of the prior texts'
    features (:mod:`fedsynth.server.public_basis`); post-processing, no privacy cost."""
    min_signal_share: float = DEFAULT_MIN_SIGNAL_SHARE
    """The SNR rule switches off a layer whose estimated signal share is below this
    (:func:`fedsynth.server.snr.steering_snr`; 0: the plain shrink rule)."""
    private_per_label: int | None = 2000
    synthetic_per_label: int = 150
    prior_per_label: int = 150
    test_per_label: int | None = 500
    include_nonprivate: bool = True
    max_text_tokens: int | None = None
    """Declared maximum record length (tokens): None = the corpus's (:data:`TEXT_TOKENS`)."""
    max_new_tokens: int | None = None
    """Tokens per sample at most: None = the declared record length."""
    generation_batch: int = 64
    drop_clients: int = 0
    seed: int = 0
    data_path: Path | None = None
    text_field: str = "text"
    label_field: str = "label"
    instruction: str | None = None
    backend: str = "transformers"
    """Generation backend for the steered samples (the federation always runs transformers)."""
    precision: str = "auto"
    """The `transformers` generation's dtype (:data:`~fedsynth.server.backends.PRECISIONS`);
    the holders always compute in fp32."""
    vocabulary: str = "full"
    """Tokens every generation may sample (:data:`~fedsynth.server.vocabulary.VOCABULARIES`)."""
    shots: int = 1
    """Same-label texts each sample is conditioned on, drawn from the condition's own
    plain-prompt samples (the prior's unsteered ones); 0 = the plain prompt only. One
    shot raised label fidelity, TSTR accuracy and MAUVE of epsilon = 4 releases on Rotten
    Tomatoes (README); :func:`demo_config` picks the corpus's (:data:`CORPUS_SHOTS`)."""
    top_p: float = 0.95
    """Nucleus sampling of every generation (prior and releases): 1 samples the model's whole
    distribution."""
    variants: tuple[str, ...] = ()
    """Public instruction variants, one drawn per prompt of every generation (prior and
    releases alike); empty: the template's instruction."""
    select: float = 1.0
    """Fraction of a release's samples kept: generate n / select per label and keep the n that
    the release says carry their class best (:mod:`fedsynth.server.selection`); 1 keeps all."""

    def __post_init__(self) -> None:
        """Refuse every bad setting at construction: nothing has run, nothing is charged yet."""
        check_backend_name(self.backend)
        check_precision_backend(self.backend, self.precision)
        check_vocabulary(self.vocabulary)
        if self.backend == "llamacpp":
            from fedsynth.server.llamacpp import check_available

            check_available(self.model)
        if self.clients < 1:
            raise ConfigError(f"clients K={self.clients}: must be >= 1")
        if not (self.epsilon > 0):
            raise ConfigError(f"epsilon={self.epsilon}: must be > 0 (or inf)")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"delta={self.delta}: must be in (0, 1)")
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r}: expected one of {MODES}")
        if not self.layers or min(self.layers) < 0:
            raise ConfigError(f"layers={self.layers}: need at least one layer index >= 0")
        check_strength(self.strength)
        check_contrast(self.contrast)
        check_min_signal_share(self.min_signal_share)
        positive = {
            "synthetic_per_label (--samples)": self.synthetic_per_label,
            "prior_per_label (--prior-per-label)": self.prior_per_label,
            "max_text_tokens (--max-text-tokens)": self.max_text_tokens,
            "max_new_tokens": self.max_new_tokens,
            "generation_batch": self.generation_batch,
            "private_per_label": self.private_per_label,
            "test_per_label": self.test_per_label,
        }
        for name, value in positive.items():
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value}: must be >= 1")
        if self.threshold is not None and self.threshold < 2:
            raise ConfigError(f"threshold t={self.threshold}: must be >= 2")
        if self.drop_clients < 0:
            raise ConfigError(f"drop={self.drop_clients}: must be >= 0")
        check_shots(self.shots)
        check_variants(self.variants)
        if self.instruction is not None:  # refused now, not once the model has loaded
            check_instruction(self.instruction, "template.instruction")
        check_select(self.select)
        GenerationConfig(top_p=self.top_p)  # refuses a top_p outside (0, 1]

    @property
    def secure_sum_threshold(self) -> int:
        """The threshold t of the secure sum: the configured one or the smallest safe one.

        Safe: 2t - K > colluders (a strict majority without colluders), at least 2.
        """
        if self.threshold is not None:
            return self.threshold
        return min_safe_threshold(self.clients, self.colluders)

    def check_federation(self) -> None:
        """Refuse a federation that could never release: K < 2, t outside 2..K, or drop > K - t.

        Raises:
            ConfigError: naming K, t or the drop count and the limit.
        """
        if self.clients < 2:
            raise ConfigError(f"clients K={self.clients}: need at least 2")
        safe = min_safe_threshold(self.clients, self.colluders)  # refuses a bad colluder count
        t = self.secure_sum_threshold
        if not 2 <= t <= self.clients:
            raise ConfigError(
                f"threshold t={t}: must satisfy 2 <= t <= K={self.clients}"
                + (
                    f" (the safe threshold for {self.colluders} colluders is {safe})"
                    if self.colluders
                    else ""
                )
            )
        if t < safe:  # 2t - K must exceed the colluders
            raise ConfigError(
                f"threshold t={t} with K={self.clients}: {self.colluders} colluders could unmask "
                f"a holder (2t - K = {2 * t - self.clients} must exceed them); use t >= "
                f"{safe} or fewer colluders"
            )
        if self.clients - self.drop_clients < t:
            raise ConfigError(
                f"drop={self.drop_clients} leaves {self.clients - self.drop_clients} holders, "
                f"below the threshold t={t}: the round would abort"
            )

    @property
    def text_tokens(self) -> int:
        """The declared maximum record length: the given one, the corpus's, or the default."""
        if self.max_text_tokens is not None:
            return self.max_text_tokens
        if self.data_path is not None:
            return USER_DATA_TEXT_TOKENS
        return TEXT_TOKENS.get(self.corpus, USER_DATA_TEXT_TOKENS)

    @property
    def new_tokens(self) -> int:
        """Tokens per sample at most: the given number, else the declared record length."""
        return self.max_new_tokens if self.max_new_tokens is not None else self.text_tokens

    @property
    def template(self) -> PromptTemplate:
        """The class-conditional template: the bundled corpus's, or one for the user's data.

        ``instruction``, where given, replaces either's instruction.
        """
        if self.data_path is None:
            bundled = TEMPLATES[self.corpus]
            if self.instruction is None:
                return bundled
            return replace(bundled, instruction=self.instruction)
        labels = user_labels(self.data_path, self.text_field, self.label_field)
        return PromptTemplate(
            instruction=self.instruction or "Here is a text labelled {label}:\n",
            label_names=tuple((label, label) for label in labels),
        )


PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "private_per_label": 300,
        "synthetic_per_label": 30,
        "prior_per_label": 30,
        "test_per_label": 200,
        "shots": 0,  # a shot pool would double the quick run's generation
    },
    "default": {},
}


def demo_config(preset: str, **overrides: Any) -> DemoConfig:
    """Build a DemoConfig from a preset name and explicit overrides (None = keep preset)."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {list(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    if "shots" not in values and values.get("data_path") is None:
        values["shots"] = CORPUS_SHOTS.get(values.get("corpus", "rotten_tomatoes"), 1)
    # The public prior texts only set the reference (clip norms, steering scale): the prior
    # condition generates its own samples, so their number does not follow --samples.
    return DemoConfig(**values)


@dataclass
class DemoData:
    """The demo's data split: what the holders hold and what the evaluator keeps apart."""

    train: list[Record]
    test: list[Record]
    partitions: list[list[Record]]
    partition_dir: Path
    source: str
    judge: list[Record] = field(default_factory=list)
    """Real texts in neither the holders' data nor the held-out set: the fidelity judge's."""


@functools.cache
def user_labels(path: Path, text_field: str, label_field: str) -> tuple[str, ...]:
    """Sorted labels of a user's data file (every row validated, errors with line numbers)."""
    records = load_records(path, text_field=text_field, label_field=label_field)
    return tuple(sorted({r.label for r in records}))


def prepare_data(config: DemoConfig) -> DemoData:
    """Split and check the data, then write one private file per holder (mode 0600).

    Every data check runs before the first holder file is written (see :func:`split_data`);
    a run that fails afterwards removes the files again (:func:`removed_on_failure`).
    """
    data = split_data(config)
    write_partitions(data)
    return data


def split_data(config: DemoConfig) -> DemoData:
    """Split the corpus (bundled, or the user's file) in memory and check it; writes nothing.

    Raises:
        DataFileError: the user's file is malformed, or the split leaves a label without
            private or held-out records, or fewer than two labels.
    """
    if config.data_path is not None:
        records = load_records(
            config.data_path, text_field=config.text_field, label_field=config.label_field
        )
        source = f"user data {config.data_path}"
    else:
        corpus = load_corpus(config.corpus)
        records, source = list(corpus.records), corpus.source
    split = split_records(
        records,
        private_per_label=config.private_per_label,
        test_per_label=config.test_per_label,
        seed=config.seed,
    )
    check_demo_data(config, split.train, split.test, source=source)
    partitions = holder_partitions(split.train, "iid", clients=config.clients, seed=config.seed)
    return DemoData(
        split.train, split.test, partitions, config.out_dir / "clients", source, split.judge
    )


def judge_records(data: DemoData) -> tuple[list[Record], str]:
    """The texts the label-fidelity judge trains on, and what they are (see :func:`judge_set`)."""
    return judge_set(DataSplit(data.train, data.test, data.judge))


def check_demo_data(
    config: DemoConfig, train: list[Record], test: list[Record], *, source: str
) -> None:
    """Refuse data the demo cannot evaluate, before any holder file exists or any ε is spent.

    A class-conditional release needs at least two labels, every label needs private records
    (or its vector would be noise only), and the evaluator needs held-out records of every
    label (train-on-synthetic accuracy and label fidelity compare against them).

    Raises:
        DataFileError: naming the label, what is missing and the limit.
    """
    labels = config.template.labels
    if len(labels) < 2:
        raise DataFileError(
            f"{source}: labels={list(labels)}: {len(labels)} label(s), a class-conditional "
            "release needs at least 2"
        )
    foreign = sorted({r.label for r in [*train, *test]} - set(labels))
    if foreign:
        raise DataFileError(f"{source}: labels {foreign} are not in the template's {list(labels)}")
    too_long = [len(r.text) for r in train if len(r.text) > MAX_CHARS]
    if too_long:
        raise DataFileError(
            f"{source}: {len(too_long)} private record(s) longer than a holder accepts "
            f"(max_chars={MAX_CHARS}; the longest has {max(too_long)} characters): the holder "
            "given one would refuse its whole file. Shorten or drop them."
        )
    for label in labels:
        n_train = sum(1 for r in train if r.label == label)
        n_test = sum(1 for r in test if r.label == label)
        if n_train < 1:
            raise DataFileError(f"{source}: label {label!r} has 0 private records (need >= 1)")
        if n_test < 1:
            raise DataFileError(
                f"{source}: label {label!r} has 0 held-out records (need >= 1; the split keeps "
                "one back only from a label with at least 2 records)"
            )


def write_partitions(data: DemoData) -> None:
    """Write each holder's private file (owner-only), removing them all if one write fails."""
    folder = data.partition_dir
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    for stale in [*folder.glob("budget-*"), *folder.glob(f"{DROPOUT_PREFIX}*.json")]:
        stale.unlink()
    try:
        for i, part in enumerate(data.partitions):
            write_jsonl(part, folder / f"partition-{i}.jsonl")
        # Each simulated holder signs its round keys and pins the roster (fresh keys per run).
        write_simulated_consortium(folder, len(data.partitions))
    except BaseException:
        discard_partitions(data)
        raise


def discard_partitions(data: DemoData) -> None:
    """Remove the holders' private files (after a failed run: no stray copies of the data)."""
    for i in range(len(data.partitions)):
        (data.partition_dir / f"partition-{i}.jsonl").unlink(missing_ok=True)


@contextlib.contextmanager
def removed_on_failure(data: DemoData) -> Iterator[DemoData]:
    """Yield ``data``; if the body raises (or is interrupted), remove the holders' files."""
    try:
        yield data
    except BaseException:
        discard_partitions(data)
        raise


def task_config(config: DemoConfig, epsilon: float) -> TaskConfig:
    """The coordinator's task settings for one release of this demo."""
    return TaskConfig(
        template=config.template,
        layers=config.layers,
        max_text_tokens=config.text_tokens,
        epsilon=epsilon,
        delta=config.delta,
        mode=config.mode,
        threshold=config.threshold,
        colluders=config.colluders,
        prior_per_label=config.prior_per_label,
        prior_generation=generation_config(config),
        seed=config.seed,
    )


SAMPLING_SEED_OFFSET = 101


def sampling_seed(seed: int) -> int:
    """The sampling seed of every condition of a run with this seed.

    One definition, so that the prior and a release whose layers the SNR rule switches off
    draw the same texts, and a release's gain over the prior is not a different draw's.
    """
    return seed + SAMPLING_SEED_OFFSET


def generation_config(config: DemoConfig) -> GenerationConfig:
    """Sampling settings shared by the prior and the steered generations."""
    return GenerationConfig(
        max_new_tokens=config.new_tokens,
        batch_size=config.generation_batch,
        top_p=config.top_p,
        vocabulary=config.vocabulary,
    )


Reporter = Callable[[str, int, int], None]
ROUND_STAGES = tuple(stage.value for stage in Stage)  # progress: setup ... unmask, done


@dataclass
class CoordinatorOutcome:
    """Releases made by the coordinator job (filled in as rounds finish)."""

    releases: dict[str, Path] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def release_epsilons(config: DemoConfig) -> list[float]:
    """The epsilons released: the target, then (optionally) the non-private ceiling."""
    out = [config.epsilon]
    if config.include_nonprivate and math.isfinite(config.epsilon):
        out.append(math.inf)
    return out


def make_coordinator_job(
    config: DemoConfig,
    loaded: LoadedModel,
    reference: PublicReference,
    outcome: CoordinatorOutcome,
    *,
    report: Reporter | None = None,
) -> Callable[[Transport, tuple[int, ...], Any], None]:
    """The coordinator's half of the demo: one secure round per release, saved with the ledger.

    Each release is the production coordinator's :func:`run_vector_release` (the same
    manifest, round, decoding and ledger transaction); the demo only chooses the epsilons and
    skips the non-private ceiling when the holders refuse it.
    """
    ledger = PrivacyLedger(ledger_path(config.out_dir))

    def job(transport: Transport, nodes: tuple[int, ...], _context: Any) -> None:
        for epsilon in release_epsilons(config):
            name = f"release-eps{epsilon_label(epsilon)}"

            def on_stage(stage: str, name: str = name) -> None:
                if report is not None and stage in ROUND_STAGES:
                    report(f"{name}: {stage}", ROUND_STAGES.index(stage), len(ROUND_STAGES) - 1)

            try:
                _, row = run_vector_release(
                    transport,
                    nodes,
                    task_config(config, epsilon),
                    loaded,
                    reference,
                    ledger=ledger,
                    path=config.out_dir / f"{name}.safetensors",
                    progress=on_stage,
                )
            except TooFewParticipantsError as exc:
                if math.isfinite(epsilon) or math.isinf(config.epsilon):
                    raise
                # The non-private ceiling needs each holder's own consent (its node config or
                # policy); refused, it is skipped and the private release stands alone.
                log.warning("%s not made: the holders refused it (%s)", name, exc)
                continue
            outcome.releases[epsilon_label(epsilon)] = Path(row["release"])

    return job


# Simulated dropouts (``--drop N``): the last N holders go offline after the key exchange.
KEY_EXCHANGE_STAGES = (Stage.SETUP.value, Stage.SHARE_KEYS.value)
DROPOUT_PREFIX = "dropout-"


def dropped_holders(config: DemoConfig) -> tuple[int, ...]:
    """Partition ids of the holders that drop out: the last ``drop_clients`` of the K."""
    return tuple(range(config.clients - config.drop_clients, config.clients))


def holder_name(partition_id: int) -> str:
    """The simulated holder that keeps ``partition-<i>.jsonl``."""
    return f"holder-{partition_id}"


def with_simulated_dropouts(inner: Any, dropped: tuple[int, ...], record_dir: Path) -> Any:
    """A ClientApp in which the holders ``dropped`` (partition ids) leave after the key exchange.

    They answer setup and share_keys like everyone else, so the others hold Shamir shares of
    their keys, and then answer every later stage (masked_input onwards) with an error, as a
    holder that went offline mid-round: the coordinator must recover their masks from the
    survivors' shares. Each dropout is noted in ``record_dir/dropout-<i>.json`` (holder name,
    Flower node id and stage: public facts of the simulation) so the demo's report can name
    the holder behind the node id the round reports as dropped.
    """
    from flwr.app import Context, Error, Message
    from flwr.clientapp import ClientApp

    from fedsynth.client.flower_app import ACTION as VECTOR_ACTION
    from fedsynth.client.flower_app import PE_ACTION as VOTES_ACTION

    app = ClientApp()

    def handle(msg: Message, context: Context) -> Message:
        pid = int(context.node_config.get("partition-id", 0))
        stage = _stage_of(msg)
        if pid in dropped and stage is not None and stage not in KEY_EXCHANGE_STAGES:
            note = {
                "holder": holder_name(pid),
                "partition": f"partition-{pid}.jsonl",
                "node_id": str(context.node_id),
                "stage": stage,
            }
            path = record_dir / f"{DROPOUT_PREFIX}{pid}.json"
            if not path.exists():  # the stage it first went offline at
                path.write_text(json.dumps(note))
            reply: Message = Message(Error(code=4200, reason="offline"), reply_to=msg)
            return reply
        answer: Message = inner(msg, context)
        return answer

    app.query(VECTOR_ACTION)(handle)
    app.query(VOTES_ACTION)(handle)
    return app


def _stage_of(msg: Any) -> str | None:
    """The secure-sum stage a message asks for (None when it carries none)."""
    try:
        return str(msg.content.config_records["fedsynth"]["stage"])
    except (KeyError, AttributeError):
        return None


def simulated_dropouts(partition_dir: Path) -> list[dict[str, str]]:
    """The holders that dropped out in this run, by partition id: name, node id, stage."""
    notes = sorted(partition_dir.glob(f"{DROPOUT_PREFIX}*.json"))
    return [json.loads(path.read_text()) for path in notes]


def run_federation(
    config: DemoConfig,
    data: DemoData,
    loaded: LoadedModel,
    reference: PublicReference,
    *,
    report: Reporter | None = None,
) -> CoordinatorOutcome:
    """Run the real ServerApp and ClientApps in Flower's in-process simulation (Ray)."""
    outcome = CoordinatorOutcome()
    job = make_coordinator_job(config, loaded, reference, outcome, report=report)
    outcome.errors.extend(run_job_in_simulation(config, data, job))
    return outcome


def run_job_in_simulation(
    config: DemoConfig,
    data: DemoData,
    job: Callable[[Transport, tuple[int, ...], Any], None],
    *,
    embedder: str = "all-minilm-l6-v2",
    policy: ClientPolicy | None = None,
    client_app: Any = None,
) -> list[str]:
    """Run ``job`` as the ServerApp against K simulated holders; return the job's errors.

    ``policy`` is every holder's policy (default: the standard one, non-private tasks allowed
    when the demo asks for them); ``client_app`` replaces fedsynth's ClientApp (baselines).
    """
    from flwr.simulation import run_simulation

    from fedsynth.client.flower_app import make_client_app

    config.check_federation()
    settings = ClientSettings(
        data_path=data.partition_dir / "partition-0.jsonl",
        model=config.model,
        embedder=embedder,
        policy=policy or simulated_holder_policy(config),
    )
    errors: list[str] = []

    def guarded(transport: Transport, nodes: tuple[int, ...], context: Any) -> None:
        try:
            job(transport, nodes, context)
        except Exception as exc:  # re-raised below, outside Flower's thread
            errors.append(f"{type(exc).__name__}: {exc}")
            raise

    # Ray lowers its workers' priority (nice 15) by default: the simulated holders would then
    # wait behind any other process on the machine while the coordinator waits for them.
    os.environ.setdefault("RAY_worker_niceness", "0")
    app = client_app or make_client_app(settings, partition_dir=data.partition_dir)
    if client_app is None and config.drop_clients > 0:
        app = with_simulated_dropouts(app, dropped_holders(config), data.partition_dir)
    cpus = max(1, min(os.cpu_count() or 1, config.clients))
    level = library_log_level()  # ERROR from the fedsynth command, DEBUG with --verbose
    run_simulation(
        server_app=make_server_app(guarded, num_clients=config.clients),
        client_app=app,
        num_supernodes=config.clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": cpus,
                "include_dashboard": False,
                "log_to_driver": False,
                "logging_level": max(level, logging.INFO),  # Ray's DEBUG floods even --verbose
            },
        },
        verbose_logging=level <= logging.DEBUG,
    )
    return errors


def simulated_holder_policy(config: DemoConfig) -> ClientPolicy:
    """The simulated holders' terms: the standard policy plus the run's trust mode.

    The researcher is every holder here; non-private tasks only when the run asks for them.
    """
    modes = tuple(dict.fromkeys((*ClientPolicy().allowed_modes, config.mode)))
    return ClientPolicy(
        allow_non_private=config.include_nonprivate or math.isinf(config.epsilon),
        allowed_modes=modes,
        max_colluders=config.colluders,
    )


def check_text_length(config: DemoConfig, loaded: LoadedModel) -> None:
    """Refuse a declared record or sample length that the model's context cannot hold.

    The longest sequence is a label's prompt (or its longest instruction variant) followed by a
    whole record (features) or a whole sample (generation), after ``config.shots`` shots of a
    prompt and a sample each; checked before the first round, so nothing is spent.

    Raises:
        ConfigError: naming the length, the longest prompt and the model's context.
    """
    context = loaded.context
    if context is None:
        return
    # The features read the template's instruction; generation may ask with a longer variant.
    asked = [config.template]
    if config.variants:
        asked += variant_templates(config.template, config.variants)
    prompt = max(longest_prompt_tokens(loaded, template) for template in asked)
    longest = max(config.text_tokens, config.new_tokens)
    if prompt + longest > context:
        raise ConfigError(
            f"max_text_tokens={config.text_tokens}, max_new_tokens={config.new_tokens}: a "
            f"{prompt}-token prompt plus {longest} tokens exceeds {loaded.name}'s context of "
            f"{context} tokens (declare at most {context - prompt} with --max-text-tokens)"
        )
    with_shots = shots_span(prompt, config.shots, config.new_tokens)
    if with_shots > context:
        raise ConfigError(
            f"shots={config.shots}: {config.shots} shots of up to {config.new_tokens} tokens "
            f"and their prompts make up to {with_shots} tokens, beyond {loaded.name}'s context "
            f"of {context} tokens (use fewer --shots or a shorter --max-text-tokens)"
        )


def load_coordinator(
    config: DemoConfig, *, report: Reporter | None = None
) -> tuple[LoadedModel, PublicReference]:
    """Load the model (converting the packaged GGUF once) and compute the public reference."""
    loaded = load_model(config.model)
    check_text_length(config, loaded)
    reference = compute_public_reference(
        loaded, task_config(config, config.epsilon), progress=report
    )
    return loaded, reference


def generation_engine(config: DemoConfig, loaded: LoadedModel) -> LoadedModel | GenerationBackend:
    """What generates the demo's samples: the holders' fp32 model itself, or another backend.

    The federation always runs on ``loaded``; another backend or precision is loaded beside it.
    """
    if config.backend == "transformers" and config.precision == "auto":
        return loaded
    return open_backend(config.backend, config.model, precision=config.precision)


def generate_conditions(
    config: DemoConfig,
    loaded: LoadedModel,
    reference: PublicReference,
    releases: Mapping[str, Path],
    *,
    report: Reporter | None = None,
) -> dict[str, list[SyntheticSample]]:
    """Synthetic samples per condition: the prior (epsilon 0) and each release."""
    from fedsynth.server.release import load_release

    engine = generation_engine(config, loaded)
    out: dict[str, list[SyntheticSample]] = {
        "prior (eps=0)": prior_samples(
            config,
            engine,
            progress=_phase(report, "generate prior"),
            pool_progress=_phase(report, "shot pool prior"),
        )
    }
    for eps_name, path in releases.items():
        release: Release = load_release(path)
        basis = public_basis_for(config, loaded, reference, release)
        caution = select_caution(config.select, release.labels)
        if caution:
            log.warning(caution)
        out[f"eps={eps_name}"] = generate_from_release(
            engine,
            release,
            n_per_label=config.synthetic_per_label,
            strength=config.strength,
            contrast=config.contrast,
            config=generation_config(config),
            seed=sampling_seed(config.seed),
            progress=_phase(report, f"generate eps={eps_name}"),
            snr_shrink=config.snr_shrink,
            min_signal_share=config.min_signal_share,
            shots=config.shots,
            pool_progress=_phase(report, f"shot pool eps={eps_name}"),
            select=config.select,
            scorer=loaded,
            basis=basis,
            variants=config.variants,
        )
    return out


def public_basis_for(
    config: DemoConfig, loaded: LoadedModel, reference: PublicReference, release: Release
) -> PublicBasis | None:
    """The public basis of the reference's prior texts when ``config.denoise``, else None."""
    if not config.denoise:
        return None
    return basis_from_texts(loaded, release.manifest.feature_spec, reference.texts)


def prior_samples(
    config: DemoConfig,
    engine: LoadedModel | GenerationBackend,
    *,
    progress: Callable[[int, int], None] | None = None,
    pool_progress: Callable[[int, int], None] | None = None,
) -> list[SyntheticSample]:
    """The prior condition (epsilon 0): a release switched off entirely.

    :func:`~fedsynth.server.synthesize.floor_samples` at the releases' sampling seed, with the
    releases' number of shots drawn from its own unsteered pool, as the study's ``prior`` cells
    do: the prior and a release then differ by the steering only, not also by which pool of
    texts the shots come from.
    """
    return floor_samples(
        engine,
        config.template,
        n_per_label=config.synthetic_per_label,
        generation=generation_config(config),
        shots=config.shots,
        seed=sampling_seed(config.seed),
        progress=progress,
        pool_progress=pool_progress,
        variants=config.variants,
    )


def _phase(report: Reporter | None, phase: str) -> Callable[[int, int], None] | None:
    """Bind a reporter to one phase name."""
    if report is None:
        return None
    bound: Reporter = report
    return lambda done, total: bound(phase, done, total)


def evaluate_conditions(
    samples: Mapping[str, list[SyntheticSample]], data: DemoData
) -> dict[str, dict[str, float]]:
    """Fidelity, train-on-synthetic accuracy / macro-F1, closeness and diversity per condition.

    Closeness to the held-out texts: embedding Fréchet distance and MAUVE; diversity: Self-BLEU
    (of at most :data:`SELF_BLEU_TEXTS` samples) and distinct-1/2 over all samples.
    """
    from fedsynth.simulations.metrics import (
        embed_texts,
        frechet_distance,
        label_fidelity,
        load_embedder,
        train_text_classifier,
        tstr_scores,
    )
    from fedsynth.simulations.text_metrics import distinct_n, mauve_score, self_bleu

    judge, _ = judge_records(data)
    classifier = train_text_classifier([r.text for r in judge], [r.label for r in judge], seed=0)
    embedder = load_embedder()
    test_texts = [r.text for r in data.test]
    test_labels = [r.label for r in data.test]
    real_emb = embed_texts(embedder, test_texts)
    scores: dict[str, dict[str, float]] = {}
    for name, rows in samples.items():
        texts = [s.text for s in rows]
        labels = [s.label for s in rows]
        fidelity = label_fidelity(classifier, texts, labels)
        tstr = tstr_scores(texts, labels, test_texts, test_labels, seed=0)
        emb = embed_texts(embedder, texts)
        scores[name] = {
            "label_fidelity": fidelity,
            "fidelity_hits": round(fidelity * len(texts)),
            "n": len(texts),
            "tstr_accuracy": tstr["accuracy"],
            "tstr_macro_f1": tstr["macro_f1"],
            "embedding_fd": frechet_distance(emb, real_emb),
            "mauve": mauve_score(real_emb, emb, seed=0),
            "self_bleu": self_bleu(texts, max_texts=SELF_BLEU_TEXTS, seed=0),
            "distinct_1": distinct_n(texts, 1),
            "distinct_2": distinct_n(texts, 2),
        }
    return scores


REAL_REFERENCE_DRAWS = 3
"""Draws of real texts the same-number reference averages (a single draw moves by 1-2 points)."""


def real_reference(
    data: DemoData, per_label: int, *, draws: int = REAL_REFERENCE_DRAWS
) -> dict[str, float]:
    """TSTR of the same number of *real* texts: ``per_label`` holders' records per label.

    The ceiling a synthetic data set of that size is measured against (simulation only: it
    reads the private records, as the evaluator may and a coordinator never does). Mean and sd
    over ``draws`` seeded draws; a label with fewer records contributes all of them.
    """
    from fedsynth.simulations.metrics import tstr_scores

    if per_label < 1 or draws < 1:
        raise ConfigError(f"per_label={per_label}, draws={draws}: both must be >= 1")
    test_texts = [r.text for r in data.test]
    test_labels = [r.label for r in data.test]
    accuracy, macro_f1 = [], []
    for draw in range(draws):
        real = subsample_per_label(data.train, per_label=per_label, seed=draw)
        texts, labels = [r.text for r in real], [r.label for r in real]
        scores = tstr_scores(texts, labels, test_texts, test_labels, seed=draw)
        accuracy.append(scores["accuracy"])
        macro_f1.append(scores["macro_f1"])
    return {
        "per_label": per_label,
        "draws": draws,
        "tstr_accuracy": float(np.mean(accuracy)),
        "tstr_accuracy_sd": float(np.std(accuracy, ddof=1)) if draws > 1 else 0.0,
        "tstr_macro_f1": float(np.mean(macro_f1)),
    }


def gap_closed(prior: float, synthetic: float, real: float) -> float:
    """Share of the prior-to-real gap a synthetic data set closes (NaN when there is no gap)."""
    gap = real - prior
    return (synthetic - prior) / gap if gap > 0 else math.nan


SELF_BLEU_TEXTS = 100
"""Samples Self-BLEU scores per condition (its cost grows with the square of the number)."""


def write_outputs(
    config: DemoConfig,
    samples: Mapping[str, list[SyntheticSample]],
    scores: Mapping[str, Mapping[str, float]],
    releases: Mapping[str, Path],
    timings: Mapping[str, float],
    *,
    judge: str | None = None,
    real: Mapping[str, float] | None = None,
    basis_of: Callable[[Release], PublicBasis | None] | None = None,
) -> dict[str, Any]:
    """Write synthetic.jsonl, privacy_report.json, summary.json and a comparison plot.

    Args:
        judge: what the label-fidelity judge was trained on (:func:`judge_records`).
        real: the same-number real-text reference (:func:`real_reference`), if computed.
        basis_of: the public basis generation used for a release (:func:`public_basis_for`),
            so that the steering report states the projections.
    """
    from fedsynth.server.release import load_release
    from fedsynth.server.synthesize import steering_report

    main_key = epsilon_label(config.epsilon)
    loaded_releases = {key: load_release(path) for key, path in releases.items()}
    main = loaded_releases[main_key]
    out = config.out_dir
    with (out / "synthetic.jsonl").open("w", encoding="utf-8") as handle:
        for sample in samples[f"eps={main_key}"]:
            handle.write(json_line(asdict(sample)) + "\n")
    baselines = out / "baselines"
    baselines.mkdir(exist_ok=True)
    for name, rows in samples.items():
        slug = name.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "")
        with (baselines / f"synthetic-{slug}.jsonl").open("w", encoding="utf-8") as handle:
            for sample in rows:
                handle.write(json_line(asdict(sample)) + "\n")
    # Generation-time facts (per class SNR, effective strength): in the outputs, never in the
    # release file.
    steering = {
        key: steering_report(
            rel,
            strength=config.strength,
            contrast=config.contrast,
            snr_shrink=config.snr_shrink,
            basis=basis_of(rel) if basis_of is not None else None,
            min_signal_share=config.min_signal_share,
        )
        for key, rel in loaded_releases.items()
    }
    report = dict(main.report)
    report["steering"] = steering[main_key]
    dropouts = simulated_dropouts(out / "clients")
    if dropouts:
        # Names the holders behind the node ids in dropped_clients (simulation only).
        report["dropped_holders"] = dropouts
    (out / "privacy_report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    config_json = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    config_json["epsilon"] = epsilon_label(config.epsilon)
    config_json["max_text_tokens"] = config.text_tokens  # what ran, not None for "default"
    config_json["max_new_tokens"] = config.new_tokens
    summary = {
        "config": config_json,
        "scores": scores,
        "judge": judge,
        "real_reference": dict(real) if real is not None else None,
        "releases": {k: str(v) for k, v in releases.items()},
        "dropped_holders": [d["holder"] for d in dropouts],
        "steering": steering,
        "timings_s": dict(timings),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_scores(scores, out / "scores.png")
    return summary


def plot_scores(scores: Mapping[str, Mapping[str, float]], path: Path) -> None:
    """Bar chart per condition: label fidelity, TSTR accuracy, MAUVE and distinct-2 (all 0-1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(scores)
    x = np.arange(len(names))
    bars = [
        (key, title)
        for key, title in (
            ("label_fidelity", "label fidelity"),
            ("tstr_accuracy", "TSTR accuracy"),
            ("mauve", "MAUVE"),
            ("distinct_2", "distinct-2"),
        )
        if all(key in scores[n] for n in names)
    ]
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for i, (key, title) in enumerate(bars):
        offset = (i - (len(bars) - 1) / 2) * width
        ax.bar(x + offset, [scores[n][key] for n in names], width, label=title)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color="grey", lw=0.5, ls="--")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title("Synthetic data utility by condition")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def coordinator_job_from_run_config(
    run_config: Mapping[str, Any],
) -> Callable[[Transport, tuple[int, ...], Any], None]:
    """The whole coordinator side for ``flwr run .`` (settings from pyproject's run config).

    ``method = "pe"`` runs federated Private Evolution (``pe-rounds``, ``pe-population``,
    ``pe-init``, ``embedder``) instead of a dataset-vector release.
    """
    out = Path(str(run_config.get("out-dir") or cache_root() / "flwr-run"))
    preset = str(run_config.get("preset", "quick"))
    config = demo_config(
        preset,
        out_dir=out,
        epsilon=float(run_config.get("epsilon", 4.0)),
        delta=float(run_config.get("delta", 1e-5)),
        mode=str(run_config.get("mode", "distributed")),
        clients=int(run_config.get("num-clients", 3)),
        model=str(run_config.get("model") or DEFAULT_MODEL),
        layers=tuple(int(x) for x in str(run_config.get("layers", "8,9,10,11")).split(",")),
    )
    config.check_federation()
    if str(run_config.get("method", "vector")) == "pe":
        return _pe_job_from_run_config(run_config, config, preset)

    def job(transport: Transport, nodes: tuple[int, ...], context: Any) -> None:
        timings: dict[str, float] = {}
        start = time.monotonic()
        with removed_on_failure(prepare_data(config)) as data:
            loaded, reference = load_coordinator(config)
            timings["reference"] = time.monotonic() - start
            outcome = CoordinatorOutcome()
            make_coordinator_job(config, loaded, reference, outcome)(transport, nodes, context)
            samples = generate_conditions(config, loaded, reference, outcome.releases)
            scores = evaluate_conditions(samples, data)
            write_outputs(
                config,
                samples,
                scores,
                outcome.releases,
                timings,
                judge=judge_records(data)[1],
                real=real_reference(data, config.synthetic_per_label),
                basis_of=lambda rel: public_basis_for(config, loaded, reference, rel),
            )
        log.info("fedsynth demo finished; outputs in %s", config.out_dir)

    return job


def _pe_job_from_run_config(
    run_config: Mapping[str, Any], config: DemoConfig, preset: str
) -> Callable[[Transport, tuple[int, ...], Any], None]:
    """The PE coordinator for ``flwr run . --run-config "method='pe'"``."""
    from fedsynth.simulations import pe_demo

    values: dict[str, Any] = dict(pe_demo.PE_PRESETS.get(preset, {}))
    for key, name in (("pe-rounds", "rounds"), ("pe-population", "per_label")):
        if key in run_config:
            values[name] = int(str(run_config[key]))
    settings = pe_demo.PEDemoSettings(
        init=str(run_config.get("pe-init", "prior")),
        embedder=str(run_config.get("embedder", "all-minilm-l6-v2")),
        **values,
    )
    pe_demo.pe_config(config, settings)  # refuse bad settings before anything runs

    def job(transport: Transport, nodes: tuple[int, ...], context: Any) -> None:
        start = time.monotonic()
        with removed_on_failure(prepare_data(config)) as data:
            loaded = load_model(config.model)
            outcome = pe_demo.PEOutcome()
            pe_demo.make_pe_job(config, settings, loaded, data, outcome)(transport, nodes, context)
            final = outcome.result.state if outcome.result else None
            scores: dict[str, dict[str, float]] = {}
            if final is not None and outcome.initial is not None:
                scores = evaluate_conditions(
                    {
                        "PE round 0": pe_demo.population_samples(outcome.initial, "round-0"),
                        "PE final": pe_demo.population_samples(final.population, "final"),
                    },
                    data,
                )
            timings = {"total": time.monotonic() - start}
            pe_demo.write_pe_outputs(config, settings, outcome, scores, timings)
        log.info("fedsynth PE demo finished; outputs in %s", config.out_dir)

    return job


def _demo_server_job(transport: Transport, nodes: tuple[int, ...], context: Any) -> None:
    """The demo's coordinator for ``flwr run``, configured by the run config's demo keys."""
    coordinator_job_from_run_config(context.run_config)(transport, nodes, context)


server_app = make_server_app(_demo_server_job)
"""The demo's own ServerApp (``fedsynth.simulations.demo:server_app``): the coordinator half of
the demo (data split, releases, evaluation) for ``flwr run``; production tasks use
``fedsynth.server.flower_app:app`` with a task file."""
