"""``icl-verbatim``: private records quoted verbatim in the prompt; a deliberately leaky control.

It shows that the attacks have power: its members for the attack are the records it quoted.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from fedsynth.server.generation import generate_from_prompts
from fedsynth.server.synthesize import SyntheticSample
from fedsynth.simulations.demo import generation_config, sampling_seed
from fedsynth.simulations.methods.base import CellOutput, Generator, StudyContext
from fedsynth.simulations.methods.common import generation_perf, icl_shots

if TYPE_CHECKING:
    from fedsynth.simulations.study_config import Cell


def run(ctx: StudyContext, cell: Cell) -> CellOutput:
    """Quote shots, start each sample with half of one quoted record, generate the rest."""
    state = ctx.seed_state(cell.seed)
    config = ctx.demo_config(cell)
    template = config.template
    shots = icl_shots(ctx, cell)
    # Each sample starts with the first half of one quoted record, verbatim; the other
    # quoted records are the in-context examples.
    prompts, starts = [], []
    for label, quoted in shots:
        words = quoted[0].split()
        start_text = " ".join(words[: max(1, len(words) // 2)])
        shown = dataclasses.replace(template, shots=tuple((label, s) for s in quoted[1:]))
        prompts.append(shown.prefix(label) + start_text)
        starts.append(start_text)
    labels = [label for label, _ in shots]
    start = time.monotonic()
    texts = generate_from_prompts(
        ctx.loaded, prompts, config=generation_config(config), seed=sampling_seed(cell.seed)
    )
    samples = [
        SyntheticSample(text=f"{head} {t}".strip(), label=label, release_id="icl-verbatim")
        for head, t, label in zip(starts, texts, labels, strict=True)
    ]
    read = {text for _, quoted in shots for text in quoted}
    # Its generator for the canary test: the label's first prompt that quotes a canary.
    shown_prompts: dict[str, str] = {}
    for prompt, label in zip(prompts, labels, strict=True):
        quotes = any(c.text in prompt for c in state.canaries)
        if label not in shown_prompts or (
            quotes and not any(c.text in shown_prompts[label] for c in state.canaries)
        ):
            shown_prompts[label] = prompt
    perf = generation_perf(ctx, samples, time.monotonic() - start)
    # The control reads only the records it quotes: those are its members for the attack.
    members = [r for r in state.members if r.text in read]
    return CellOutput(
        samples, perf=perf, generator=Generator(shown_prompts), members=members or None
    )
