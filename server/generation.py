"""Steered generation: add a fixed vector to the residual stream at chosen blocks while decoding.

Generation from a sanitized release is post-processing: it can run forever at no privacy cost.
The hooks work for any decoder-only `transformers` model whose blocks return a tensor or a tuple
starting with the hidden states (GPT-2, Llama, Gemma, ...). Decoding is batched with the KV
cache on. Top-p sampling first looks at the top ``candidate_k`` tokens and falls back to a full
sort only when the nucleus is larger, so the sampled distribution is exactly top-p.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast, runtime_checkable

import torch

from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.models import LoadedModel, decoder_layers
from fedsynth.server.decode_attention import use_for_decoding
from fedsynth.server.output_head import BlockedHead, output_head
from fedsynth.server.vocabulary import BYTE_PIECE, check_vocabulary, vocabulary_ids

_MARKUP = re.compile(r"<[^<>\s]+>")
"""Added tokens that are markup, e.g. ``<start_of_image>``: never part of a sample's text."""
_WHITESPACE = " \t\n\r\u2581\u0120\u010a\u0109\u010d"
"""Whitespace, SentencePiece's word marker and byte-level BPE's space/newline/tab/CR stand-ins."""


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings for one generation job."""

    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 0.95
    batch_size: int = 64
    stop_at_newline: bool = True
    candidate_k: int = 2000
    # False: the end-of-sequence token is never sampled, so every row decodes max_new_tokens
    # (equal work on both sides of a throughput comparison, as vLLM's ignore_eos).
    stop_at_eos: bool = True
    # The tokens that may be sampled (fedsynth.server.vocabulary.VOCABULARIES): "full" or
    # "latin" (Latin-script tokens only; the output head computes only those rows).
    vocabulary: str = "full"

    def __post_init__(self) -> None:
        check_vocabulary(self.vocabulary)
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature}: must be > 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}: must be >= 1")


FIRST_WIDTH = 256
"""Candidates of the first nucleus search: holds the top-p nucleus of about 80 % of Gemma's
decoding steps at top_p 0.95 (median nucleus 40 tokens); the other rows go wider."""


@contextlib.contextmanager
def steering(model: Any, deltas: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Add ``deltas[l]`` (shape (H,)) to the output of block l at every position.

    The hook runs on every forward call, so prompt tokens and every decoded token are steered.
    The deltas are moved once to the blocks' device and dtype (bf16 on CUDA).
    """
    blocks = _steered_blocks(model, deltas)  # all checked before any hook is registered
    handles = []
    first = next(blocks[0].parameters())
    for layer, raw in deltas.items():
        delta = raw.to(device=first.device, dtype=first.dtype)
        handles.append(blocks[layer].register_forward_hook(_adding(delta)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _steered_blocks(model: Any, deltas: Mapping[int, torch.Tensor]) -> Any:
    """The model's decoder blocks; an error naming the first layer of ``deltas`` outside them."""
    blocks = decoder_layers(model)
    for layer in deltas:
        if not 0 <= layer < len(blocks):
            raise ConfigError(f"steering layer {layer} outside 0..{len(blocks) - 1}")
    return blocks


def _adding(delta: torch.Tensor) -> Callable[..., Any]:
    """A forward hook adding ``delta`` to a block's hidden states (alone or first of a tuple)."""

    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (output[0] + delta, *output[1:])
        return output + delta

    return hook


@contextlib.contextmanager
def slot_steering(model: Any, deltas: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """:func:`steering` for a compiled forward: the same additions, through buffers that stay.

    A compiled (graph-captured) forward keeps the hooks it was traced with. Here each block
    has, once per model, a buffer and a hook adding it; a release is applied by copying
    ``deltas[l]`` into block l's buffer and removed by zeroing every buffer, so a captured graph
    reads the release at the same addresses whatever it is. The hooks are registered only
    inside the context (outside it the eager model has none); unsteered, they add zeros.
    """
    blocks = _steered_blocks(model, deltas)
    kept: tuple[list[torch.Tensor], list[Callable[..., Any]]] | None = getattr(
        model, "_fedsynth_steering_slots", None
    )
    if kept is None:
        first = next(blocks[0].parameters())
        width = int(model.config.get_text_config().hidden_size)
        slots = [torch.zeros(width, device=first.device, dtype=first.dtype) for _ in blocks]
        kept = (slots, [_adding(slot) for slot in slots])
        object.__setattr__(model, "_fedsynth_steering_slots", kept)  # not a submodule
    slots, hooks = kept
    handles = [block.register_forward_hook(hook) for block, hook in zip(blocks, hooks, strict=True)]
    try:
        for layer, delta in deltas.items():
            slots[layer].copy_(delta.to(device=slots[layer].device, dtype=slots[layer].dtype))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for slot in slots:
            slot.zero_()


def sample_top_p(
    logits: torch.Tensor,
    *,
    top_p: float,
    candidate_k: int,
    generator: torch.Generator,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Sample one token per row from the top-p nucleus of ``softmax(logits / temperature)``.

    Exact: the nucleus is searched among the top ``FIRST_WIDTH`` tokens, then among about
    ``candidate_k`` and ``8 * candidate_k`` (:func:`top_set`: every token above a threshold
    estimated from a sample of the row), then the whole vocabulary, each row going wider only
    while its candidates hold less than ``top_p`` of the mass. Every candidate set is closed
    upward (all tokens at least as likely as any in it), so one with mass >= ``top_p`` holds
    the whole nucleus. Probabilities come from one log-sum-exp over the vocabulary and the
    candidates' logits: no full-vocabulary softmax, division or row copy, which were most of
    the sampling time at Gemma's 262k-token vocabulary.

    Args:
        logits: (batch, vocab) logits, float32 (not modified).
        temperature: divides the logits (1 leaves them as they are).

    Returns:
        (batch,) sampled token ids.
    """
    scaled = logits if temperature == 1.0 else logits / temperature
    log_norm = row_logsumexp(scaled)  # (batch, 1)
    vocab = scaled.shape[-1]
    if top_p >= 1.0:
        probs = torch.exp(scaled - log_norm)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    choice_ids = torch.empty(scaled.shape[0], dtype=torch.long, device=scaled.device)
    pending: torch.Tensor | None = None  # None: every row
    widths = sorted({min(w, vocab) for w in (FIRST_WIDTH, candidate_k, 8 * candidate_k)})
    for tier, width in enumerate(widths):
        rows = scaled if pending is None else scaled[pending]
        norms = log_norm if pending is None else log_norm[pending]
        if tier == 0 or width == vocab:
            top_logits, top_ids = topk_by_blocks(rows, width)  # sorted descending
        else:  # about `width` tokens, without a top-k over the whole row
            top_logits, top_ids = top_set(rows, count_threshold(rows, width))
        top_probs = torch.exp(top_logits - norms)
        fits = top_probs.sum(-1) >= top_p
        if width == vocab:
            fits[:] = True  # the whole vocabulary: rounding may leave its sum a hair below top_p
        indices = torch.arange(len(rows), device=scaled.device) if pending is None else pending
        if bool(fits.any()):
            choice_ids[indices[fits]] = _nucleus_draw(
                top_probs[fits], top_ids[fits], top_p, generator
            )
        pending = indices[~fits]
        if len(pending) == 0:
            return choice_ids
    full_logits, full_ids = torch.sort(scaled[pending], dim=-1, descending=True)
    full_probs = torch.exp(full_logits - log_norm[pending])
    choice_ids[pending] = _nucleus_draw(full_probs, full_ids, top_p, generator)
    return choice_ids


def row_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(x, dim=-1, keepdim=True)`` of a (rows, vocab) tensor, a few rows at a time.

    The same values, 3-4x faster on a CPU for 64 rows of 262k logits (21 → 6 ms, 2 cores): in
    one call the exponentials fill a fresh 67 MB temporary, which the allocator maps (and the
    kernel zeroes) anew every time; a few rows' temporaries are reused from the heap.
    """
    step = max(1, (1 << 20) // max(1, x.shape[-1]))
    if x.shape[0] <= step:
        return torch.logsumexp(x, dim=-1, keepdim=True)
    return torch.cat(
        [torch.logsumexp(x[i : i + step], dim=-1, keepdim=True) for i in range(0, len(x), step)]
    )


def topk_by_blocks(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(x, k, dim=-1)`` (sorted), found among the ``k`` best blocks of each row.

    Each row is cut into blocks of ``b`` columns; the k largest values all lie in the k blocks
    with the largest maxima (a block ranked below k others holds no value above the k-th
    largest: each of those k blocks has one at least as large), so one pass for the block
    maxima and a top-k over k * b candidates replace a top-k over the whole row: 2.6x faster
    over Gemma's 262k logits at k = 256, 1.7x at k = 2000 (2 cores). Exact: the same values;
    among equal values the indices may differ from ``torch.topk``'s (either choice is right).
    Rows too short for blocks to pay go to ``torch.topk``.
    """
    rows, vocab = x.shape
    block = 64
    while block >= 8 and k * block * 8 > vocab:
        block //= 2
    if block < 8 or x.stride(-1) != 1:
        values, indices = torch.topk(x, k, dim=-1)
        return values, indices
    n = vocab // block
    whole = x.as_strided((rows, n, block), (x.stride(0), block, 1))
    best = torch.topk(whole.amax(-1), k, dim=-1, sorted=False).indices  # (rows, k)
    offsets = torch.arange(block, device=x.device)
    candidates = whole.gather(1, best.unsqueeze(-1).expand(rows, k, block)).reshape(rows, -1)
    ids = (best.unsqueeze(-1) * block + offsets).reshape(rows, -1)
    if n * block < vocab:  # the columns after the last whole block are always candidates
        rest = torch.arange(n * block, vocab, device=x.device).expand(rows, -1)
        candidates = torch.cat([candidates, x[:, n * block :]], dim=1)
        ids = torch.cat([ids, rest], dim=1)
    values, where = torch.topk(candidates, k, dim=-1)
    return values, ids.gather(1, where)


SAMPLE_BLOCK = 64
"""Columns per block of :func:`count_threshold`'s sample (every ``SAMPLE_EVERY``-th block)."""
SAMPLE_EVERY = 8


def count_threshold(x: torch.Tensor, k: int) -> torch.Tensor:
    """(rows, 1): a value with about ``k`` values of its row at or above it (an estimate).

    Read from every ``SAMPLE_EVERY``-th block of ``SAMPLE_BLOCK`` columns, so it costs an
    eighth of a pass over the row; the count is only estimated (token ids are spread over the
    vocabulary's frequency ranks), which :func:`sample_top_p` does not rely on: it checks the
    mass of what it finds and goes wider when short.
    """
    rows, vocab = x.shape
    if x.stride(-1) == 1 and vocab >= SAMPLE_BLOCK * SAMPLE_EVERY * 4:
        n = vocab // (SAMPLE_BLOCK * SAMPLE_EVERY)
        blocks = x.as_strided(
            (rows, n, SAMPLE_BLOCK), (x.stride(0), SAMPLE_BLOCK * SAMPLE_EVERY, 1)
        ).reshape(rows, -1)
        share = n * SAMPLE_BLOCK / vocab
    else:
        blocks, share = x, 1.0
    wanted = min(blocks.shape[1], max(1, math.ceil(k * share)))
    return torch.topk(blocks, wanted, dim=-1, sorted=False).values.amin(-1, keepdim=True)


def top_set(x: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every value of each row at or above its ``threshold``, sorted descending, and its column.

    Rows hold different numbers of values: the shorter ones are padded with ``-inf`` (column
    0), which has probability 0 wherever the result is used. The set is closed upward: every
    value above one in it is in it too.
    """
    where = (x >= threshold).nonzero()  # (row, column) pairs, row by row
    row, column = where[:, 0], where[:, 1]
    counts = torch.bincount(row, minlength=x.shape[0])  # a bool tensor's sum is 3x slower
    slot = torch.arange(len(row), device=x.device) - (counts.cumsum(0) - counts)[row]
    width = max(1, int(counts.max())) if len(counts) else 1
    values = torch.full((x.shape[0], width), float("-inf"), dtype=x.dtype, device=x.device)
    columns = torch.zeros((x.shape[0], width), dtype=torch.long, device=x.device)
    values[row, slot] = x[row, column]
    columns[row, slot] = column
    values, order = torch.sort(values, dim=-1, descending=True)
    return values, columns.gather(1, order)


def _nucleus_draw(
    sorted_probs: torch.Tensor, sorted_ids: torch.Tensor, top_p: float, generator: torch.Generator
) -> torch.Tensor:
    """Draw from the smallest prefix of descending-sorted probabilities with mass >= top_p."""
    cumulative = sorted_probs.cumsum(dim=-1)
    keep = (cumulative - sorted_probs) < top_p  # always keeps the first token
    choice = torch.multinomial(sorted_probs * keep, 1, generator=generator)  # (rows, 1)
    return sorted_ids.gather(-1, choice).squeeze(-1)


@torch.inference_mode()
def generate_texts(
    loaded: LoadedModel,
    prompt: str,
    n: int,
    *,
    config: GenerationConfig,
    deltas: Mapping[int, torch.Tensor] | None = None,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Sample ``n`` continuations of ``prompt``, optionally steered, batched with the KV cache.

    Args:
        progress: called with (samples finished, tokens generated) after every batch.
    """
    if n < 0:
        raise ConfigError(f"n={n}: must be >= 0")
    return generate_from_prompts(
        loaded, [prompt] * n, config=config, deltas=deltas, seed=seed, progress=progress
    )


@torch.inference_mode()
def generate_from_prompts(
    loaded: LoadedModel,
    prompts: Sequence[str],
    *,
    config: GenerationConfig,
    deltas: Mapping[int, torch.Tensor] | None = None,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
    refill: bool | None = None,
    static_cache: bool = False,
    compile_steps: bool = False,
) -> list[str]:
    """Sample one continuation per prompt (prompts may differ: left-padded batches).

    Args:
        progress: called with (samples finished, tokens generated) after every batch.
        refill: start the next prompts in a batch's ended rows (:meth:`_TransformersDecoder.
            step_admit`) instead of running each batch until its last row ends. Default: on
            CUDA only. On 2 CPU cores it gained nothing (Gemma 3 270M, 4 x 64 demo-like
            samples: 3.8-4.2 vs 4.0-4.3 samples/s): a step there costs 125 ms plus 3.5 ms a
            row, so fuller batches save about a fifth of the steps' time, which the extra
            prefill passes and cache joins spend again.
        static_cache: decode each batch in a preallocated KV cache whose shapes never change
            (:class:`_StaticCacheDecoder`); ended rows keep computing, unread.
        compile_steps: with ``static_cache``, run the decoding steps through
            ``torch.compile(mode="reduce-overhead")`` (CUDA graphs on CUDA).
    """
    if static_cache and refill:
        raise ConfigError("static_cache=True keeps each batch's rows fixed: it cannot refill")
    if refill is None:
        refill = loaded.device.type == "cuda" and not static_cache
    ctx: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if static_cache and compile_steps:
        ctx = slot_steering(loaded.model, deltas or {})
    elif deltas:
        ctx = steering(loaded.model, deltas)

    def new_decoder() -> Decoder:
        if static_cache:
            return _StaticCacheDecoder(
                loaded, max_new_tokens=config.max_new_tokens, compiled=compile_steps
            )
        return _TransformersDecoder(loaded) if refill else _FixedBatchDecoder(loaded)

    with ctx:
        return sample_continuations(
            loaded.tokenizer,
            prompts,
            new_decoder,
            vocab_rows=_vocab_rows(loaded),
            device=loaded.device,
            config=config,
            seed=seed,
            progress=progress,
        )


class Decoder(Protocol):
    """One batch of sequences in a language model, advanced one token per live row at a time.

    The sampling loop (:func:`sample_continuations`) is shared by every generation backend, so
    the same seed and settings sample by exactly the same rules whatever computes the logits.
    """

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Run the prompts; return (batch, vocab) float32 logits of each prompt's next token."""
        ...

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these live rows (indices into the current live batch), in this order."""
        ...

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Append one token to each live row; return the (live, vocab) next-token logits.

        The logits may live in the decoder's own buffer: valid (and writable) until the next
        ``step`` or ``prefill``.
        """
        ...


@runtime_checkable
class RefillingDecoder(Decoder, Protocol):
    """A :class:`Decoder` that can take new prompts into a running batch.

    With it, :func:`sample_continuations` keeps the batch full: a row that ends is replaced by
    the next prompt at once, instead of the batch thinning until its longest row ends. Rows end
    at a newline after anywhere from 5 to 48 tokens, and a thin batch costs more per row (on
    llama.cpp, 2 cores: 4.3 ms per row at 64 rows, 11.6 ms at 4).
    """

    def step_admit(self, next_ids: torch.Tensor, prompts: list[list[int]]) -> torch.Tensor:
        """:meth:`Decoder.step` for the live rows, then start ``prompts`` as new rows.

        Returns (live + new, vocab) logits: the live rows' next-token logits in their order,
        then each new prompt's first-token logits. Valid until the next call.
        """
        ...


def sample_continuations(
    tokenizer: Any,
    prompts: Sequence[str],
    new_decoder: Callable[[], Decoder],
    *,
    vocab_rows: int,
    device: torch.device,
    config: GenerationConfig,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Sample one continuation per prompt, ``config.batch_size`` prompts per decoder.

    Args:
        new_decoder: a fresh :class:`Decoder` for each batch.
        vocab_rows: rows of the model's output head (can exceed the tokenizer's vocabulary).
        progress: called with (samples finished, tokens generated) after every batch.
    """
    tok = tokenizer
    encoded = [list(tok.encode(p, add_special_tokens=True)) for p in prompts]
    generator = torch.Generator(device=device).manual_seed(seed)
    newline_ids = _newline_token_ids(tok) if config.stop_at_newline else set()
    eos = {tok.eos_token_id} if tok.eos_token_id is not None and config.stop_at_eos else set()
    stops = torch.tensor(sorted(newline_ids | eos), dtype=torch.long, device=device)
    tokens = _token_classes(tok, vocab_size=vocab_rows, stops=newline_ids | eos)
    space = _sampling_space(tok, config, vocab_rows=vocab_rows, tokens=tokens, stops=stops)

    def text_of(row: list[int]) -> str:
        kept = []
        for token in row:
            if token in eos or token in newline_ids:
                break
            kept.append(token)
        return str(tok.decode(kept, skip_special_tokens=True).strip())

    if not encoded:
        return []

    def restricted() -> Decoder:
        decoder = new_decoder()
        restrict = getattr(decoder, "restrict_vocabulary", None)
        if space.kept is not None and restrict is not None:
            restrict(space.kept)
        return decoder

    decoder = restricted()
    longest = max(len(e) for e in encoded) + config.max_new_tokens
    if (
        len(encoded) > config.batch_size
        and isinstance(decoder, RefillingDecoder)
        and longest <= getattr(decoder, "refill_tokens", longest)
    ):
        rows = _sample_refilling(
            decoder,
            encoded,
            config,
            generator=generator,
            stops=stops,
            tokens=tokens,
            progress=progress,
            space=space,
        )
        return [text_of(row) for row in rows]
    texts: list[str] = []
    for start in range(0, len(encoded), config.batch_size):
        chunk = encoded[start : start + config.batch_size]
        batch_rows, n_tokens = _sample_batch(
            decoder if start == 0 else restricted(),
            chunk,
            config,
            generator=generator,
            stops=stops,
            tokens=tokens,
            space=space,
        )
        texts += [text_of(row) for row in batch_rows]
        if progress is not None:
            progress(len(chunk), n_tokens)
    return texts


def _left_padded(
    prompts: list[list[int]], pad_id: int, columns: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts right-aligned to the longest one: (batch, longest) ids, (batch, columns) mask.

    The mask has a 1 under each prompt token; columns beyond the longest prompt (room for the
    tokens to come, in a static cache) start masked.
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), columns), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) : width] = 1
    return ids.to(device), mask.to(device)


class _TransformersDecoder:
    """A :class:`Decoder` over a `transformers` model: left-padded batch, KV cache on."""

    def __init__(self, loaded: LoadedModel) -> None:
        self._loaded = loaded
        tok = loaded.tokenizer
        self._pad_id = int(tok.eos_token_id if tok.eos_token_id is not None else 0)
        if loaded.device.type == "cpu":
            use_for_decoding(loaded.model)
        shared = output_head(loaded)
        # The model's head weights, this decoder's own logits buffer.
        self._shared = shared
        self._head = None if shared is None else BlockedHead(shared.weight)
        self._rows: torch.Tensor | None = None

    def restrict_vocabulary(self, rows: torch.Tensor) -> None:
        """Compute only the logits of token ids ``rows`` (sorted), in that order.

        With the blocked head only those rows of the head are multiplied (the gathered weights
        are kept on the model's shared head, once per vocabulary); without it the model's
        logits are narrowed to them.
        """
        self._rows = rows
        if self._shared is not None:
            self._head = BlockedHead(self._shared.rows(rows))

    admit_fraction = 0.25
    """Rows join a running batch once a quarter of it has ended: each admission is a prefill
    pass of its own and a copy of the KV cache, too dear for a row or two at a time."""

    @property
    def refill_tokens(self) -> int:
        """The longest row (prompt and sample) a refilled batch may hold.

        A sliding-window layer keeps only its last ``window - 1`` positions and counts the
        rest; joining and trimming caches column by column is exact only below that.
        """
        window = getattr(self._loaded.model.config, "sliding_window", None)
        if not window and hasattr(self._loaded.model.config, "get_text_config"):
            window = getattr(self._loaded.model.config.get_text_config(), "sliding_window", None)
        return int(window) - 2 if window else 1 << 30

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        device = self._loaded.device
        width = max(len(p) for p in prompts)
        ids, mask = _left_padded(prompts, self._pad_id, width, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self._padded = bool((mask == 0).any())
        extra: dict[str, Any] = {}
        if device.type == "cpu":
            from fedsynth.server.kv_cache import growing_cache

            extra["past_key_values"] = growing_cache(self._loaded.model.config)
        logits = self._forward(
            input_ids=ids,
            attention_mask=mask if self._padded else None,
            position_ids=positions,
            **extra,
        )
        self._mask = mask
        self._next_pos = positions[:, -1] + 1
        return logits

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        logits = self._forward(
            input_ids=next_ids.unsqueeze(1),
            attention_mask=self._mask if self._padded else None,
            position_ids=self._next_pos.unsqueeze(1),
            past_key_values=self._past,
        )
        self._next_pos = self._next_pos + 1
        return logits

    def _forward(self, **inputs: Any) -> torch.Tensor:
        """Run the model on ``inputs`` (KV cache kept); the last position's fp32 logits.

        On a CPU with a plain head (:func:`~fedsynth.server.output_head.output_head`) the base
        model runs and the head writes into this decoder's reused buffer: the logits are valid
        until this decoder's next call.
        """
        head = self._head
        if head is None:
            # logits_to_keep: the head over a 262k vocabulary at every prompt position is waste
            out = self._loaded.model(**inputs, use_cache=True, logits_to_keep=1)
            self._past = out.past_key_values
            logits = out.logits[:, -1, :]
            if self._rows is not None:
                logits = logits.index_select(1, self._rows)
            return cast(torch.Tensor, logits.float())
        out = self._loaded.model.base_model(**inputs, use_cache=True)
        self._past = out.past_key_values
        return head(out.last_hidden_state[:, -1, :])

    def step_admit(self, next_ids: torch.Tensor, prompts: list[list[int]]) -> torch.Tensor:
        """Step the live rows, prefill ``prompts`` on their own and join the two KV caches.

        Both caches are left-padded to one width (the padding is masked and the positions are
        each row's own), so every row attends to exactly its own tokens as in a fresh batch;
        cache columns that are padding in every row are dropped, so the width stays that of
        the longest live row.
        """
        live = self.step(next_ids) if len(next_ids) else None
        if not prompts:
            if live is None:
                raise ConfigError("step_admit: no live rows and no prompts to admit")
            return live
        new = _TransformersDecoder(self._loaded)
        # The same vocabulary and head rows as this decoder, a logits buffer of its own.
        new._rows = self._rows
        new._head = None if self._head is None else BlockedHead(self._head.weight)
        admitted = new.prefill(prompts)
        if live is None:  # every row had ended: the new batch replaces the old
            self._past, self._mask, self._next_pos = new._past, new._mask, new._next_pos
            self._padded = new._padded
            return admitted
        width = max(self._mask.shape[1], new._mask.shape[1])
        for part in (self, new):
            part._left_pad(width - part._mask.shape[1])
        for mine, theirs in zip(self._past.layers, new._past.layers, strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
            mine.values = torch.cat([mine.values, theirs.values], dim=0)
        self._mask = torch.cat([self._mask, new._mask], dim=0)
        self._next_pos = torch.cat([self._next_pos, new._next_pos], dim=0)
        self._trim()
        self._padded = bool((self._mask == 0).any())
        return torch.cat([live, admitted], dim=0)

    def _left_pad(self, columns: int) -> None:
        """Add ``columns`` masked cache columns in front of every row."""
        if columns <= 0:
            return
        self._mask = torch.nn.functional.pad(self._mask, (columns, 0))
        for layer in self._past.layers:
            layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, columns, 0))
            layer.values = torch.nn.functional.pad(layer.values, (0, 0, columns, 0))
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length += columns

    def _trim(self) -> None:
        """Drop the leading cache columns that are padding in every row."""
        used = torch.nonzero(self._mask.any(dim=0)).flatten()
        columns = int(used[0]) if len(used) else 0
        if columns == 0:
            return
        self._mask = self._mask[:, columns:]
        for layer in self._past.layers:
            layer.keys = layer.keys[:, :, columns:, :]
            layer.values = layer.values[:, :, columns:, :]
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length -= columns

    def keep(self, rows: torch.Tensor) -> None:
        # Drop finished rows from the batch and the KV cache: less work per step. The cache is
        # not trimmed here (a sliding-window layer may hold fewer columns than the mask);
        # step_admit trims, where refill_tokens bounds the width.
        self._past.batch_select_indices(rows)
        self._mask = self._mask[rows]
        self._next_pos = self._next_pos[rows]


class _FixedBatchDecoder:
    """:class:`_TransformersDecoder` without ``step_admit``: each batch runs to its end."""

    def __init__(self, loaded: LoadedModel) -> None:
        self._inner = _TransformersDecoder(loaded)

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        return self._inner.prefill(prompts)

    def keep(self, rows: torch.Tensor) -> None:
        self._inner.keep(rows)

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        return self._inner.step(next_ids)

    def restrict_vocabulary(self, rows: torch.Tensor) -> None:
        self._inner.restrict_vocabulary(rows)


STATIC_COLUMNS = 64
"""A compiled decoder's cache width is rounded up to a multiple of this: fewer distinct shapes,
fewer captures, for a few masked columns."""


class _StaticCacheDecoder:
    """A fixed-batch :class:`Decoder` over a preallocated KV cache (`transformers` StaticCache).

    Every step runs the whole batch with the same tensor shapes (ended rows are fed padding and
    their logits are never read), so the step can be captured once and replayed (CUDA graphs
    through ``torch.compile``): on a GPU the per-step kernel launches, not the arithmetic, are
    what a small model's decoding costs. The attention mask spans the whole cache from the start
    (future columns masked), and each row keeps its own positions as in a left-padded batch.
    """

    def __init__(self, loaded: LoadedModel, *, max_new_tokens: int, compiled: bool) -> None:
        self._loaded = loaded
        self._max_new_tokens = max_new_tokens
        tok = loaded.tokenizer
        self._pad_id = int(tok.eos_token_id if tok.eos_token_id is not None else 0)
        self._compiled = compiled

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        model, device = self._loaded.model, self._loaded.device
        batch = len(prompts)
        width = max(len(p) for p in prompts)
        columns = width + self._max_new_tokens
        window = getattr(model.config.get_text_config(), "sliding_window", None)
        # A sliding-window layer counts its length in a Python int, which a captured graph
        # would freeze: compiled decoding needs every row to fit the window (then a sliding
        # layer is a plain static one); a longer batch runs eagerly.
        compiled = self._compiled and (not window or columns <= int(window))
        if compiled:
            columns = -(-columns // STATIC_COLUMNS) * STATIC_COLUMNS
            if window:
                columns = min(columns, int(window))
        ids, mask = _left_padded(prompts, self._pad_id, columns, device)
        positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
        # A captured graph reads the cache at fixed addresses: a compiled decoder reuses (resets)
        # the last cache of its shape, kept on the model, instead of capturing again.
        reused = getattr(model, "_fedsynth_static_cache", None) if compiled else None
        if reused is not None and reused[0] == (batch, columns):
            self._cache = reused[1]
            self._cache.reset()
        else:
            self._cache = StaticCache(config=model.config, max_cache_len=columns)
            if compiled:
                for i, layer in enumerate(self._cache.layers):
                    if layer.is_sliding:  # the whole row fits the window: nothing slides
                        self._cache.layers[i] = StaticLayer(max_cache_len=columns)
                object.__setattr__(model, "_fedsynth_static_cache", ((batch, columns), self._cache))
        self._forward: Any = model
        if compiled:
            self._forward = getattr(model, "_fedsynth_compiled", None)
            if self._forward is None:
                self._forward = torch.compile(
                    model.forward, mode="reduce-overhead", fullgraph=False, dynamic=False
                )
                object.__setattr__(model, "_fedsynth_compiled", self._forward)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self._cache,
            cache_position=torch.arange(width, device=device),
            use_cache=True,
            logits_to_keep=1,
        )
        self._mask = mask
        self._column = width
        self._next_pos = positions[:, -1] + 1
        self._live = torch.arange(batch, device=device)
        self._ids = torch.full((batch, 1), self._pad_id, dtype=torch.long, device=device)
        return cast(torch.Tensor, out.logits[:, -1, :].float())

    def keep(self, rows: torch.Tensor) -> None:
        self._live = self._live[rows.to(self._live.device)]

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        if self._column >= self._mask.shape[1]:
            raise ConfigError(
                f"static cache full: {self._mask.shape[1]} columns, max_new_tokens="
                f"{self._max_new_tokens}"
            )
        self._ids.fill_(self._pad_id)
        self._ids[self._live, 0] = next_ids
        self._mask[:, self._column] = 1
        out = self._forward(
            input_ids=self._ids,
            attention_mask=self._mask,
            position_ids=self._next_pos.unsqueeze(1),
            past_key_values=self._cache,
            cache_position=torch.tensor([self._column], device=self._mask.device),
            use_cache=True,
        )
        self._column += 1
        self._next_pos = self._next_pos + 1
        return cast(torch.Tensor, out.logits[self._live, -1, :].float())


def _sample_batch(
    decoder: Decoder,
    prompts: list[list[int]],
    config: GenerationConfig,
    *,
    generator: torch.Generator,
    stops: torch.Tensor,
    tokens: _TokenClasses | None = None,
    space: _SamplingSpace | None = None,
) -> tuple[list[list[int]], int]:
    """Token ids sampled for each prompt, and the number of tokens generated.

    Control tokens (special and added markup tokens other than the stops, such as
    ``<start_of_image>``) are never sampled, and a row cannot stop before it has produced a
    token with visible text: no empty or whitespace-only samples from an early stop.
    """
    batch = len(prompts)
    logits = decoder.prefill(prompts)
    device = logits.device
    space = space or _SamplingSpace.whole(tokens, stops)
    rows: list[list[int]] = [[] for _ in range(batch)]
    active = list(range(batch))  # original row of each live batch entry
    started = torch.zeros(batch, dtype=torch.bool, device=device)  # visible text produced yet
    visible = tokens.visible.to(device) if tokens is not None else None
    for step in range(config.max_new_tokens):
        next_ids = space.draw(logits, started=started, config=config, generator=generator)
        finished = torch.isin(next_ids, stops)
        # Without vocabulary classes only the first token is kept from stopping.
        started = started | visible[next_ids] if visible is not None else torch.ones_like(finished)
        for slot, token in enumerate(next_ids.tolist()):
            rows[active[slot]].append(token)
        if bool(finished.all()) or step == config.max_new_tokens - 1:
            break
        if bool(finished.any()):
            keep = torch.nonzero(~finished).flatten()
            decoder.keep(keep)
            active = [active[i] for i in keep.tolist()]
            next_ids = next_ids[keep]
            started = started[keep]
        logits = decoder.step(next_ids)
    return rows, sum(len(r) for r in rows)


def _draw(
    logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator
) -> torch.Tensor:
    """One token per row by the config's top-p and temperature."""
    return sample_top_p(
        logits,
        top_p=config.top_p,
        candidate_k=config.candidate_k,
        generator=generator,
        temperature=config.temperature,
    )


def _mask_logits(
    logits: torch.Tensor,
    *,
    started: torch.Tensor,
    stops: torch.Tensor,
    control: torch.Tensor | None,
) -> None:
    """Never sample control tokens; no stop in a row before it has shown visible text."""
    if control is not None and len(control):
        logits[:, control] = float("-inf")
    if len(stops) and not bool(started.all()):
        waiting = torch.nonzero(~started).flatten()
        logits[waiting.unsqueeze(1), stops.unsqueeze(0)] = float("-inf")


def _sample_refilling(
    decoder: RefillingDecoder,
    prompts: list[list[int]],
    config: GenerationConfig,
    *,
    generator: torch.Generator,
    stops: torch.Tensor,
    tokens: _TokenClasses,
    progress: Callable[[int, int], None] | None = None,
    space: _SamplingSpace | None = None,
) -> list[list[int]]:
    """Token ids sampled for each prompt, the batch refilled with the next prompt as rows end.

    The same rules as :func:`_sample_batch` (control tokens banned, no stop before visible
    text, at most ``max_new_tokens`` per row), one shared generator; at most
    ``config.batch_size`` rows are live at a time. ``progress`` gets (rows finished, tokens)
    after every step in which rows finished.
    """
    size = config.batch_size
    # A decoder whose every admission costs a pass of its own waits for that many free rows.
    admit_at = max(1, math.ceil(size * float(getattr(decoder, "admit_fraction", 0.0))))
    logits = decoder.prefill(prompts[:size])
    device = logits.device
    live = list(range(min(size, len(prompts))))  # prompt index of each live row
    waiting = len(live)  # the next prompt to admit
    rows: list[list[int]] = [[] for _ in prompts]
    started = torch.zeros(len(live), dtype=torch.bool, device=device)
    space = space or _SamplingSpace.whole(tokens, stops)
    visible = tokens.visible.to(device)
    sampled = 0
    while live:
        next_ids = space.draw(logits, started=started, config=config, generator=generator)
        started = started | visible[next_ids]
        ended = torch.isin(next_ids, stops)
        for slot, token in enumerate(next_ids.tolist()):
            rows[live[slot]].append(token)
            if len(rows[live[slot]]) >= config.max_new_tokens:
                ended[slot] = True
        sampled += len(live)
        if not bool(ended.any()):
            logits = decoder.step(next_ids)
            continue
        keep = torch.nonzero(~ended).flatten()
        free = size - len(keep)
        admitted = []
        if free >= min(admit_at, len(prompts) - waiting) or len(keep) == 0:
            admitted = list(range(waiting, min(len(prompts), waiting + free)))
        waiting += len(admitted)
        if progress is not None:
            progress(int(ended.sum()), sampled)
            sampled = 0
        if len(keep) == 0 and not admitted:
            break
        decoder.keep(keep)
        if admitted:
            logits = decoder.step_admit(next_ids[keep], [prompts[i] for i in admitted])
        else:
            logits = decoder.step(next_ids[keep])
        live = [live[i] for i in keep.tolist()] + admitted
        started = torch.cat(
            [started[keep], torch.zeros(len(admitted), dtype=torch.bool, device=device)]
        )
    return rows


@dataclass(frozen=True)
class _SamplingSpace:
    """The logit columns a step samples from, and the token id of each column.

    With the full vocabulary a column is its token id. With a restricted one
    (:mod:`fedsynth.server.vocabulary`) column i is token ``kept[i]``: a decoder that can
    (:meth:`_TransformersDecoder.restrict_vocabulary`) computes only those logits, any other
    decoder's full rows are narrowed to them here.
    """

    kept: torch.Tensor | None
    """Token id of each column (sorted), or None: every token, column = id."""
    control: torch.Tensor | None
    """Columns never sampled (control tokens)."""
    stops: torch.Tensor
    """Columns of the stop tokens (no stop before a row shows visible text)."""

    @staticmethod
    def whole(tokens: _TokenClasses | None, stops: torch.Tensor) -> _SamplingSpace:
        """Every token of the head, column = token id."""
        control = tokens.control.to(stops.device) if tokens is not None else None
        return _SamplingSpace(kept=None, control=control, stops=stops)

    def draw(
        self,
        logits: torch.Tensor,
        *,
        started: torch.Tensor,
        config: GenerationConfig,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """One token id per row: the rules of :func:`_mask_logits`, then top-p (:func:`_draw`)."""
        kept = self.kept
        if kept is not None and logits.shape[-1] != len(kept):
            logits = logits.index_select(1, kept)  # a decoder that computed every row
        _mask_logits(logits, started=started, stops=self.stops, control=self.control)
        columns = _draw(logits, config, generator)
        return columns if kept is None else kept[columns]


def _sampling_space(
    tokenizer: Any,
    config: GenerationConfig,
    *,
    vocab_rows: int,
    tokens: _TokenClasses,
    stops: torch.Tensor,
) -> _SamplingSpace:
    """The sampling space of ``config.vocabulary`` (stop tokens always in it)."""
    kept = vocabulary_ids(tokenizer, vocab_rows=vocab_rows, name=config.vocabulary)
    if kept is None:
        return _SamplingSpace.whole(tokens, stops)
    device = stops.device
    kept = torch.unique(torch.cat([kept, stops.cpu()]))  # sorted
    column = torch.full((vocab_rows,), -1, dtype=torch.long)
    column[kept] = torch.arange(len(kept))

    def columns_of(ids: torch.Tensor) -> torch.Tensor:
        found = column[ids.cpu()]
        return found[found >= 0].to(device)

    return _SamplingSpace(
        kept=kept.to(device), control=columns_of(tokens.control), stops=columns_of(stops)
    )


@dataclass(frozen=True)
class _TokenClasses:
    """Vocabulary classes for sampling: ids never to sample, and ids that show visible text."""

    control: torch.Tensor
    """Special and added markup tokens other than the stops (long ids)."""
    visible: torch.Tensor
    """(vocab,) bool: the token decodes to non-whitespace text."""


def _vocab_rows(loaded: LoadedModel) -> int:
    """Rows of the model's output head (can exceed the tokenizer's vocabulary)."""
    embeddings = loaded.model.get_output_embeddings()
    if embeddings is not None and hasattr(embeddings, "weight"):
        weight = embeddings.weight
        # A dynamically quantized head (torch.ao) exposes its weight through a method.
        return int((weight() if callable(weight) else weight).shape[0])
    return int(len(loaded.tokenizer) if hasattr(loaded.tokenizer, "__len__") else 0)


def _token_classes(tokenizer: Any, *, vocab_size: int, stops: set[int]) -> _TokenClasses:
    """Control and visible token ids of ``tokenizer`` (computed once per tokenizer)."""
    cached = getattr(tokenizer, "_fedsynth_token_classes", None)
    if cached is not None and cached[0] == (vocab_size, frozenset(stops)):
        return cast(_TokenClasses, cached[1])
    control: set[int] = set(getattr(tokenizer, "all_special_ids", None) or ())
    for attr in ("bos_token_id", "pad_token_id", "unk_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            control.add(int(value))
    for index, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        content = str(getattr(added, "content", added))
        if getattr(added, "special", False) or _MARKUP.fullmatch(content):
            control.add(int(index))
    control -= stops
    known = min(vocab_size, _tokenizer_size(tokenizer))
    shows = _token_shows_text(tokenizer, known)
    for index in control | stops:
        if index < known:
            shows[index] = False
    visible = torch.zeros(vocab_size, dtype=torch.bool)
    visible[:known] = torch.tensor(shows, dtype=torch.bool)
    # Rows of the head beyond the tokenizer decode to nothing: never sample them.
    control.update(range(known, vocab_size))
    classes = _TokenClasses(
        control=torch.tensor(sorted(control), dtype=torch.long), visible=visible
    )
    with contextlib.suppress(AttributeError):
        tokenizer._fedsynth_token_classes = ((vocab_size, frozenset(stops)), classes)
    return classes


def _token_shows_text(tokenizer: Any, count: int) -> list[bool]:
    """Whether each id 0..count-1 shows visible (non-whitespace) text.

    One pass over ``get_vocab()`` where the tokenizer has it: decoding a 262k-entry vocabulary
    one id at a time takes seconds. Whitespace markers (SentencePiece's ``▁``, byte-level BPE's
    ``Ġ``/``Ċ``/``ĉ``) count as whitespace, byte-fallback pieces (``<0x0A>``) as no text.
    """
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else None
    if not vocab:
        return [bool(tokenizer.decode([i], skip_special_tokens=True).strip()) for i in range(count)]
    shows = [False] * count
    for piece, index in vocab.items():
        if 0 <= index < count:
            shows[index] = bool(piece.strip(_WHITESPACE)) and not BYTE_PIECE.fullmatch(piece)
    return shows


def _tokenizer_size(tokenizer: Any) -> int:
    if hasattr(tokenizer, "__len__"):
        return len(tokenizer)
    return int(tokenizer.vocab_size)


def _newline_token_ids(tokenizer: Any) -> set[int]:
    """Ids of vocabulary entries that contain a newline (generation stops at the first one)."""
    cached = getattr(tokenizer, "_fedsynth_newline_ids", None)
    if cached is not None:
        return set(cached)
    ids: set[int] = set()
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for piece, index in vocab.items():
        if "\n" in piece or "Ċ" in piece or "<0x0A>" in piece:
            ids.add(int(index))
    if not vocab:
        ids.update(tokenizer.encode("\n", add_special_tokens=False))
    with contextlib.suppress(AttributeError):
        tokenizer._fedsynth_newline_ids = frozenset(ids)
    return ids


def steering_deltas(
    directions: Mapping[int, torch.Tensor], *, strength: float, residual_norms: Mapping[int, float]
) -> dict[int, torch.Tensor]:
    """Scale unit directions to ``strength * r_l`` where r_l is the typical residual norm."""
    deltas = {}
    for layer, vector in directions.items():
        norm = float(vector.norm())
        if norm == 0.0:
            raise ConfigError(f"steering vector at layer {layer} is zero")
        deltas[layer] = vector / norm * strength * float(residual_norms[layer])
    return deltas


@torch.inference_mode()
def text_logprobs(
    loaded: LoadedModel,
    prompt: str,
    texts: list[str],
    *,
    deltas: Mapping[int, torch.Tensor] | None = None,
    max_text_tokens: int = 64,
    batch_size: int = 8,
) -> list[float]:
    """Mean per-token log-probability of each text as a continuation of ``prompt``.

    With ``deltas`` the model is steered exactly as during generation. Used to check that a
    class vector makes that class's real texts more likely, and for likelihood-based audits.
    Texts are scored ``batch_size`` at a time, right-padded: attention is causal, so padding
    after a text changes none of its positions, and batching halves the cost on a CPU.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: must be >= 1")
    tok = loaded.tokenizer
    prompt_ids, encoded = encode_scored_texts(tok, prompt, texts, max_text_tokens)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    start = len(prompt_ids)
    # Similar lengths share a batch, so little compute goes to padding.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = [0.0] * len(encoded)
    ctx = steering(loaded.model, deltas) if deltas else contextlib.nullcontext()
    with ctx, torch.inference_mode():
        for first in range(0, len(order), batch_size):
            batch = order[first : first + batch_size]
            width = start + max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                seq = prompt_ids + encoded[i]
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            # The output head only at the positions that predict a text token (from the last
            # prompt token on): over a 262k vocabulary the head costs more than the blocks.
            logits = loaded.model(
                input_ids=ids.to(loaded.device),
                attention_mask=mask.to(loaded.device),
                use_cache=False,
                logits_to_keep=width - start + 1,
            ).logits
            for row, i in enumerate(batch):
                out[i] = mean_token_logprob(logits[row, : len(encoded[i])], encoded[i])
    return out


def encode_scored_texts(
    tokenizer: Any, prompt: str, texts: Sequence[str], max_text_tokens: int
) -> tuple[list[int], list[list[int]]]:
    """Prompt ids (with BOS) and each text's ids (no BOS, truncated) for likelihood scoring.

    Raises:
        ConfigError: a text encodes to no tokens.
    """
    prompt_ids = list(tokenizer.encode(prompt, add_special_tokens=True))
    encoded: list[list[int]] = []
    for text in texts:
        text_ids = list(tokenizer.encode(text, add_special_tokens=False))[:max_text_tokens]
        if not text_ids:
            raise ConfigError("text_logprobs: empty text")
        encoded.append(text_ids)
    return prompt_ids, encoded


def mean_token_logprob(logits: torch.Tensor, ids: Sequence[int]) -> float:
    """Mean log-probability of ``ids`` under (len(ids), vocab) next-token ``logits``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(list(ids), device=logp.device)
    return float(logp.gather(-1, target.unsqueeze(-1)).mean())
