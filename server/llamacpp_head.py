"""The output head of a llama.cpp model computed in torch, from the hidden states llama.cpp made.

At batch 64 a decoding step of Gemma 3 270M on llama.cpp is about 80 ms of transformer blocks
and 130 ms of output head (262,144 × 640, Q8_0, with 8-bit activations): the head is most of the
step. torch's bf16 matrix product (oneDNN, on CPUs with AVX512-BF16 or AMX) does the same product
in about 30 ms, and more accurately: against the exact product of the final-norm hidden state
with the file's own (de-quantized) head weights, llama.cpp's head is off by 0.05 per logit on
average (0.75 at most), the bf16 one by 0.03 (0.31 at most), measured on 64 rows.

llama.cpp hands the hidden states over through its graph-evaluation callback: the scheduler asks
the callback which nodes it wants to observe, shows it each one it asked for once computed, and
cancels the rest of the graph when the callback returns False (``ggml_backend_sched_eval_callback``
in ggml-backend.h). The node observed is the final norm (``result_norm``); the head after it is
never computed. The weights are the GGUF file's own head, as its fp32 conversion holds it
(de-quantized: the same numbers llama.cpp multiplies), kept in bf16.

Where the CPU has no native bf16 products, or the head computed here does not reproduce
llama.cpp's logits on a probe (a model whose graph adds something after the head, such as logit
soft-capping), the backend keeps llama.cpp's own head.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsynth.protocol.errors import ConfigError

HEADS = ("auto", "torch", "llamacpp")
"""Where the output head runs: ``auto`` (torch where the CPU has native bf16 products and the
probe agrees), ``torch`` (refused where the probe disagrees) or ``llamacpp`` (its own head)."""

HIDDEN_NODE = b"result_norm"
"""llama.cpp's name for the final-norm hidden states, the output head's input."""

PROBE_MEAN_TOLERANCE = 0.25
"""Largest mean |logit difference| between the two heads on the probe that counts as the same
head (measured: 0.03-0.06; a missing soft-cap or a wrong tensor gives whole units)."""

PROBE_MAX_TOLERANCE = 2.0
"""Largest single |logit difference| on the probe (measured: under 1)."""

_CHUNK_ROWS = 16_384

HEAD_TENSORS = ("lm_head.weight", "model.embed_tokens.weight")
"""Where a `transformers` checkpoint keeps the output head (untied, then tied)."""


def check_head(head: str) -> None:
    """Refuse a head placement that does not exist, naming the ones that do."""
    if head not in HEADS:
        raise ConfigError(f"head={head!r}: expected one of {', '.join(HEADS)}")


def head_weight(fp32_dir: Path, *, n_vocab: int, n_embd: int) -> torch.Tensor:
    """The output-head weights of the GGUF file's fp32 conversion, (n_vocab, n_embd) in bf16.

    The conversion (``fp32_dir``, checked by the backend to come from the very GGUF file
    llama.cpp loaded) holds the file's head de-quantized: ``lm_head.weight``, or the tied
    ``model.embed_tokens.weight``. Read in row blocks, so the fp32 copy is never whole in memory.

    Raises:
        ConfigError: no head tensor of that shape there.
    """
    from safetensors import safe_open

    path = fp32_dir / "model.safetensors"
    with safe_open(str(path), framework="pt") as tensors:
        names = set(tensors.keys())
        name = next((n for n in HEAD_TENSORS if n in names), None)
        shape = None if name is None else list(tensors.get_slice(name).get_shape())
        if name is None or shape != [n_vocab, n_embd]:
            raise ConfigError(f"{path}: no output head of shape [{n_vocab}, {n_embd}] ({shape})")
        rows = tensors.get_slice(name)
        out = torch.empty((n_vocab, n_embd), dtype=torch.bfloat16)
        for start in range(0, n_vocab, _CHUNK_ROWS):
            block = rows[start : start + _CHUNK_ROWS]
            out[start : start + len(block)] = block
    return out


def compare_heads(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    """(mean, max) |logit difference| between two heads' logits for the same rows."""
    diff = (ours.double() - theirs.double()).abs()
    return float(diff.mean()), float(diff.max())


def heads_agree(difference: tuple[float, float]) -> bool:
    """Whether the probe's (mean, max) difference says both heads compute the same function."""
    mean, worst = difference
    return mean <= PROBE_MEAN_TOLERANCE and worst <= PROBE_MAX_TOLERANCE


class HiddenCapture:
    """A llama.cpp graph-evaluation callback that keeps the final-norm rows and stops there.

    Off by default (every node computed, nothing kept: scoring needs llama.cpp's own logits);
    :meth:`hidden` turns it on for one decode.
    """

    def __init__(self, llama_module: Any, n_embd: int) -> None:
        ggml = ctypes.CDLL(llama_module.llama_cpp._lib._name)
        self._name = _tensor_function(ggml, "ggml_get_name", ctypes.c_char_p)
        self._count = _tensor_function(ggml, "ggml_nelements", ctypes.c_int64)
        self._data = _tensor_function(ggml, "ggml_get_data_f32", ctypes.c_void_p)
        self._contiguous = _tensor_function(ggml, "ggml_is_contiguous", ctypes.c_bool)
        self.n_embd = n_embd
        self.on = False
        self.rows: list[np.ndarray] = []
        self.error: str | None = None
        self.callback = llama_module.ggml_backend_sched_eval_callback(self._observe)

    def _observe(self, tensor: int, ask: bool, _user: Any) -> bool:
        if not self.on:
            return False
        try:
            if ask:
                return bool(self._name(tensor) == HIDDEN_NODE)
            count = int(self._count(tensor))
            if count % self.n_embd or not self._contiguous(tensor):
                self.error = f"{HIDDEN_NODE.decode()}: {count} values, not rows of {self.n_embd}"
                return False
            rows = np.empty((count // self.n_embd, self.n_embd), dtype=np.float32)
            if count:
                ctypes.memmove(rows.ctypes.data, self._data(tensor), count * 4)
            self.rows.append(rows)
        except Exception as exc:  # a callback cannot raise into llama.cpp
            self.error = repr(exc)
        return False  # the rest of the graph is the head: cancelled

    def hidden(self, decode: Callable[[], None], expected_rows: int) -> np.ndarray:
        """Run ``decode`` with the capture on; the (expected_rows, n_embd) hidden states.

        Raises:
            RuntimeError: the callback failed or saw another number of rows.
        """
        self.rows, self.error, self.on = [], None, True
        try:
            decode()
        finally:
            self.on = False
        if self.error is not None:
            raise RuntimeError(f"reading llama.cpp's hidden states failed: {self.error}")
        hidden = np.concatenate(self.rows) if self.rows else np.empty((0, self.n_embd))
        if len(hidden) != expected_rows:
            raise RuntimeError(
                f"llama.cpp gave {len(hidden)} hidden-state rows for {expected_rows} outputs"
            )
        return hidden


def _tensor_function(library: ctypes.CDLL, name: str, restype: Any) -> Any:
    """The ggml function ``name(const struct ggml_tensor *)``, returning ``restype``."""
    function = getattr(library, name)
    function.restype = restype
    function.argtypes = [ctypes.c_void_p]
    return function
