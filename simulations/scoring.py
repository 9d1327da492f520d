"""Scores of one study cell: utility and privacy metrics of its samples, canary exposure.

The label-fidelity judge trains on real texts in neither the holders' data nor the held-out
set (as in the demo; :func:`fedsynth.simulations.splits.judge_set`), the utility metrics score
against the held-out records, the attacks use the seed's members and non-members.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedsynth.client.data import Record
from fedsynth.server.synthesize import SyntheticSample
from fedsynth.simulations.methods.base import Generator, StudyContext
from fedsynth.simulations.splits import DataSplit, judge_set

if TYPE_CHECKING:
    from fedsynth.simulations.study_config import Cell

CANARY_TEXT = "The ticket stub I kept from that screening reads {secret}, and I loved every minute."
"""The canary a seed inserts into one holder's data (``{secret}``: six random digits)."""


def canary_exposure(ctx: StudyContext, cell: Cell, generator: Generator) -> float:
    """Exposure of the seed's canary under the cell's released generator."""
    from fedsynth.server.generation import text_logprobs
    from fedsynth.simulations.text_metrics import exposure

    state = ctx.seed_state(cell.seed)
    label = state.canaries[0].label
    texts = [CANARY_TEXT.format(secret=s) for s in [state.canary_secret, *state.candidate_secrets]]
    deltas = (generator.deltas_by_label or {}).get(label)
    model = generator.model or ctx.loaded
    scores = text_logprobs(model, generator.prompts[label], texts, deltas=deltas)
    return exposure(scores[0], scores[1:])


def score(
    ctx: StudyContext,
    cell: Cell,
    samples: Sequence[SyntheticSample],
    *,
    members: Sequence[Record] | None = None,
) -> dict[str, float]:
    """The configured utility and privacy metrics of one cell's samples.

    ``members`` replaces the seed's attack members for a method that reads only some of
    the private records (non-members: as many held-out records).
    """
    from fedsynth.simulations import metrics as m
    from fedsynth.simulations import text_metrics as tm

    state = ctx.seed_state(cell.seed)
    texts = [s.text for s in samples]
    labels = [s.label for s in samples]
    test_texts = [r.text for r in state.test]
    wanted = set(ctx.config.metrics)
    out: dict[str, float] = {}
    if "tstr" in wanted:
        tstr = m.tstr_scores(texts, labels, test_texts, [r.label for r in state.test], seed=0)
        out["tstr_accuracy"] = tstr["accuracy"]
        out["tstr_macro_f1"] = tstr["macro_f1"]
    if "fidelity" in wanted:
        if state.classifier is None:
            judge, _ = judge_set(DataSplit(state.train, state.test, state.judge))
            state.classifier = m.train_text_classifier(
                [r.text for r in judge], [r.label for r in judge], seed=0
            )
        out["label_fidelity"] = m.label_fidelity(state.classifier, texts, labels)
    if wanted & {"fid", "mauve", "mia"}:
        emb = ctx.embed(texts)
        if state.test_embeddings is None:
            state.test_embeddings = ctx.embed(test_texts)
        if "fid" in wanted:
            out["embedding_fd"] = m.frechet_distance(emb, state.test_embeddings)
        if "mauve" in wanted:
            out["mauve"] = tm.mauve_score(state.test_embeddings, emb, seed=cell.seed)
        if "mia" in wanted:
            if state.member_embeddings is None or state.non_member_embeddings is None:
                state.member_embeddings = ctx.embed([r.text for r in state.members])
                state.non_member_embeddings = ctx.embed([r.text for r in state.non_members])
            member_emb, non_member_emb = state.member_embeddings, state.non_member_embeddings
            if members is not None:
                member_emb = ctx.embed([r.text for r in members])
                non_member_emb = non_member_emb[: len(members)]
            out["mia_auc"] = tm.membership_auc(member_emb, non_member_emb, emb)
    if "self_bleu" in wanted:
        out["self_bleu"] = tm.self_bleu(texts, seed=cell.seed)
    if "distinct" in wanted:
        out["distinct_1"] = tm.distinct_n(texts, 1)
        out["distinct_2"] = tm.distinct_n(texts, 2)
    if "next_word" in wanted:
        out["next_word_accuracy"] = tm.next_word_accuracy(texts, test_texts)
    return out
