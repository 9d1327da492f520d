"""Next-token logits written block by block into one reused fp32 buffer (CPU decoding).

A decoding step at batch 64 over Gemma 3's 262,144-token vocabulary makes a 67 MB logits tensor.
On a CPU a fresh tensor of that size is mapped and zeroed by the kernel on every step, and a
bf16 model's logits are converted to fp32 for the sampler as a second one. Writing the product
of the final hidden states with the head weights straight into one fp32 buffer, a vocabulary
block at a time, saves both: 124 → 100 ms for the fp32 head at batch 64 (2 cores, measured).

The logits returned live in the buffer: valid (and writable) until the head's next call.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, cast

import torch

if TYPE_CHECKING:
    from fedsynth.protocol.models import LoadedModel

PRODUCT_COLUMNS = 65_536
"""Vocabulary block of one product (measured at batch 64, bf16: 28 ms in blocks of 64k against
51 ms for one product and its conversion; fp32: 100 against 124 ms)."""

PROBE_RELATIVE_TOLERANCE = 0.01
"""Largest |logit difference| between the model's own logits and the blocked head's on the
probe, relative to the largest |logit| (fp32: about 1e-6; bf16 rounds its logits to 8 bits of
mantissa, 0.4 % at most; a soft-cap or a bias left out gives whole units)."""

KEPT_SUBSETS = 2
"""Restricted vocabularies whose gathered head weights a shared head keeps (oldest dropped)."""

_ATTRIBUTE = "_fedsynth_output_head"


def native_bf16() -> bool:
    """Whether torch has native bf16 matrix products on this CPU (AVX512-BF16 or AMX)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


class BlockedHead:
    """(rows, hidden) final hidden states → (rows, vocab) fp32 logits, in the weights' dtype.

    bf16 weights multiply bf16 states (oneDNN accumulates in fp32 and rounds the product to
    bf16, as the model's own head does) and each block is copied into the fp32 buffer; fp32
    weights write their product into it directly.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self._out = torch.empty((0, weight.shape[0]), dtype=torch.float32, device=weight.device)
        self._subsets: dict[str, torch.Tensor] = {}

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The head's weights of token ids ``ids``, gathered once per set of ids and kept."""
        key = hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()
        if key not in self._subsets:
            if len(self._subsets) >= KEPT_SUBSETS:
                self._subsets.pop(next(iter(self._subsets)))
            self._subsets[key] = self.weight.index_select(0, ids.to(self.weight.device))
        return self._subsets[key]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """The (rows, vocab) fp32 logits of (rows, hidden) final hidden states."""
        states = hidden.to(self.weight.dtype)
        rows = len(states)
        if rows > len(self._out):
            self._out = torch.empty(
                (rows, self.weight.shape[0]), dtype=torch.float32, device=self.weight.device
            )
        out = self._out[:rows]
        for start in range(0, self.weight.shape[0], PRODUCT_COLUMNS):
            block = self.weight[start : start + PRODUCT_COLUMNS]
            target = out[:, start : start + len(block)]
            if block.dtype == torch.float32:
                torch.mm(states, block.T, out=target)
            else:
                target.copy_(states @ block.T)
        return out


def output_head(loaded: LoadedModel) -> BlockedHead | None:
    """The blocked head of a `transformers` model on the CPU, or None to use its own forward.

    Only a plain head qualifies: a linear layer without bias reading the base model's last
    hidden state, no logit soft-capping, and a probe on which it reproduces the model's own
    logits (:data:`PROBE_RELATIVE_TOLERANCE`). Decided once per model and its head's weights
    (a copy of the model, or the model moved to another dtype, decides again) and kept on it.
    """
    model = loaded.model
    linear = model.get_output_embeddings()
    weights = getattr(linear, "weight", None)  # a method on torch.ao's quantized linear
    key = (
        (weights.data_ptr(), weights.dtype, weights.device)
        if isinstance(weights, torch.Tensor)
        else None
    )
    known = getattr(model, _ATTRIBUTE, None)
    if known is not None and known[0] == key:
        return cast(BlockedHead | None, known[1])
    head = _plain_head(loaded)
    object.__setattr__(model, _ATTRIBUTE, (key, head))
    return head


@torch.inference_mode()
def _plain_head(loaded: LoadedModel) -> BlockedHead | None:
    model = loaded.model
    if loaded.device.type != "cpu":
        return None  # a GPU's caching allocator reuses the logits' memory already
    linear = model.get_output_embeddings()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    softcap = getattr(config or model.config, "final_logit_softcapping", None)
    base = getattr(model, "base_model", model)
    if (
        not isinstance(linear, torch.nn.Linear)
        or linear.bias is not None
        or softcap is not None
        or base is model
    ):
        return None
    head = BlockedHead(linear.weight.detach())
    ids = torch.arange(1, 6, device=loaded.device).unsqueeze(0) % linear.weight.shape[0]
    own = model(input_ids=ids, use_cache=False).logits[0].float()
    hidden = base(input_ids=ids, use_cache=False).last_hidden_state[0]
    ours = head(hidden)
    scale = float(own.abs().max()) + 1e-6
    if float((ours - own).abs().max()) > PROBE_RELATIVE_TOLERANCE * scale:
        return None
    return BlockedHead(head.weight)  # kept on the model: without the probe's logits buffer
