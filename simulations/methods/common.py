"""Steps several methods share: federated runs with timing, generation, refusals, noise."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.manifest import PrivacySpec, noise_share_variance
from fedsynth.server.backends import as_backend
from fedsynth.server.release import Release
from fedsynth.server.secure_round import Reply, Transport
from fedsynth.server.synthesize import (
    SyntheticSample,
    generate_from_release,
    iter_labelled_texts,
    release_deltas,
)
from fedsynth.simulations.demo import (
    DemoConfig,
    DemoData,
    discard_partitions,
    generation_config,
    public_basis_for,
    removed_on_failure,
    run_job_in_simulation,
    sampling_seed,
    write_partitions,
)
from fedsynth.simulations.methods.base import CellOutput, Generator, StudyContext

if TYPE_CHECKING:
    from fedsynth.protocol.models import LoadedModel
    from fedsynth.simulations.study_config import Cell

REFUSALS = ("ConfigError", "PolicyViolationError", "BudgetExceededError", "TooFewParticipants")


class TimedTransport:
    """Records per-stage wall time and reply bytes of a transport (the performance columns)."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.stage_seconds: dict[str, float] = {}
        self.bytes_by_node: dict[int, int] = {}

    def for_action(self, action: str) -> TimedTransport:
        """Switch the inner transport's message kind, keep recording here."""
        switched = getattr(self.inner, "for_action", None)
        if switched is not None:
            self.inner = switched(action)
        return self

    def exchange(self, stage: str, requests: Mapping[int, Any], *, timeout: float) -> Any:
        """Forward one stage to the inner transport, timing it and counting reply bytes."""
        from flwr.common.serde import recorddict_to_proto

        start = time.monotonic()
        replies: dict[int, Reply] = self.inner.exchange(stage, requests, timeout=timeout)
        elapsed = time.monotonic() - start
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + elapsed
        for node, reply in replies.items():
            if reply.content is not None:
                size = recorddict_to_proto(reply.content).ByteSize()
                self.bytes_by_node[node] = self.bytes_by_node.get(node, 0) + size
        return replies

    @property
    def client_seconds(self) -> float:
        """Wall time of the stages in which holders compute (features or votes, noise).

        For protocols without a secure sum (DP-FedAvg): every exchange.
        """
        if "masked_input" in self.stage_seconds:
            return self.stage_seconds["masked_input"]
        return sum(self.stage_seconds.values())

    @property
    def bytes_per_client(self) -> float:
        """Mean bytes uploaded per holder over all stages (serialized Flower records)."""
        if not self.bytes_by_node:
            return math.nan
        return float(np.mean(list(self.bytes_by_node.values())))


def federation_data(ctx: StudyContext, cell: Cell, config: DemoConfig) -> DemoData:
    """Write the cell's holder files (owner-only; all removed if one write fails)."""
    state = ctx.seed_state(cell.seed)
    data = DemoData(
        state.train,
        state.test,
        ctx.partitions(cell),
        config.out_dir / "clients",
        ctx.config.corpus,
    )
    write_partitions(data)
    return data


def run_federated(
    ctx: StudyContext,
    cell: Cell,
    config: DemoConfig,
    make_job: Callable[[], Callable[..., None]],
    *,
    client_app: Any = None,
) -> tuple[dict[str, float], list[str]]:
    """Run a coordinator job against the cell's holders in Flower's simulation.

    Returns the holders' compute time and upload size, and the run's errors (empty if none).
    """
    inner = make_job()  # builds and checks the job's settings before any holder file exists
    config.check_federation()
    timed: dict[str, TimedTransport] = {}

    def job(transport: Transport, nodes: tuple[int, ...], context: Any) -> None:
        timed["t"] = TimedTransport(transport)
        inner(timed["t"], nodes, context)

    with removed_on_failure(federation_data(ctx, cell, config)) as data:
        errors = run_job_in_simulation(
            config,
            data,
            job,
            embedder=ctx.config.embedder,
            policy=ctx.holder_policy(),
            client_app=client_app,
        )
    if errors:
        discard_partitions(data)  # a failed run leaves no private copies behind
    perf: dict[str, float] = {}
    if "t" in timed:
        perf = {
            "client_seconds": timed["t"].client_seconds,
            "bytes_per_client": timed["t"].bytes_per_client,
        }
    return perf, errors


def federated_failure(what: str, errors: Sequence[str]) -> NoReturn:
    """Raise a refusal (a finished cell with its reason) or a crash (the cell reruns later)."""
    message = f"{what} failed: {'; '.join(errors) or 'no result'}"
    if any(e.startswith(REFUSALS) for e in errors):
        raise ConfigError(message)
    raise RuntimeError(message)


def effective_noise_multiplier(privacy: PrivacySpec, *, survivors: int, removed: int = 0) -> float:
    """Std of the noise in the released sum over the record's L2 sensitivity.

    The manifest's multiplier is what any t survivors guarantee; each surviving holder adds
    its share (:func:`noise_share_variance`: variance/t distributed, the whole variance local),
    the coordinator adds the whole variance in central mode. Under exact sharing each of the
    ``removed`` survivors whose excess was removed keeps only variance/survivors.
    """
    if privacy.total_variance == 0:
        return 0.0
    share = noise_share_variance(privacy)
    present = (
        removed * privacy.total_variance / survivors + (survivors - removed) * share
        or privacy.total_variance
    )
    return privacy.noise_multiplier * math.sqrt(present / privacy.total_variance)


def generation_perf(
    ctx: StudyContext, samples: Sequence[SyntheticSample], seconds: float
) -> dict[str, float]:
    """Generation time and tokens per second of ``samples``."""
    tokens = sum(
        len(ctx.loaded.tokenizer.encode(s.text, add_special_tokens=False)) for s in samples
    )
    return {
        "generation_seconds": seconds,
        "generation_tokens_per_s": tokens / max(seconds, 1e-9),
    }


def release_samples(
    ctx: StudyContext, release: Release, cell: Cell, perf: dict[str, float]
) -> CellOutput:
    """The cell's samples from a dataset-vector release, and the release as its generator."""
    config = ctx.demo_config(cell)
    basis = public_basis_for(config, ctx.loaded, ctx.reference, release)
    start = time.monotonic()
    samples = generate_from_release(
        ctx.loaded,
        release,
        n_per_label=config.synthetic_per_label,
        strength=config.strength,
        contrast=config.contrast,
        config=generation_config(config),
        seed=sampling_seed(cell.seed),
        shots=config.shots,
        basis=basis,
        min_signal_share=config.min_signal_share,
        variants=config.variants,
    )
    perf.update(generation_perf(ctx, samples, time.monotonic() - start))
    template = release.manifest.template
    deltas = release_deltas(
        release,
        strength=config.strength,
        contrast=config.contrast,
        basis=basis,
        min_signal_share=config.min_signal_share,
    )
    generator = Generator({lb: template.prefix(lb) for lb in template.labels}, deltas)
    return CellOutput(samples, perf=perf, generator=generator)


def model_samples(
    ctx: StudyContext, cell: Cell, model: LoadedModel, perf: dict[str, float]
) -> CellOutput:
    """Samples of a (fine-tuned) model from the class prompts.

    With the study's ``shots``, each sample is conditioned on the model's own plain-prompt
    samples, as the releases' samples are on theirs (:func:`iter_labelled_texts`); with its
    ``variants``, each prompt asks with one of them.
    """
    config = ctx.demo_config(cell)
    template = config.template
    start = time.monotonic()
    if config.shots or config.variants:
        pairs = list(
            iter_labelled_texts(
                as_backend(model),
                template,
                template.labels,
                n_per_label=config.synthetic_per_label,
                deltas_of=lambda _label: None,
                config=generation_config(config),
                seed=sampling_seed(cell.seed),
                shots=config.shots,
                variants=config.variants,
            )
        )
    else:
        labels = [lb for lb in template.labels for _ in range(config.synthetic_per_label)]
        texts = as_backend(model).generate(
            [template.prefix(lb) for lb in labels],
            config=generation_config(config),
            deltas=None,
            seed=sampling_seed(cell.seed),
        )
        pairs = list(zip(labels, texts, strict=True))
    samples = [SyntheticSample(text=t, label=lb, release_id=cell.method) for lb, t in pairs]
    perf.update(generation_perf(ctx, samples, time.monotonic() - start))
    generator = Generator({lb: template.prefix(lb) for lb in template.labels}, model=model)
    return CellOutput(samples, perf=perf, generator=generator)


def dp_train_settings(ctx: StudyContext) -> Any:
    """The study's DP fine-tuning settings as the trainer's dataclass."""
    from fedsynth.simulations.dp_finetune import DPTrainSettings

    t = ctx.config.dp_training
    return DPTrainSettings(
        epochs=t.epochs,
        batch_size=t.batch_size,
        learning_rate=t.learning_rate,
        max_grad_norm=t.max_grad_norm,
        lora_rank=t.lora_rank,
        max_tokens=t.max_tokens,
    )


def icl_shots(ctx: StudyContext, cell: Cell) -> list[tuple[str, list[str]]]:
    """(label, shots) per sample, drawn from the attack's member records and the canaries.

    Each is quoted at least once when the prompts have room, so leaks show in the attacks.
    """
    state = ctx.seed_state(cell.seed)
    config = ctx.demo_config(cell)
    n_shots = ctx.config.baselines.icl_shots
    rng = np.random.default_rng(cell.seed + 303)
    out = []
    for label in config.template.labels:
        pool = [r.text for r in state.members + state.canaries if r.label == label] or [
            r.text for r in state.train if r.label == label
        ]
        order = [int(i) for i in rng.permutation(len(pool))]
        for j in range(config.synthetic_per_label):
            picks = [order[(j * n_shots + s) % len(order)] for s in range(n_shots)]
            out.append((label, list(dict.fromkeys(pool[i] for i in picks))))
    return out
