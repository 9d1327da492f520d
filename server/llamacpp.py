"""llama.cpp generation backend: the packaged GGUF model, quantized, steered by a control vector.

llama.cpp adds a control vector's layer-``l`` row to the output of block ``l`` (after the
block's second residual add), which is exactly where the `transformers` path's forward hook
adds ``deltas[l]``; block 0 cannot carry one. Tokenization, the vocabulary classes and the
sampling loop are the `transformers` path's own (the tokenizer of the fp32 conversion of the
same GGUF file), so only the logits come from llama.cpp. Decoding is batched through the
low-level API: one sequence per sample, identical prompts prefilled once and copied (also from
a live row, or from a spare sequence that keeps a finished row's prompt), and a finished row's
sequence taking the next prompt at once (the batch stays full instead of decoding its last few
rows at nearly the cost of a full batch).

The release's fingerprint describes the fp32 weights; llama.cpp computes with the quantized
ones (8-bit activations, f16 KV cache), so its logits differ slightly from the fp32 path's. The
backend checks that its GGUF is the very file the fp32 model was converted from.

While generating, the output head runs in torch (bf16, on CPUs with native bf16 products) from
the final-norm hidden states llama.cpp hands over: about 30 instead of 130 ms per step of 64
rows for Gemma 3 270M, 1.6-2x steered tokens/s (:mod:`fedsynth.server.llamacpp_head`); scoring
keeps llama.cpp's logits.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.models import (
    PACKAGED_MODELS,
    cache_root,
    load_tokenizer,
    model_fingerprint,
    resolve_model_dir,
)
from fedsynth.server.generation import (
    GenerationConfig,
    encode_scored_texts,
    mean_token_logprob,
    sample_continuations,
)
from fedsynth.server.llamacpp_head import (
    HiddenCapture,
    check_head,
    compare_heads,
    head_weight,
    heads_agree,
)
from fedsynth.server.output_head import BlockedHead, native_bf16

INSTALL = 'pip install "fedsynth[llamacpp]"'
"""How to get the backend (llama-cpp-python compiles llama.cpp: minutes, once per machine)."""


def import_llama_cpp() -> Any:
    """The ``llama_cpp`` module, refused with the install command or when it cannot steer."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ConfigError(
            f"backend='llamacpp' needs llama-cpp-python, which is not installed: {INSTALL}"
        ) from exc
    if control_vector_function(llama_cpp) is None:
        version = getattr(llama_cpp, "__version__", "?")
        raise ConfigError(
            f"llama-cpp-python {version}: this llama.cpp build has no control-vector API "
            "(llama_set_adapter_cvec or llama_apply_adapter_cvec); install a build that has it: "
            f"{INSTALL}"
        )
    return llama_cpp


def check_available(model: str) -> Any:
    """Refuse early (before any work) a model or an install the backend cannot run.

    Returns:
        The ``llama_cpp`` module.
    """
    if model not in PACKAGED_MODELS:
        raise ConfigError(
            f"model={model!r}: the llama.cpp backend runs the packaged GGUF models "
            f"({', '.join(PACKAGED_MODELS)}); use --backend transformers for other models"
        )
    return import_llama_cpp()


def control_vector_function(module: Any) -> Callable[..., int] | None:
    """llama.cpp's control-vector setter under its current or its older name, if any."""
    for name in ("llama_set_adapter_cvec", "llama_apply_adapter_cvec"):
        function = getattr(module, name, None)
        if callable(function):
            return function  # type: ignore[no-any-return]
    return None


def control_vector(
    deltas: Mapping[int, torch.Tensor], *, num_layers: int, hidden_size: int
) -> tuple[np.ndarray, int, int]:
    """The control-vector buffer that adds ``deltas[l]`` to block ``l``'s output.

    llama.cpp's buffer starts at block 1: block ``l``'s row is
    ``data[(l - 1) * H : l * H]``; every other row is zero. Blocks 1 .. num_layers - 2 can be
    steered: block 0 has no row, and at the last block llama.cpp's addition does not match the
    `transformers` hook's (measured on both packaged models).

    Returns:
        (float32 buffer of (num_layers - 1) * H values, first steered block, last steered block)

    Raises:
        ConfigError: a layer outside 1..num_layers - 2 or a vector of the wrong width.
    """
    data = np.zeros((num_layers - 1) * hidden_size, dtype=np.float32)
    for layer, delta in deltas.items():
        if layer == 0:
            raise ConfigError(
                "steering layer 0: llama.cpp cannot steer block 0 (its control vectors start at "
                "block 1); use --backend transformers for this release"
            )
        if layer == num_layers - 1:
            raise ConfigError(
                f"steering layer {layer}: llama.cpp's control vector at the last block does not "
                "act as the transformers hook does (measured: logit changes correlate 0.3-0.6, "
                "2-6x larger); use --backend transformers for this release"
            )
        if not 0 < layer < num_layers:
            raise ConfigError(f"steering layer {layer} outside 1..{num_layers - 2}")
        if tuple(delta.shape) != (hidden_size,):
            raise ConfigError(
                f"steering vector at layer {layer} has shape {tuple(delta.shape)}, the model's "
                f"residual stream is ({hidden_size},)"
            )
        start = (layer - 1) * hidden_size
        data[start : start + hidden_size] = delta.detach().to(torch.float32).cpu().numpy()
    return data, min(deltas), max(deltas)


class LlamaCppBackend:
    """A packaged GGUF model on llama.cpp, steered by control vectors (see the module doc)."""

    refills_batch = True
    """A call with more prompts than the batch keeps the batch full as rows end (each
    sequence has its own KV cache, so a finished row's sequence takes the next prompt)."""

    def __init__(self, model: str, *, threads: int | None = None, head: str = "auto") -> None:
        if threads is not None and threads < 1:
            raise ConfigError(f"threads={threads}: must be >= 1")
        check_head(head)
        self._lib = check_available(model)
        packaged = PACKAGED_MODELS[model]
        self._set_cvec = control_vector_function(self._lib)
        self.model_name = model
        self.threads = threads or max(1, torch.get_num_threads())
        self._gguf = packaged.gguf_path(cache_root())
        fp32_dir = Path(resolve_model_dir(model))
        _check_same_source(fp32_dir, packaged.package, packaged.gguf_file)
        self._fp32_dir = fp32_dir
        self.tokenizer = load_tokenizer(model, str(fp32_dir))
        self._fingerprint = model_fingerprint(model)
        lib = self._lib
        lib.llama_backend_init()
        with _quiet(lib):
            params = lib.llama_model_default_params()
            self._model = lib.llama_model_load_from_file(str(self._gguf).encode(), params)
        if not self._model:
            raise ConfigError(f"llama.cpp could not load {self._gguf}")
        self._vocab = lib.llama_model_get_vocab(self._model)
        self._n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        self._n_layer = int(lib.llama_model_n_layer(self._model))
        self._n_embd = int(lib.llama_model_n_embd(self._model))
        self._ctx: Any = None
        self._ctx_shape = (0, 0)
        self._batch: Any = None
        self._batch_size = 0
        self._capture: HiddenCapture | None = None
        self._head: BlockedHead | None = None
        self.head_check: tuple[float, float] | None = None
        """(mean, max) |logit difference| of the torch head against llama.cpp's on the probe."""
        if head == "torch" or (head == "auto" and native_bf16() and self._head_dominates()):
            self._use_torch_head(required=head == "torch")

    def _head_dominates(self) -> bool:
        """Whether the output head holds at least half the model's weights.

        Gemma 3 270M: 63 %; SmolLM2 135M: 21 %, where moving it gained nothing measurable.
        """
        total = int(self._lib.llama_model_n_params(self._model))
        return 2 * self._n_vocab * self._n_embd >= total

    @property
    def output_head(self) -> str:
        """Where generation's output head runs: ``torch-bf16`` or ``llama.cpp``."""
        return "torch-bf16" if self._head is not None else "llama.cpp"

    def _use_torch_head(self, *, required: bool) -> None:
        """Switch generation to the torch head if it reproduces llama.cpp's logits on a probe.

        Raises:
            ConfigError: ``required`` and the head cannot be used (the reason named).
        """
        refusal = self._torch_head_refusal()
        if refusal is None:
            return
        if required:
            raise ConfigError(f"head='torch': {refusal}; use head='llamacpp'")
        self.close_context()  # a probe's context carries the callback of the capture dropped here
        self._capture = None

    def _torch_head_refusal(self) -> str | None:
        """Set up and probe the torch head: why it cannot be used, or None once it is in use."""
        if _offloads_to_gpu(self._lib):
            # The hidden states would be in device memory, and a GPU computes the head itself.
            return "this llama.cpp build offloads to a GPU, which computes the output head itself"
        try:
            head = BlockedHead(
                head_weight(self._fp32_dir, n_vocab=self._n_vocab, n_embd=self._n_embd)
            )
            self._capture = HiddenCapture(_llama_module(), self._n_embd)
        except (ConfigError, AttributeError, OSError) as exc:
            return str(exc)
        probe = self.tokenizer.encode("A short probe of the output head:", add_special_tokens=True)
        self._ensure_context(1, len(probe) + 1)
        lib = self._lib
        lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
        self._fill([(t, i, 0, i == len(probe) - 1) for i, t in enumerate(probe)])
        try:
            ours = head(torch.from_numpy(self._capture.hidden(self._decode, 1)))
        except RuntimeError as exc:  # the graph had no final-norm node, or not one row of it
            return str(exc)
        lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
        self._decode()
        self.head_check = compare_heads(ours, torch.from_numpy(self._logits(1)))
        if not heads_agree(self.head_check):
            mean, worst = self.head_check
            return (
                f"its logits differ from llama.cpp's on a probe by {mean:.3f} on average, "
                f"{worst:.3f} at most"
            )
        self._head = head
        return None

    # -- GenerationBackend ------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """See :class:`~fedsynth.server.backends.GenerationBackend`."""
        return "llamacpp"

    @property
    def fingerprint(self) -> str:
        """See :class:`~fedsynth.server.backends.GenerationBackend`."""
        return self._fingerprint

    @property
    def num_layers(self) -> int:
        """See :class:`~fedsynth.server.backends.GenerationBackend`."""
        return self._n_layer

    @property
    def hidden_size(self) -> int:
        """See :class:`~fedsynth.server.backends.GenerationBackend`."""
        return self._n_embd

    @property
    def steerable_layers(self) -> range:
        """See :class:`~fedsynth.server.backends.GenerationBackend`."""
        return range(1, self._n_layer - 1)  # see control_vector

    def generate(
        self,
        prompts: Sequence[str],
        *,
        config: GenerationConfig,
        deltas: Mapping[int, torch.Tensor] | None,
        seed: int,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[str]:
        """See :class:`~fedsynth.server.backends.GenerationBackend`."""
        if not prompts:
            return []
        longest = max(len(self.tokenizer.encode(p, add_special_tokens=True)) for p in prompts)
        sequences = min(config.batch_size, len(prompts))
        spare = _spare_streams(sequences, len(prompts)) if _LlamaDecoder.park_prompts else 0
        self._ensure_context(sequences + spare, longest + config.max_new_tokens + 1)
        with self._steered(deltas):
            return sample_continuations(
                self.tokenizer,
                prompts,
                lambda: _LlamaDecoder(self, rows=sequences),
                vocab_rows=self._n_vocab,
                device=torch.device("cpu"),
                config=config,
                seed=seed,
                progress=progress,
            )

    def text_logprobs(
        self,
        prompt: str,
        texts: list[str],
        *,
        deltas: Mapping[int, torch.Tensor] | None = None,
        max_text_tokens: int = 64,
    ) -> list[float]:
        """See :class:`~fedsynth.server.backends.GenerationBackend`."""
        prompt_ids, encoded = encode_scored_texts(self.tokenizer, prompt, texts, max_text_tokens)
        if not encoded:
            return []
        self._ensure_context(1, len(prompt_ids) + max(len(e) for e in encoded) + 1)
        lib = self._lib
        out = []
        with self._steered(deltas):
            for ids in encoded:
                lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
                sequence = prompt_ids + ids
                first = len(prompt_ids) - 1  # the position that predicts the first text token
                self._fill(
                    [(token, pos, 0, pos >= first) for pos, token in enumerate(sequence[:-1])]
                )
                self._decode()
                out.append(mean_token_logprob(torch.from_numpy(self._logits(len(ids))), ids))
        return out

    # -- llama.cpp plumbing ------------------------------------------------------------------

    def _ensure_context(self, sequences: int, tokens_per_sequence: int) -> None:
        """A context with one KV stream per sequence, each holding ``tokens_per_sequence``."""
        lib = self._lib
        per_sequence = max(256, -(-tokens_per_sequence // 256) * 256)
        want = (max(sequences, self._ctx_shape[0]), max(per_sequence, self._ctx_shape[1]))
        if self._ctx is not None and want == self._ctx_shape:
            return
        self.close_context()
        params = lib.llama_context_default_params()
        params.n_seq_max = want[0]
        params.n_ctx = want[0] * want[1]
        params.n_batch = max(want[0], want[1])
        params.n_ubatch = max(want[0], min(want[1], 512))
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        if self._capture is not None:
            params.cb_eval = self._capture.callback
        if hasattr(params, "kv_unified"):
            params.kv_unified = False
        with _quiet(lib):
            self._ctx = lib.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise ConfigError(f"llama.cpp could not create a context of {params.n_ctx} tokens")
        self._ctx_shape = want
        self._batch_size = params.n_batch
        self._batch = lib.llama_batch_init(self._batch_size, 0, 1)

    def close_context(self) -> None:
        """Free the context and its batch (the model stays loaded)."""
        lib = self._lib
        if self._batch is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            lib.llama_free(self._ctx)
            self._ctx = None
        self._ctx_shape = (0, 0)

    def close(self) -> None:
        """Free everything llama.cpp holds for this backend."""
        self.close_context()
        if getattr(self, "_model", None):
            self._lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    @contextlib.contextmanager
    def _steered(self, deltas: Mapping[int, torch.Tensor] | None) -> Iterator[None]:
        """Apply ``deltas`` as the context's control vector; clear it afterwards."""
        if not deltas:
            yield
            return
        data, first, last = control_vector(
            deltas, num_layers=self._n_layer, hidden_size=self._n_embd
        )
        assert self._set_cvec is not None
        pointer = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        status = self._set_cvec(self._ctx, pointer, data.size, self._n_embd, first, last)
        if status != 0:
            raise ConfigError(f"llama.cpp refused the control vector (status {status})")
        try:
            yield
        finally:
            self._set_cvec(self._ctx, None, 0, self._n_embd, -1, -1)

    def _fill(self, tokens: Sequence[tuple[int, int, int, bool]]) -> None:
        """Put (token, position, sequence, wants logits) entries into the batch."""
        if len(tokens) > self._batch_size:
            raise ConfigError(f"{len(tokens)} tokens exceed the batch of {self._batch_size}")
        batch = self._batch
        for i, (token, pos, seq, logits) in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = 1 if logits else 0
        batch.n_tokens = len(tokens)

    def _decode(self) -> None:
        status = self._lib.llama_decode(self._ctx, self._batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")

    def _decode_rows(self, rows: int) -> np.ndarray:
        """Decode the batch; its ``rows`` outputs as the output head takes them.

        Final-norm hidden states where the head runs in torch, else llama.cpp's own logits
        (not copied: valid until the next decode). The decoder's ``_logits_of`` turns either
        into logits, so the rows of several decodes share one head product.
        """
        if self._head is None or self._capture is None:
            self._decode()
            return self._logits_view(rows)
        return self._capture.hidden(self._decode, rows)

    def _logits(self, rows: int) -> np.ndarray:
        """The (rows, vocab) logits of the last decode's outputs, copied out of llama.cpp."""
        pointer = self._lib.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(pointer, shape=(rows, self._n_vocab)).copy()

    def _logits_view(self, rows: int) -> np.ndarray:
        """The last decode's (rows, vocab) logits in llama.cpp's own buffer, not copied.

        Valid until the next decode overwrites the buffer: for a decoding step, whose logits
        are sampled from (and masked in place) before the next step runs.
        """
        pointer = self._lib.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(pointer, shape=(rows, self._n_vocab))


_MAX_SEQUENCES = 256
"""The most sequences (KV streams) a llama.cpp context takes (its ``LLAMA_MAX_SEQ``)."""


def _spare_streams(rows: int, prompts: int) -> int:
    """KV streams beyond a batch of ``rows`` that keep finished rows' prompts (at most ``rows``).

    Only a call that refills its batch (more prompts than rows) has finished rows to keep.
    """
    return max(0, min(rows, _MAX_SEQUENCES - rows, prompts - rows))


class _LlamaDecoder:
    """A :class:`~fedsynth.server.generation.Decoder` over one llama.cpp batch of sequences.

    The batch's rows use sequences ``0 .. rows - 1``; the context's sequences beyond them (if
    any) keep the prompts of finished rows for later rows to copy (see :meth:`keep`).
    """

    share_live_prompts = True
    """Start a prompt that a live row already holds from that row's KV (see :meth:`_start`);
    False: only the rows started in one call share their prompts (as before 2026-12-07)."""

    park_prompts = True
    """Keep a finished row's prompt in a spare sequence for later rows to copy (see
    :meth:`keep`); False: no spare sequences, a prompt no live row holds is decoded again
    (as before spare sequences)."""

    share_prefixes = True
    """Start a prompt that no sequence holds whole from the sequence (live or spare) sharing its
    longest prefix, decoding only the rest (see :meth:`_prefill_shared`); False: such a prompt
    is decoded from its first token (as before prefix sharing)."""

    def __init__(self, backend: LlamaCppBackend, rows: int | None = None) -> None:
        self._b = backend
        self._lib = backend._lib
        streams = backend._ctx_shape[0]
        self._rows_max = streams if rows is None else rows
        if not 0 < self._rows_max <= streams:
            raise ValueError(f"rows={rows}: the context has {streams} sequences")
        self._seqs: list[int] = []
        self._pos: list[int] = []
        self._prompts: list[tuple[int, ...]] = []
        # The last prompt token's output (as the head takes it) of each prompt a live row or a
        # spare sequence holds.
        self._first: dict[tuple[int, ...], np.ndarray] = {}
        # Finished rows' prompts -> the spare sequence holding each, least recently used first.
        self._parked: dict[tuple[int, ...], int] = {}
        self._spare: list[int] = []
        self.prefilled_tokens = 0
        """Prompt tokens decoded so far (the rest were copied from a row holding them)."""
        self._rows: torch.Tensor | None = None
        self._head = backend._head

    def restrict_vocabulary(self, rows: torch.Tensor) -> None:
        """Compute only the logits of token ids ``rows`` (sorted), in that order.

        With the output head in torch only those rows of the head are multiplied (gathered
        once per vocabulary and kept on the backend's head); llama.cpp's own head computes
        every logit, which are then narrowed to them.
        """
        self._rows = rows
        if self._b._head is not None:
            self._head = BlockedHead(self._b._head.rows(rows))

    def _logits_of(self, rows: np.ndarray) -> torch.Tensor:
        """Logits, in this decoder's vocabulary, of rows ``_decode_rows`` returned.

        The rows may be stacked from several decodes: one head product for all of them.
        """
        values = torch.from_numpy(rows)  # logits, or hidden states for the torch head
        if self._head is not None:
            return self._head(values)
        return values if self._rows is None else values[:, self._rows]

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        if len(prompts) > self._rows_max:
            raise ValueError(f"{len(prompts)} prompts for a batch of {self._rows_max} rows")
        lib = self._lib
        lib.llama_memory_clear(lib.llama_get_memory(self._b._ctx), True)
        self._seqs, self._pos, self._prompts, self._first = [], [], [], {}
        self._parked = {}
        self._spare = (
            list(range(self._rows_max, self._b._ctx_shape[0])) if self.park_prompts else []
        )
        logits = self._logits_of(self._start(prompts, list(range(len(prompts)))))
        return logits if self._head is None else logits.clone()  # the head reuses its buffer

    def _start(self, prompts: list[list[int]], seqs: list[int]) -> np.ndarray:
        """Start each prompt as a new row in the (empty) sequence beside it.

        A prompt that a live row (or a row started before it in this call) or a spare sequence
        (:meth:`_park`) already holds is not decoded again: that sequence's KV stream is copied
        and cut back to the prompt, and the prompt's last output was kept when it was first
        decoded. Shot-conditioned generation draws each prompt's shot from a pool of 64 texts,
        so most refills repeat a prompt seen before; the control vector is the decoder's for
        its whole life, so the copied KV is what decoding the prompt again would give. Any
        other prompt starts from the longest prefix some sequence holds (:meth:`_prefill_shared`).
        Returns each prompt's last output as the head takes it (see
        :meth:`LlamaCppBackend._decode_rows`), one row per prompt.
        """
        lib = self._lib
        memory = lib.llama_get_memory(self._b._ctx)
        live = zip(self._prompts, self._seqs, strict=True)
        holder = dict(live) if self.share_live_prompts else {}
        rows = []
        for prompt, seq in zip(prompts, seqs, strict=True):
            key = tuple(prompt)
            source = holder.get(key)
            if source is None and key in self._parked:
                source = self._use_parked(key)
            if source is None or not self._copy_prompt(memory, source, seq, len(key)):
                self._first[key] = self._prefill_shared(memory, key, seq, holder)
                holder[key] = seq
            rows.append(self._first[key])
            self._seqs.append(seq)
            self._pos.append(len(prompt))
            self._prompts.append(key)
        return np.stack(rows)

    def _use_parked(self, key: tuple[int, ...]) -> int:
        """The spare sequence holding ``key``, which becomes the most recently used."""
        source = self._parked.pop(key)
        self._parked[key] = source
        return source

    def _prefill_shared(
        self, memory: Any, key: tuple[int, ...], seq: int, holder: Mapping[tuple[int, ...], int]
    ) -> np.ndarray:
        """Decode prompt ``key`` into the empty ``seq`` after the longest prefix held elsewhere.

        Prompts of one label share their start (the template's own shots and the instruction
        before each drawn shot, at least the BOS token): the sequence, live (``holder``) or
        spare, whose prompt shares the most leading tokens with ``key`` is copied and cut back
        to that prefix, and only the rest is decoded. At least the last token is decoded, since
        its output is the one the sampler needs. Returns that output.

        The rest is decoded in a piece of its own, and llama.cpp's quantized products round a
        token's row differently with the number of tokens decoded together (as they do for a
        prompt longer than one batch, or a decoding step of fewer rows): Gemma 3 270M's next
        token distribution moved by a total-variation distance of 0.03, SmolLM2's not at all.
        """
        start = 0
        if self.share_prefixes:
            parked = self._parked.items()
            prompt, source, length = _longest_prefix(key, [*holder.items(), *parked])
            if length and self._copy_prompt(memory, source, seq, length):
                start = length
                if self._parked.get(prompt) == source:
                    self._use_parked(prompt)
        row = self._prefill_one(key, seq, start=start)
        self.prefilled_tokens += len(key) - start
        return row

    def _copy_prompt(self, memory: Any, source: int, seq: int, length: int) -> bool:
        """Copy ``source``'s KV stream into the empty ``seq``, cut back to ``length`` positions.

        False (``seq`` left empty) where the cache cannot cut a sequence.
        """
        lib = self._lib
        lib.llama_memory_seq_cp(memory, source, seq, -1, -1)
        if lib.llama_memory_seq_rm(memory, seq, length, -1):
            return True
        lib.llama_memory_seq_rm(memory, seq, -1, -1)  # a cache that cannot cut a sequence
        return False

    def _prefill_one(self, prompt: Sequence[int], seq: int, start: int = 0) -> np.ndarray:
        """Decode ``prompt[start:]`` into ``seq``; return the last token's output (a copy).

        ``seq`` already holds the tokens before ``start``. Long prompts go in pieces of at most
        one batch; logits only for the last token.
        """
        b = self._b
        last = len(prompt) - 1
        for begin in range(start, len(prompt), b._batch_size):
            piece = prompt[begin : begin + b._batch_size]
            b._fill([(token, begin + i, seq, begin + i == last) for i, token in enumerate(piece)])
            if begin + b._batch_size <= last:
                b._decode()
        row: np.ndarray = b._decode_rows(1)[0].copy()
        return row

    def keep(self, rows: torch.Tensor) -> None:
        """Drop the other rows, then renumber the kept ones' sequences 0..k-1.

        A dropped row's prompt that no kept row holds is first kept in a spare sequence
        (:meth:`_park`).

        llama.cpp splits a batch whose sequence ids have gaps into one micro-batch per
        sequence (each sequence has its own KV stream), which made a thinned batch cost 3x more
        per step than a full one of the same size; moving each kept stream down keeps one
        micro-batch per step.
        """
        lib = self._lib
        memory = lib.llama_get_memory(self._b._ctx)
        order = rows.tolist()
        if order != sorted(order):
            raise ValueError("rows must be kept in their order")
        kept = set(order)
        held = {self._prompts[i] for i in order}
        for index, seq in enumerate(self._seqs):
            if index not in kept:
                key = self._prompts[index]
                if key not in held and key not in self._parked:
                    self._park(memory, seq, key)
                lib.llama_memory_seq_rm(memory, seq, -1, -1)
        self._seqs = [self._seqs[i] for i in order]
        self._pos = [self._pos[i] for i in order]
        self._prompts = [self._prompts[i] for i in order]
        self._first = {
            key: row for key, row in self._first.items() if key in held or key in self._parked
        }
        for target, seq in enumerate(self._seqs):
            if seq != target:  # seq > target, and target is free (ids ascend, each moved once)
                lib.llama_memory_seq_cp(memory, seq, target, -1, -1)
                lib.llama_memory_seq_rm(memory, seq, -1, -1)
                self._seqs[target] = target

    def _park(self, memory: Any, seq: int, key: tuple[int, ...]) -> None:
        """Keep finished ``seq`` (its prompt ``key`` and what followed) in a spare sequence.

        Shots come from a pool, so a prompt no live row holds is often drawn again later;
        copying it back costs a KV copy instead of a prefill. With every spare sequence in use
        the least recently used prompt gives up its own (and is decoded again if drawn).
        """
        if not self._spare:
            if not self._parked:
                return
            oldest = next(iter(self._parked))
            self._spare.append(self._parked.pop(oldest))
            self._lib.llama_memory_seq_rm(memory, self._spare[-1], -1, -1)
        spare = self._spare.pop()
        self._lib.llama_memory_seq_cp(memory, seq, spare, -1, -1)  # cut back when copied out
        self._parked[key] = spare

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        # No copy: the sampler samples from these logits before it calls step again.
        return self._logits_of(self._step_rows(next_ids))

    def _step_rows(self, next_ids: torch.Tensor) -> np.ndarray:
        """Decode the live rows' next tokens; their outputs as the head takes them."""
        b = self._b
        ids = next_ids.tolist()
        b._fill([(t, p, s, True) for t, p, s in zip(ids, self._pos, self._seqs, strict=True)])
        rows = b._decode_rows(len(ids))
        self._pos = [p + 1 for p in self._pos]
        return rows

    def step_admit(self, next_ids: torch.Tensor, prompts: list[list[int]]) -> torch.Tensor:
        """Decode the live rows' next tokens, then start the new prompts in free sequences.

        Each distinct prompt is decoded on its own and copied to the rows that share it: a
        llama.cpp batch mixing one-token rows with a prompt's many tokens is split into as many
        micro-batches as the prompt has tokens (per-sequence KV streams split equally), which
        made every refill cost several full steps.
        """
        b, lib = self._b, self._lib
        if not prompts:
            return self.step(next_ids)
        free = sorted(set(range(self._rows_max)) - set(self._seqs))
        if len(free) < len(prompts):
            raise RuntimeError(f"{len(prompts)} new rows but {len(free)} free sequences")
        pieces = []
        if len(self._seqs):
            pieces.append(self._step_rows(next_ids).copy())
        memory = lib.llama_get_memory(b._ctx)
        seqs = free[: len(prompts)]
        for seq in seqs:
            lib.llama_memory_seq_rm(memory, seq, -1, -1)
        pieces.append(self._start(prompts, seqs))
        return self._logits_of(np.concatenate(pieces))  # one head product for old and new rows


def _longest_prefix(
    key: tuple[int, ...], held: Sequence[tuple[tuple[int, ...], int]]
) -> tuple[tuple[int, ...], int, int]:
    """(prompt, sequence, length) of the held prompt sharing most leading tokens with ``key``.

    The length is capped at ``len(key) - 1`` (the last token is always decoded); 0 where none
    shares a token. Of equal lengths the later one in ``held`` wins (spare sequences come least
    recently used first, so a tie leaves their order as it was).
    """
    best: tuple[tuple[int, ...], int, int] = ((), -1, 0)
    cap = len(key) - 1
    for prompt, seq in held:
        length = 0
        for mine, theirs in zip(key, prompt, strict=False):
            if mine != theirs:
                break
            length += 1
        length = min(length, cap)
        if length and length >= best[2]:
            best = (prompt, seq, length)
    return best


def _offloads_to_gpu(lib: Any) -> bool:
    """Whether this llama.cpp build can put the model on a GPU (a CUDA or Metal build)."""
    supports = getattr(lib, "llama_supports_gpu_offload", None)
    return bool(supports()) if callable(supports) else False


def _llama_module() -> Any:
    import llama_cpp

    return llama_cpp


def _check_same_source(fp32_dir: Path, package: str, gguf_file: str) -> None:
    """The fp32 cache (tokenizer, fingerprint) must be the conversion of this very GGUF file."""
    source = fp32_dir / "fedsynth_source.json"
    try:
        data = json.loads(source.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{source}: cannot tell which GGUF file {fp32_dir} came from") from exc
    if data != {"package": package, "gguf_file": gguf_file}:
        raise ConfigError(
            f"{fp32_dir} was converted from {data}, not from {package}/{gguf_file}: remove it "
            "and run again to convert the packaged file"
        )


@contextlib.contextmanager
def _quiet(lib: Any) -> Iterator[None]:
    """Silence llama.cpp's loader log on stderr unless FEDSYNTH_LLAMA_LOG is set."""
    if os.environ.get("FEDSYNTH_LLAMA_LOG"):
        yield
        return
    with contextlib.suppress(AttributeError):
        lib.llama_log_set(_SILENT, ctypes.c_void_p(0))
    yield


def _discard(_level: int, _text: bytes, _user: Any) -> None:
    return None


try:  # the callback must outlive every call that may log
    import llama_cpp as _llama_cpp_for_log

    _SILENT: Any = _llama_cpp_for_log.llama_log_callback(_discard)
except ImportError:  # the backend refuses to start without it anyway
    _SILENT = None
