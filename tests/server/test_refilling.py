"""The refilling sampling loop: a batch kept full by starting the next prompt as a row ends."""

from __future__ import annotations

import itertools

import torch

from fedsynth.server.generation import (
    GenerationConfig,
    RefillingDecoder,
    _sample_refilling,
    _TokenClasses,
)

VOCAB = 12
STOP = 0
MARKUP = 11  # a control token: never sampled


class FakeDecoder:
    """Rows of a toy model: prompt p's row prefers token 1 + p % 9 strongly, stops now and then.

    The decoder keeps, per live row, the prompt it belongs to and every token fed to it, so a
    loop that sends a token to the wrong row or loses a row's place is caught.
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.live: list[int] = []  # prompt id of each live row
        self.fed: dict[int, list[int]] = {}
        self.calls: list[tuple[int, int]] = []  # (live rows, prompts started) after each call

    def _logits(self) -> torch.Tensor:
        logits = torch.full((len(self.live), VOCAB), -4.0)
        for slot, prompt in enumerate(self.live):
            logits[slot, 1 + prompt % 9] = 2.0
            logits[slot, STOP] = 0.5
            logits[slot, MARKUP] = 5.0  # would win if control tokens were not banned
        self.calls.append((len(self.live), len(self.fed)))
        assert len(self.live) <= self.batch_size
        return logits

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        self.live = [p[0] for p in prompts]
        for p in self.live:
            self.fed[p] = []
        return self._logits()

    def keep(self, rows: torch.Tensor) -> None:
        self.live = [self.live[i] for i in rows.tolist()]

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        for prompt, token in zip(self.live, next_ids.tolist(), strict=True):
            self.fed[prompt].append(token)
        return self._logits()

    def step_admit(self, next_ids: torch.Tensor, prompts: list[list[int]]) -> torch.Tensor:
        for prompt, token in zip(self.live, next_ids.tolist(), strict=True):
            self.fed[prompt].append(token)
        for p in prompts:
            assert p[0] not in self.fed, "a prompt admitted twice"
            self.fed[p[0]] = []
            self.live.append(p[0])
        return self._logits()


def _classes() -> _TokenClasses:
    visible = torch.ones(VOCAB, dtype=torch.bool)
    visible[STOP] = False
    visible[MARKUP] = False
    return _TokenClasses(control=torch.tensor([MARKUP]), visible=visible)


def _run(
    n: int, *, batch: int, max_new: int, seed: int, admit_fraction: float = 0.0
) -> tuple[list[list[int]], FakeDecoder]:
    decoder = FakeDecoder(batch)
    decoder.admit_fraction = admit_fraction  # type: ignore[attr-defined]
    assert isinstance(decoder, RefillingDecoder)
    finished: list[tuple[int, int]] = []
    rows = _sample_refilling(
        decoder,
        [[p] for p in range(n)],
        GenerationConfig(max_new_tokens=max_new, batch_size=batch),
        generator=torch.Generator().manual_seed(seed),
        stops=torch.tensor([STOP]),
        tokens=_classes(),
        progress=lambda done, tokens: finished.append((done, tokens)),
    )
    assert sum(d for d, _ in finished) == n
    assert sum(t for _, t in finished) == sum(len(r) for r in rows)
    return rows, decoder


def test_every_prompt_gets_its_own_row_under_the_same_rules() -> None:
    rows, decoder = _run(50, batch=8, max_new=6, seed=1)
    assert len(rows) == 50
    for prompt, row in enumerate(rows):
        assert 1 <= len(row) <= 6
        assert row[0] != STOP, "stopped before any visible text"
        assert MARKUP not in row
        assert STOP not in row[:-1], "tokens sampled after the row's stop"
        assert row.count(1 + prompt % 9) >= len(row) // 2, "a row got another prompt's tokens"
        # What the decoder was fed for this row is the row minus its last token.
        assert decoder.fed[prompt] == row[:-1]


def test_the_batch_stays_full_while_prompts_wait() -> None:
    n, batch, max_new = 60, 8, 10
    _, decoder = _run(n, batch=batch, max_new=max_new, seed=2)
    # While prompts wait, every call decodes a full batch; only the tail thins.
    waiting = [width for width, started in decoder.calls if started < n]
    assert waiting and all(width == batch for width in waiting)
    assert decoder.calls[-1][1] == n
    # Fewer decoding calls than fixed batches, each running to its longest row, would take.
    assert len(decoder.calls) < n // batch * max_new


def test_same_seed_same_rows() -> None:
    assert _run(30, batch=4, max_new=5, seed=3)[0] == _run(30, batch=4, max_new=5, seed=3)[0]
    assert _run(30, batch=4, max_new=5, seed=3)[0] != _run(30, batch=4, max_new=5, seed=4)[0]


def test_a_decoder_that_admits_in_bulk_waits_for_a_quarter_of_its_rows() -> None:
    n, batch = 60, 8
    rows, decoder = _run(n, batch=batch, max_new=10, seed=5, admit_fraction=0.25)
    assert len(rows) == n and all(rows)
    assert all(decoder.fed[p] == row[:-1] for p, row in enumerate(rows))
    started = [s for _, s in decoder.calls]
    admissions = [b - a for a, b in itertools.pairwise(started) if b > a]
    # Each admission brings at least two rows (a quarter of 8), but the very last may be short.
    assert admissions and all(k >= 2 for k in admissions[:-1])
    # Rows did end one at a time now and then: without the threshold some admissions were 1.
    _, eager = _run(n, batch=batch, max_new=10, seed=5)
    eager_started = [s for _, s in eager.calls]
    assert 1 in [b - a for a, b in itertools.pairwise(eager_started)]
