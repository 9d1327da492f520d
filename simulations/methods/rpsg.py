"""``rpsg``: private seeds rewritten by the model, one candidate kept by a noisy choice.

Not record-level DP: every output derives from one private record; see the method table.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from fedsynth.server.generation import generate_from_prompts
from fedsynth.server.synthesize import SyntheticSample
from fedsynth.simulations.demo import generation_config, sampling_seed
from fedsynth.simulations.methods.base import CellOutput, StudyContext
from fedsynth.simulations.methods.common import generation_perf

if TYPE_CHECKING:
    from fedsynth.simulations.study_config import Cell


def run(ctx: StudyContext, cell: Cell) -> CellOutput:
    """Seeds → model rewrites → noisy choice → cosine filter → NLL filter → label check."""
    from fedsynth.server.generation import text_logprobs
    from fedsynth.simulations import baselines as b
    from fedsynth.simulations.metrics import train_text_classifier
    from fedsynth.simulations.text_metrics import nearest_similarity, unit_rows

    state = ctx.seed_state(cell.seed)
    config = ctx.demo_config(cell)
    template = config.template
    settings = ctx.config.baselines
    rng = np.random.default_rng(cell.seed + 505)
    seeds: list[tuple[str, str]] = []
    for label in template.labels:
        pool = [r.text for r in state.pooled if r.label == label]
        n = min(len(pool), config.synthetic_per_label * settings.rpsg_seed_factor)
        seeds += [(label, pool[int(i)]) for i in rng.permutation(len(pool))[:n]]
    prompts = [
        f"{template.prefix(label)}{text}\n\n{template.prefix(label)}"
        for label, text in seeds
        for _ in range(settings.rpsg_candidates)
    ]
    start = time.monotonic()
    candidates = generate_from_prompts(
        ctx.loaded, prompts, config=generation_config(config), seed=sampling_seed(cell.seed)
    )
    perf = generation_perf(
        ctx, [SyntheticSample(t, "", "") for t in candidates], time.monotonic() - start
    )
    # Label agreement by a classifier of the public prior texts (no private data).
    prior = ctx.reference.texts
    public = train_text_classifier(
        [t for lb in prior for t in prior[lb]], [lb for lb in prior for _ in prior[lb]], seed=0
    )
    classes = list(public.classes_)
    cand = np.array(candidates, dtype=object).reshape(len(seeds), settings.rpsg_candidates)
    seed_emb = ctx.embed([t for _, t in seeds])
    cand_emb = ctx.embed(candidates).reshape(len(seeds), settings.rpsg_candidates, -1)
    similarity = np.einsum("sd,scd->sc", unit_rows(seed_emb), unit_rows(cand_emb))
    probs = public.predict_proba(candidates).reshape(len(seeds), settings.rpsg_candidates, -1)
    agree = np.stack([probs[i, :, classes.index(label)] for i, (label, _) in enumerate(seeds)])
    scores = b.rescale_unit(b.RPSG_SCORE_WEIGHT * similarity + (1 - b.RPSG_SCORE_WEIGHT) * agree)
    sigma = b.classic_gaussian_sigma(cell.epsilon, ctx.config.delta, 1.0)
    chosen = b.noisy_argmax(scores, sigma=sigma, rng=rng)
    picked = [str(cand[i, c]) for i, c in enumerate(chosen)]
    labels = [label for label, _ in seeds]
    # Cosine filter: keep the texts least similar to any private record.
    private_emb = ctx.embed([r.text for r in state.pooled])
    keep = b.keep_lowest(
        nearest_similarity(cand_emb[np.arange(len(seeds)), chosen], private_emb),
        b.RPSG_COSINE_KEEP,
    )
    # NLL filter: drop the most likely (memorized-looking) texts under the base model.
    nll = np.full(len(picked), -np.inf)
    for i in np.flatnonzero(keep):
        if picked[i].strip():
            nll[i] = -text_logprobs(ctx.loaded, template.prefix(labels[i]), [picked[i]])[0]
    kept_idx = np.flatnonzero(keep)
    keep[kept_idx] = b.keep_highest(nll[kept_idx], b.RPSG_NLL_KEEP)
    # Label alignment: the public classifier must give the seed's label.
    predicted = public.predict(picked)
    samples = []
    per_label: dict[str, int] = {}
    for i in np.flatnonzero(keep):
        label = labels[i]
        if predicted[i] != label or per_label.get(label, 0) >= config.synthetic_per_label:
            continue
        per_label[label] = per_label.get(label, 0) + 1
        samples.append(SyntheticSample(text=picked[i], label=label, release_id="rpsg"))
    return CellOutput(samples, perf=perf)
