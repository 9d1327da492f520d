"""Single-query attention for CPU decoding: one small product per key-value head, no kernel setup.

A decoding step attends one new query per row to the rows' cached keys. Through `transformers`'
``sdpa`` path the CPU runs its flash-attention kernel for that, whose fixed cost dominates at
these shapes (Gemma 3 270M, 64 rows, 18 layers: about 27 ms of a 180 ms bf16 step on 2 cores,
for ~10 MFLOP of arithmetic). Grouped queries of one key-value head are stacked into one
(rows, groups, head_dim) x (rows, head_dim, keys) product instead (``matmul``, then a fp32
softmax, then the value product): the same attention, computed in a different order, so the
logits agree to float rounding, not bit for bit.

Registered in `transformers` as :data:`IMPLEMENTATION`, with sdpa's mask: every call that is
not one query per row over a boolean or absent mask (prefill, soft-capping, position biases) is
handed to sdpa itself, so switching a model to it changes only its decoding steps.
"""

from __future__ import annotations

from typing import Any

import torch

IMPLEMENTATION = "fedsynth_decode"
"""The name this attention is registered under in `transformers`' attention interface."""

_registered = False


def register() -> None:
    """Register :data:`IMPLEMENTATION` (once) with `transformers`, masks made as for sdpa."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, decode_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    _registered = True


def use_for_decoding(model: Any) -> bool:
    """Switch a CPU ``transformers`` model that attends through sdpa to this attention.

    Returns whether the model now uses it (it already did, or it was switched). Models on
    another attention implementation (eager, flex, a GPU kernel) are left as they are.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == IMPLEMENTATION:
        return True
    if current != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    register()
    model.set_attn_implementation(IMPLEMENTATION)
    return True


def decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """`transformers` attention function: (rows, 1, heads, head_dim) outputs of one query per row.

    ``query`` is (rows, heads, 1, head_dim), ``key``/``value`` (rows, kv_heads, keys, head_dim),
    ``attention_mask`` None or boolean, broadcastable to (rows, 1, 1, keys), True where a key
    may be attended. Anything else goes to sdpa unchanged.
    """
    rows, heads, queries, head_dim = query.shape
    kv_heads = key.shape[1]
    plain = (
        queries == 1
        and heads % kv_heads == 0
        and not dropout
        and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
        and kwargs.get("s_aux") is None
        and (
            attention_mask is None
            or (
                attention_mask.dtype == torch.bool
                and attention_mask.dim() == 4
                and attention_mask.shape[1] == 1
                and attention_mask.shape[2] == 1
                and attention_mask.shape[3] == key.shape[2]
            )
        )
    )
    if not plain:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    groups = heads // kv_heads
    scale = scaling if scaling is not None else head_dim**-0.5
    stacked = query.reshape(rows, kv_heads, groups, head_dim)
    scores = torch.matmul(stacked, key.transpose(-1, -2)).float() * scale  # (rows, kv, g, keys)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(weights, value)  # (rows, kv_heads, groups, head_dim)
    return out.reshape(rows, 1, heads, head_dim), None
