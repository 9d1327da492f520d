"""The feature function that every client and the coordinator must compute identically.

An example is rendered as ``prefix(label) + text`` (token ids concatenated, so the boundary never
depends on tokenizer merges); its feature at layer l is the mean, over the example's own tokens,
of the residual stream after decoder block l. The forward pass stops after the last requested
block, and batches are sorted by length, so extraction costs no more than a truncated forward.

Dataset-vector contributions (EPSVec, arXiv 2602.21218) are per-example differences to the public
per-class reference, clipped per layer to ``m_l`` and divided by it, so every example's
contribution has L2 norm at most 1 in each layer ("unit domain").
"""

from __future__ import annotations

import contextlib
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedsynth.protocol.errors import ConfigError, ShapeError

if TYPE_CHECKING:  # torch and the model loader only where features are computed: the manifest,
    # policy and budget code import this module for its templates, and a ClientApp process that
    # answers a key-exchange stage must not pay for importing torch.
    import torch

    from fedsynth.protocol.models import LoadedModel


def check_instruction(instruction: str, name: str) -> None:
    """Refuse an instruction without a ``{label}`` slot or with any other slot.

    Raises:
        ConfigError: naming it as ``name``.
    """
    if "{label}" not in instruction:
        raise ConfigError(f"{name}={instruction!r} lacks a {{label}} slot")
    try:
        fields = list(string.Formatter().parse(instruction))
    except ValueError as exc:
        raise ConfigError(
            f"{name}={instruction!r}: its only slot must be {{label}} ({exc!r})"
        ) from exc
    for _text, field, spec, conversion in fields:
        # A bare {label} only: a format spec such as {label:>30000000} would render a prompt
        # of any length from a few characters, past every request-size limit.
        if field is not None and (field != "label" or spec or conversion):
            shown = (
                "{"
                + field
                + (f"!{conversion}" if conversion else "")
                + (f":{spec}" if spec else "")
                + "}"
            )
            raise ConfigError(
                f"{name}={instruction!r}: its only slot must be {{label}}, bare (not {shown})"
            )


@dataclass(frozen=True)
class PromptTemplate:
    r"""Class-conditional prompt with optional fixed public shots.

    Attributes:
        instruction: Text with a ``{label}`` slot, e.g. "Here is a {label} movie review:\\n".
        label_names: (label, description) pairs; the description fills the slot.
        shots: (label, public example text) pairs shown before the prompt, in order.
    """

    instruction: str
    label_names: tuple[tuple[str, str], ...]
    shots: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        check_instruction(self.instruction, "template.instruction")
        labels = [label for label, _ in self.label_names]
        if len(labels) < 1 or len(set(labels)) != len(labels):
            raise ConfigError(f"template.label_names={labels!r}: need distinct labels")
        unknown = [label for label, _ in self.shots if label not in labels]
        if unknown:
            raise ConfigError(f"template.shots use labels {unknown!r} not in {labels!r}")

    @property
    def labels(self) -> tuple[str, ...]:
        """The task's labels, in manifest order."""
        return tuple(label for label, _ in self.label_names)

    def describe(self, label: str) -> str:
        """Return the description that fills the ``{label}`` slot."""
        for name, description in self.label_names:
            if name == label:
                return description
        raise ConfigError(f"label={label!r} is not one of {list(self.labels)!r}")

    def prefix(self, label: str) -> str:
        """Render the shots and the instruction for ``label`` (the text follows directly)."""
        parts = [
            self.instruction.format(label=self.describe(shot_label)) + text.strip() + "\n\n"
            for shot_label, text in self.shots
        ]
        return "".join(parts) + self.instruction.format(label=self.describe(label))

    def to_dict(self) -> dict[str, Any]:
        """Serialize to plain JSON values."""
        return {
            "instruction": self.instruction,
            "label_names": [list(p) for p in self.label_names],
            "shots": [list(p) for p in self.shots],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PromptTemplate:
        """Inverse of :meth:`to_dict`."""
        return cls(
            instruction=str(data["instruction"]),
            label_names=tuple((str(a), str(b)) for a, b in data["label_names"]),
            shots=tuple((str(a), str(b)) for a, b in data.get("shots", [])),
        )


@dataclass(frozen=True)
class FeatureSpec:
    """Which layers to read, how many text tokens to keep, and the batch size."""

    template: PromptTemplate
    layers: tuple[int, ...]
    max_text_tokens: int = 64
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not self.layers or any(layer < 0 for layer in self.layers):
            raise ConfigError(f"layers={self.layers!r}: need one or more non-negative indices")
        if len(set(self.layers)) != len(self.layers) or list(self.layers) != sorted(self.layers):
            raise ConfigError(f"layers={self.layers!r}: must be distinct and increasing")
        if self.max_text_tokens < 1:
            raise ConfigError(f"max_text_tokens={self.max_text_tokens}: must be >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}: must be >= 1")


class _StopForwardError(Exception):
    """Raised inside a hook to end the forward pass after the last needed block."""


def _block_output(output: Any) -> torch.Tensor:
    """Hidden states of a decoder block's output (a tensor or a tuple starting with one)."""
    hidden: torch.Tensor = output[0] if isinstance(output, tuple) else output
    return hidden


def encode_example(
    tokenizer: Any, prefix: str, text: str, max_text_tokens: int
) -> tuple[list[int], int]:
    """Return (ids, prefix_length): prefix ids (with BOS) followed by the truncated text ids."""
    prefix_ids = list(tokenizer.encode(prefix, add_special_tokens=True))
    text_ids = list(tokenizer.encode(text, add_special_tokens=False))[:max_text_tokens]
    if not text_ids:
        text_ids = list(tokenizer.encode(" ", add_special_tokens=False))[:1]
    return prefix_ids + text_ids, len(prefix_ids)


def longest_prompt_tokens(loaded: LoadedModel, template: PromptTemplate) -> int:
    """Tokens of the template's longest label prompt (with BOS), as every input starts."""
    return max(
        len(loaded.tokenizer.encode(template.prefix(label), add_special_tokens=True))
        for label in template.labels
    )


def check_fits_context(loaded: LoadedModel, spec: FeatureSpec) -> None:
    """Refuse a feature spec whose longest input could outrun the model's context.

    A label's prompt plus ``max_text_tokens`` bounds every record's input (longer texts are
    cut), so this is decided from public terms before any record is read. Left unchecked, a
    coordinator could lengthen the prompt until only long records overflow the positions and
    learn from the holder's failure whether it holds one.

    Raises:
        ConfigError: naming the longest prompt, the text length and the context.
    """
    context = loaded.context
    if context is None:
        return
    prompt = longest_prompt_tokens(loaded, spec.template)
    if prompt + spec.max_text_tokens > context:
        raise ConfigError(
            f"max_text_tokens={spec.max_text_tokens}: a {prompt}-token prompt plus that many "
            f"text tokens exceeds {loaded.name}'s context of {context} tokens"
        )


def extract_features(
    loaded: LoadedModel,
    texts: Sequence[str],
    labels: Sequence[str],
    spec: FeatureSpec,
    *,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean residual stream over each example's text tokens at each chosen layer.

    Returns:
        features: (n, L, H) float32, the per-example feature.
        token_norms: (n, L) float32, the mean per-token residual norm (for steering scale).
    """
    import torch

    with torch.inference_mode():
        return _extract_features(loaded, texts, labels, spec, progress=progress)


def _extract_features(
    loaded: LoadedModel,
    texts: Sequence[str],
    labels: Sequence[str],
    spec: FeatureSpec,
    *,
    progress: Callable[[int], None] | None,
) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from fedsynth.protocol.models import decoder_layers

    if len(texts) != len(labels):
        raise ShapeError(f"texts ({len(texts)}) and labels ({len(labels)}) differ in length")
    blocks = decoder_layers(loaded.model)
    if spec.layers[-1] >= len(blocks):
        raise ConfigError(f"layers={spec.layers!r}: model has only {len(blocks)} blocks")
    tok = loaded.tokenizer
    encoded = [
        encode_example(tok, spec.template.prefix(label), text, spec.max_text_tokens)
        for text, label in zip(texts, labels, strict=True)
    ]
    n, n_layers, hidden = len(texts), len(spec.layers), loaded.hidden_size
    features = np.zeros((n, n_layers, hidden), dtype=np.float32)
    norms = np.zeros((n, n_layers), dtype=np.float32)
    order = sorted(range(n), key=lambda i: len(encoded[i][0]))
    captured: dict[int, torch.Tensor] = {}
    last = spec.layers[-1]

    def make_hook(index: int) -> Callable[..., None]:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            captured[index] = _block_output(output)
            if index == last:
                raise _StopForwardError

        return hook

    handles = [blocks[layer].register_forward_hook(make_hook(layer)) for layer in spec.layers]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    try:
        for start in range(0, n, spec.batch_size):
            batch = order[start : start + spec.batch_size]
            width = max(len(encoded[i][0]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            text_mask = torch.zeros((len(batch), width), dtype=torch.float32)
            for row, i in enumerate(batch):
                seq, plen = encoded[i]
                ids[row, : len(seq)] = torch.tensor(seq)
                attention[row, : len(seq)] = 1
                text_mask[row, plen : len(seq)] = 1.0
            captured.clear()
            with contextlib.suppress(_StopForwardError):
                loaded.model(
                    input_ids=ids.to(loaded.device),
                    attention_mask=attention.to(loaded.device),
                    use_cache=False,
                )
            mask = text_mask.to(loaded.device).unsqueeze(-1)  # (batch, seq, 1)
            counts = mask.sum(dim=1)  # (batch, 1)
            for j, layer in enumerate(spec.layers):
                hidden_states = captured[layer].float()  # (batch, seq, H)
                mean = (hidden_states * mask).sum(dim=1) / counts  # (batch, H)
                token_norm = (hidden_states.norm(dim=-1, keepdim=True) * mask).sum(dim=1) / counts
                features[batch, j] = mean.cpu().numpy()
                norms[batch, j] = token_norm.squeeze(-1).cpu().numpy()
            if progress is not None:
                progress(len(batch))
    finally:
        for handle in handles:
            handle.remove()
    return features, norms


def clip_to_unit(diffs: np.ndarray, clip_norms: np.ndarray) -> np.ndarray:
    """Clip each (example, layer) vector to L2 norm ``m_l`` and divide by ``m_l``.

    Args:
        diffs: (n, L, H) per-example differences to the reference.
        clip_norms: (L,) positive per-layer clip norms ``m_l``.

    Returns:
        (n, L, H) float64 with every (example, layer) row of L2 norm <= 1; a row with a
        non-finite entry becomes 0.
    """
    if diffs.ndim != 3 or clip_norms.shape != (diffs.shape[1],):
        raise ShapeError(f"diffs {diffs.shape} and clip_norms {clip_norms.shape} do not match")
    if np.any(~np.isfinite(clip_norms)) or np.any(clip_norms <= 0):
        raise ConfigError(f"clip_norms={clip_norms.tolist()}: must be positive and finite")
    # A non-finite row (a model overflow, a reference of NaN) counts as no direction at all:
    # refusing it would tell whoever chose the reference whether such a record exists.
    finite = np.isfinite(diffs).all(axis=-1, keepdims=True)
    diffs = np.where(finite, diffs, 0.0)
    norms = np.linalg.norm(diffs, axis=-1, keepdims=True)  # (n, L, 1)
    denom = np.maximum(norms, clip_norms[None, :, None])
    unit: np.ndarray = diffs.astype(np.float64) / denom
    return unit


def class_unit_sums(
    features: np.ndarray,
    labels: Sequence[str],
    *,
    label_order: Sequence[str],
    reference: np.ndarray,
    clip_norms: np.ndarray,
    count_weight: float,
) -> np.ndarray:
    """Per-class sum of clipped unit-domain differences, plus a weighted count coordinate.

    Sensitivity (add/remove one record): the record touches one class row only, changing it by
    at most ``sqrt(L + count_weight**2)`` in L2 norm.

    Args:
        features: (n, L, H) per-example features.
        labels: n labels, each in ``label_order``.
        label_order: the manifest's labels; row c of the result is label_order[c].
        reference: (C, L, H) public per-class reference (prior means).
        clip_norms: (L,) per-layer clip norms.
        count_weight: weight gamma of the count coordinate.

    Returns:
        (C, L*H + 1) float64: flattened layer sums followed by gamma * n_c.
    """
    _, n_layers, hidden = features.shape
    n_classes = len(label_order)
    if reference.shape != (n_classes, n_layers, hidden):
        raise ShapeError(f"reference shape {reference.shape} != {(n_classes, n_layers, hidden)}")
    index = {label: c for c, label in enumerate(label_order)}
    out = np.zeros((n_classes, n_layers * hidden + 1), dtype=np.float64)
    label_ids = np.array([index[label] for label in labels], dtype=np.int64)
    for c in range(n_classes):
        rows = features[label_ids == c]
        if len(rows) == 0:
            continue
        unit = clip_to_unit(rows - reference[c][None], clip_norms)  # (n_c, L, H)
        out[c, :-1] = unit.sum(axis=0).reshape(-1)
        out[c, -1] = count_weight * len(rows)
    return out
