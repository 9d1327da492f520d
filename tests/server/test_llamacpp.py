"""The llama.cpp backend steers as the transformers path does, and refuses what it cannot run.

Cross-backend checks run on both packaged models (Gemma 3 270M, Q4_K_M; SmolLM2 135M, Q4_1: two
architectures). The tiny random test models have a character tokenizer that no GGUF file
carries, so they have no llama.cpp counterpart. The llama.cpp extra is part of the test
install (``bash scripts/install.sh llamacpp``): these tests do not skip without it.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

from fedsynth.protocol.errors import ConfigError, ModelMismatchError
from fedsynth.protocol.features import FeatureSpec, extract_features
from fedsynth.protocol.models import LoadedModel, load_model, tiny_model
from fedsynth.server import llamacpp
from fedsynth.server.backends import (
    TransformersBackend,
    check_release_backend,
    open_backend,
)
from fedsynth.server.generation import (
    GenerationConfig,
    _TransformersDecoder,
    steering,
    steering_deltas,
)
from fedsynth.server.llamacpp import (
    LlamaCppBackend,
    _LlamaDecoder,
    _longest_prefix,
    control_vector,
)
from fedsynth.server.llamacpp_head import HiddenCapture
from fedsynth.server.output_head import native_bf16
from fedsynth.simulations.datasets import load_rotten_tomatoes
from fedsynth.simulations.demo import TEMPLATES
from tests.server.releases import make_test_release

PROMPT = "Here is a positive movie review snippet:\n"


# ---------------------------------------------------------------------------------------------
# Pure parts and refusals (no model)
# ---------------------------------------------------------------------------------------------


def test_control_vector_puts_each_layer_in_its_row() -> None:
    deltas = {2: torch.full((4,), 2.0), 5: torch.arange(4, dtype=torch.float32)}
    data, first, last = control_vector(deltas, num_layers=7, hidden_size=4)
    assert data.dtype == np.float32 and data.shape == (6 * 4,)
    rows = data.reshape(6, 4)  # row i is block i + 1
    assert np.array_equal(rows[1], [2, 2, 2, 2]) and np.array_equal(rows[4], [0, 1, 2, 3])
    assert not rows[[0, 2, 3, 5]].any()
    assert (first, last) == (2, 5)


@pytest.mark.parametrize(
    ("layer", "width", "message"),
    [
        (0, 4, "cannot steer block 0"),
        (6, 4, "last block"),
        (7, 4, r"outside 1\.\.5"),
        (3, 5, r"shape \(5,\).*\(4,\)"),
    ],
)
def test_control_vector_refuses_what_llama_cpp_cannot_apply(
    layer: int, width: int, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        control_vector({layer: torch.ones(width)}, num_layers=7, hidden_size=4)


def test_the_longest_shared_prefix_leaves_the_last_token_to_decode() -> None:
    """The held prompt sharing the most leading tokens wins; a held prompt that the new one
    is a prefix of (or equals) gives all tokens but the last; none shared gives length 0."""
    held = [((1, 2, 9), 4), ((1, 2, 3, 4), 5), ((7,), 6)]
    assert _longest_prefix((1, 2, 3, 8, 8), held) == ((1, 2, 3, 4), 5, 3)
    assert _longest_prefix((1, 2, 3), held) == ((1, 2, 3, 4), 5, 2)
    assert _longest_prefix((1, 2), [((1, 2), 3)]) == ((1, 2), 3, 1)
    assert _longest_prefix((5, 1), held)[2] == 0
    assert _longest_prefix((1,), held)[2] == 0  # a one-token prompt is always decoded
    assert _longest_prefix((1, 2, 3), [])[2] == 0


def test_unknown_backend_is_named() -> None:
    with pytest.raises(
        ConfigError, match=r"backend='vllm': expected one of transformers, llamacpp"
    ):
        open_backend("vllm", "gemma3-270m")


def test_missing_llama_cpp_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r'pip install "fedsynth\[llamacpp\]"'):
        llamacpp.import_llama_cpp()


def test_build_without_control_vectors_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    old = types.ModuleType("llama_cpp")
    old.__version__ = "0.1.0"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "llama_cpp", old)
    with pytest.raises(ConfigError, match=r"0\.1\.0: this llama.cpp build has no control-vector"):
        llamacpp.import_llama_cpp()
    old.llama_apply_adapter_cvec = lambda *args: 0  # type: ignore[attr-defined]
    assert llamacpp.import_llama_cpp() is old  # the older name is enough


def test_only_packaged_models_run_on_llama_cpp() -> None:
    with pytest.raises(ConfigError, match="packaged GGUF models"):
        LlamaCppBackend("tiny-llama")
    with pytest.raises(ConfigError, match="threads=0"):
        LlamaCppBackend("gemma3-270m", threads=0)
    with pytest.raises(ConfigError, match="head='gpu': expected one of auto, torch, llamacpp"):
        LlamaCppBackend("gemma3-270m", head="gpu")


def test_hidden_states_of_another_row_count_are_refused() -> None:
    import llama_cpp

    capture = HiddenCapture(llama_cpp, n_embd=8)
    with pytest.raises(RuntimeError, match="0 hidden-state rows for 2 outputs"):
        capture.hidden(lambda: None, 2)
    assert not capture.on


def test_release_shape_is_checked_before_generation() -> None:
    llama = load_model("tiny-llama")
    release = make_test_release(llama)  # layers (1, 2), width 32
    check_release_backend(llama, release)

    class Narrow(TransformersBackend):
        @property
        def hidden_size(self) -> int:
            return 16

    with pytest.raises(ModelMismatchError, match=r"width 32.*16 wide"):
        check_release_backend(Narrow(llama), release)

    class FromBlockTwo(TransformersBackend):
        @property
        def steerable_layers(self) -> range:
            return range(2, 3)

    with pytest.raises(ModelMismatchError, match=r"steers layers \[1\]; .* steers layers 2\.\.2"):
        check_release_backend(FromBlockTwo(llama), release)
    with pytest.raises(ModelMismatchError, match="model_fingerprint"):
        check_release_backend(tiny_model(seed=1), release)


# ---------------------------------------------------------------------------------------------
# The packaged models on both backends
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["gemma3-270m", "smollm2-135m"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[LoadedModel, LlamaCppBackend]]:
    name = str(request.param)
    backend = LlamaCppBackend(name, threads=1)
    yield load_model(name), backend
    backend.close()


@torch.inference_mode()
def _next_logits(
    pair: tuple[LoadedModel, LlamaCppBackend],
    ids: list[int],
    hf_deltas: dict[int, torch.Tensor],
    llama_deltas: dict[int, torch.Tensor],
) -> tuple[np.ndarray, np.ndarray]:
    """Next-token logits after ``ids`` on each backend, steered by its deltas."""
    loaded, backend = pair
    with steering(loaded.model, hf_deltas):
        hf = _TransformersDecoder(loaded).prefill([ids])[0].numpy()
    backend._ensure_context(1, len(ids) + 1)
    with backend._steered(llama_deltas):
        ll = _LlamaDecoder(backend).prefill([ids])[0].numpy()
    return hf, ll


def test_same_model_same_tokens_same_fingerprint(
    pair: tuple[LoadedModel, LlamaCppBackend],
) -> None:
    loaded, backend = pair
    assert backend.fingerprint == loaded.fingerprint
    assert (backend.num_layers, backend.hidden_size) == (loaded.num_layers, loaded.hidden_size)
    ids = backend.tokenizer.encode(PROMPT, add_special_tokens=True)
    assert ids == loaded.tokenizer.encode(PROMPT, add_special_tokens=True)
    hf, ll = _next_logits(pair, ids, {}, {})
    # Quantized weights and activations: close, not equal.
    assert np.corrcoef(hf, ll)[0, 1] > 0.99


def test_the_output_head_runs_in_torch_where_it_is_most_of_the_model(
    pair: tuple[LoadedModel, LlamaCppBackend],
) -> None:
    loaded, backend = pair
    expected = "torch-bf16" if loaded.name == "gemma3-270m" and native_bf16() else "llama.cpp"
    assert backend.output_head == expected


@pytest.fixture(scope="module")
def torch_head() -> Iterator[LlamaCppBackend]:
    backend = LlamaCppBackend("gemma3-270m", threads=1, head="torch")
    yield backend
    backend.close()


def test_the_torch_head_gives_each_row_llama_cpps_logits(torch_head: LlamaCppBackend) -> None:
    """Three different rows, prefilled and stepped, steered: each row's torch-head logits are
    at least as close to the exact product of its hidden state with the head as llama.cpp's
    own head's, and closest to llama.cpp's logits of the same row (no rows swapped)."""
    from safetensors import safe_open

    backend = torch_head
    assert backend.output_head == "torch-bf16" and backend.head_check is not None
    with safe_open(str(backend._fp32_dir / "model.safetensors"), framework="pt") as f:
        weight = f.get_tensor("model.embed_tokens.weight").double()
    texts = [PROMPT, "Prices rose sharply in", "The weather today"]
    prompts = [backend.tokenizer.encode(t, add_special_tokens=True) for t in texts]
    backend._ensure_context(3, max(len(p) for p in prompts) + 4)
    push = {6: torch.ones(backend.hidden_size) * 2.0}
    torch_head = backend._head
    assert torch_head is not None
    hidden: list[np.ndarray] = []

    def keeping(states: torch.Tensor) -> torch.Tensor:
        hidden.append(states.numpy().copy())
        return torch_head(states)

    runs = []
    for head in (keeping, None):
        saved, backend._head = backend._head, head  # type: ignore[assignment]
        try:
            with backend._steered(push):
                decoder = _LlamaDecoder(backend)
                first = decoder.prefill(prompts).numpy().copy()
                step = decoder.step(torch.tensor([11, 12, 13])).numpy().copy()
        finally:
            backend._head = saved
        runs.append([first, step])
    assert [len(h) for h in hidden] == [3, 3]  # one head product per decoder call
    exact = [torch.from_numpy(h).double() @ weight.T for h in hidden]
    for mine, llama, truth in zip(runs[0], runs[1], exact, strict=True):
        ours_error = (torch.from_numpy(mine).double() - truth).abs().mean(-1)
        their_error = (torch.from_numpy(llama).double() - truth).abs().mean(-1)
        assert torch.all(ours_error <= their_error * 1.25), (ours_error, their_error)
        gaps = np.abs(mine[:, None, :] - llama[None, :, :]).mean(-1)  # (ours, theirs)
        off = gaps + np.eye(3) * 1e9
        assert np.all(np.diag(gaps) * 5 < off.min(axis=1)), gaps
        assert (mine.argmax(-1) == llama.argmax(-1)).all()


@contextlib.contextmanager
def _refused_then_left_to_llama_cpp(
    monkeypatch: pytest.MonkeyPatch, refusal: str
) -> Iterator[LlamaCppBackend]:
    """``head='torch'`` is refused with ``refusal``; ``auto`` (made to want the torch head)
    keeps llama.cpp's head and still generates. Yields that backend for further checks."""
    with pytest.raises(ConfigError, match=refusal):
        LlamaCppBackend("smollm2-135m", threads=1, head="torch")
    monkeypatch.setattr(llamacpp, "native_bf16", lambda: True)
    monkeypatch.setattr(LlamaCppBackend, "_head_dominates", lambda self: True)
    backend = LlamaCppBackend("smollm2-135m", threads=1, head="auto")
    try:
        assert backend.output_head == "llama.cpp"
        config = GenerationConfig(max_new_tokens=6, batch_size=2)
        assert len(backend.generate([PROMPT] * 2, config=config, deltas=None, seed=0)) == 2
        yield backend
    finally:
        backend.close()


def test_a_gpu_build_keeps_llama_cpps_head(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a build that offloads to a GPU the hidden states are not in host memory: ``torch``
    is refused, ``auto`` keeps llama.cpp's head."""
    monkeypatch.setattr(llamacpp, "_offloads_to_gpu", lambda lib: True)
    with _refused_then_left_to_llama_cpp(monkeypatch, "offloads to a GPU") as backend:
        assert backend.head_check is None  # not even probed


def test_a_graph_without_the_final_norm_node_keeps_llama_cpps_head(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A llama.cpp whose graph names its final norm otherwise (a new version, another
    architecture) hands no hidden states over: ``torch`` is refused, ``auto`` falls back."""
    from fedsynth.server import llamacpp_head

    monkeypatch.setattr(llamacpp_head, "HIDDEN_NODE", b"no_such_node")
    with _refused_then_left_to_llama_cpp(monkeypatch, "0 hidden-state rows for 1 outputs"):
        pass


def test_a_torch_head_that_disagrees_is_refused_or_left_to_llama_cpp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A head that does not reproduce llama.cpp's logits (here: scaled weights, as a missing
    soft-cap or the wrong tensor would be) is refused when asked for and skipped on ``auto``."""
    real = llamacpp.head_weight
    monkeypatch.setattr(llamacpp, "head_weight", lambda *a, **k: real(*a, **k) * 1.5)
    with _refused_then_left_to_llama_cpp(
        monkeypatch, r"differ from llama\.cpp's on a probe"
    ) as backend:
        assert backend.head_check is not None and backend.head_check[0] > 0.25


def test_each_layer_is_steered_where_the_transformers_hook_steers(
    pair: tuple[LoadedModel, LlamaCppBackend],
) -> None:
    """A direction at block l changes llama.cpp's logits as the HF hook at block l does, and
    more alike than the same direction one block off (what an indexing slip would do)."""
    loaded, backend = pair
    ids = backend.tokenizer.encode(PROMPT, add_special_tokens=True)
    with torch.inference_mode():
        hidden = loaded.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    plain_hf, plain_ll = _next_logits(pair, ids, {}, {})
    gen = torch.Generator().manual_seed(0)
    middle = loaded.num_layers // 2
    for layer in (1, middle):
        direction = torch.randn(loaded.hidden_size, generator=gen)
        # 0.1 x the residual norm there: well above llama.cpp's activation rounding.
        delta = direction / direction.norm() * 0.1 * float(hidden[layer + 1][0, -1].norm())
        hf, ll = _next_logits(pair, ids, {layer: delta}, {layer: delta})
        _, off = _next_logits(pair, ids, {}, {layer + 1: delta})
        change_hf, change_ll, change_off = hf - plain_hf, ll - plain_ll, off - plain_ll
        same = np.corrcoef(change_hf, change_ll)[0, 1]
        shifted = np.corrcoef(change_hf, change_off)[0, 1]
        ratio = np.linalg.norm(change_ll) / np.linalg.norm(change_hf)
        print(f"{loaded.name} layer {layer}: r = {same:.3f} (one block off {shifted:.3f})")
        assert same > 0.85 and same > shifted + 0.05, (layer, same, shifted)
        assert 0.6 < ratio < 1.6, (layer, ratio)


def _class_deltas(
    loaded: LoadedModel, texts: dict[str, list[str]], layers: tuple[int, ...]
) -> dict[str, dict[int, torch.Tensor]]:
    """Per label: its mean feature minus the mean of both, at 0.05 x the residual norm."""
    template = TEMPLATES["rotten_tomatoes"]
    spec = FeatureSpec(template=template, layers=layers, max_text_tokens=32)
    means, norms = {}, {}
    for label, group in texts.items():
        features, token_norms = extract_features(loaded, group, [label] * len(group), spec)
        means[label] = features.mean(axis=0)
        norms[label] = token_norms.mean(axis=0)
    center = np.mean(list(means.values()), axis=0)
    residual = np.mean(list(norms.values()), axis=0)
    return {
        label: steering_deltas(
            {layer: torch.from_numpy(mean[j] - center[j]) for j, layer in enumerate(layers)},
            strength=0.05,
            residual_norms={layer: float(residual[j]) for j, layer in enumerate(layers)},
        )
        for label, mean in means.items()
    }


def test_class_vectors_change_heldout_logprob_alike_on_both_backends(
    pair: tuple[LoadedModel, LlamaCppBackend],
) -> None:
    """Class directions from real reviews change the log-probability of other real reviews by
    the same amount on both backends, text by text (paired gains correlate). Whether a real
    release's change is a gain is the end-to-end demo test's check (transformers backend)."""
    loaded, backend = pair
    corpus = load_rotten_tomatoes()
    template = TEMPLATES["rotten_tomatoes"]
    by_label = {
        label: [r.text for r in corpus.records if r.label == label] for label in template.labels
    }
    train = {label: texts[:32] for label, texts in by_label.items()}
    heldout = {label: texts[1000:1024] for label, texts in by_label.items()}
    middle = loaded.num_layers // 2
    deltas = _class_deltas(loaded, train, (middle - 1, middle, middle + 1))
    hf_backend = TransformersBackend(loaded)
    for label in template.labels:
        prompt = template.prefix(label)
        changes = {}
        for name, b in (("transformers", hf_backend), ("llamacpp", backend)):
            plain = np.array(b.text_logprobs(prompt, heldout[label]))
            steered = np.array(b.text_logprobs(prompt, heldout[label], deltas=deltas[label]))
            changes[name] = steered - plain
        hf, ll = changes["transformers"], changes["llamacpp"]
        r = np.corrcoef(hf, ll)[0, 1]
        print(f"{loaded.name} {label}: hf {hf.mean():.4f}, llama.cpp {ll.mean():.4f}, r {r:.3f}")
        # The steering moves every text well beyond llama.cpp's rounding ...
        assert abs(stats.ttest_1samp(hf, 0.0).statistic) > 3, (label, hf.mean())
        # ... and both backends move each text alike.
        assert 0.75 < ll.mean() / hf.mean() < 1.33 and r > 0.8, (label, hf.mean(), ll.mean(), r)


def test_generation_on_llama_cpp(pair: tuple[LoadedModel, LlamaCppBackend]) -> None:
    """Same sampling rules: stops, no empty samples, seeded; steering changes the samples."""
    _, backend = pair
    config = GenerationConfig(max_new_tokens=12, batch_size=4)
    prompts = [PROMPT] * 3 + ["A negative movie review:\n"] * 2  # two batches, mixed prompts
    first = backend.generate(prompts, config=config, deltas=None, seed=3)
    assert len(first) == 5 and all(t.strip() and "\n" not in t for t in first)
    assert backend.generate(prompts, config=config, deltas=None, seed=3) == first
    middle = backend.num_layers // 2
    push = {middle: torch.ones(backend.hidden_size) * 5.0}
    assert backend.generate(prompts, config=config, deltas=push, seed=3) != first
    # The control vector is cleared afterwards.
    assert backend.generate(prompts, config=config, deltas=None, seed=3) == first


def test_copied_prompts_continue_as_the_prefilled_one(
    pair: tuple[LoadedModel, LlamaCppBackend],
) -> None:
    """Identical prompts are prefilled once and copied: the copies carry the prompt's context
    (the same token next gives the same logits as in the prefilled row, unlike a fresh row)."""
    _, backend = pair
    ids = backend.tokenizer.encode(PROMPT, add_special_tokens=True)
    other = backend.tokenizer.encode("Prices rose", add_special_tokens=True)
    backend._ensure_context(3, len(ids) + 4)
    decoder = _LlamaDecoder(backend)
    first = decoder.prefill([ids, ids, other]).numpy()
    assert np.array_equal(first[0], first[1]) and not np.allclose(first[0], first[2])
    token = int(np.argmax(first[0]))
    after = decoder.step(torch.tensor([token, token, token])).numpy()
    assert np.allclose(after[0], after[1], atol=1e-3)
    assert not np.allclose(after[0], after[2], atol=1e-1)


def test_kept_rows_continue_after_their_sequences_are_renumbered(
    pair: tuple[LoadedModel, LlamaCppBackend],
) -> None:
    """Dropping a middle row moves the later rows' KV streams down (no gaps in the sequence
    ids): the moved row continues exactly as it would have in place."""
    _, backend = pair
    texts = [PROMPT, "Prices rose sharply in", "The weather today"]
    prompts = [backend.tokenizer.encode(t, add_special_tokens=True) for t in texts]
    backend._ensure_context(3, max(len(p) for p in prompts) + 8)
    whole = _LlamaDecoder(backend)
    first = whole.prefill(prompts).numpy()
    tokens = torch.from_numpy(first.argmax(-1))
    in_place = whole.step(tokens).numpy().copy()
    thinned = _LlamaDecoder(backend)
    thinned.prefill(prompts)
    thinned.keep(torch.tensor([0, 2]))
    assert thinned._seqs == [0, 1]
    moved = thinned.step(tokens[[0, 2]]).numpy()
    assert np.allclose(moved[0], in_place[0], atol=1e-2)
    assert np.allclose(moved[1], in_place[2], atol=1e-2)
    assert not np.allclose(moved[1], in_place[1], atol=1e-1)


def test_admitted_rows_start_clean_and_live_rows_carry_on(
    pair: tuple[LoadedModel, LlamaCppBackend],
) -> None:
    """A row admitted into a running batch (refill) reuses a finished row's sequence: its
    logits are those of a fresh prefill (nothing of the old row left in its cache), and the
    live rows decoded in the same call continue as a plain step would."""
    _, backend = pair
    ids = backend.tokenizer.encode(PROMPT, add_special_tokens=True)
    other = backend.tokenizer.encode("Prices rose sharply in", add_special_tokens=True)
    newcomer = backend.tokenizer.encode("The weather", add_special_tokens=True)
    backend._ensure_context(2, len(other) + 8)
    plain = _LlamaDecoder(backend)
    first = plain.prefill([ids, other]).numpy()
    token = int(np.argmax(first[0]))
    stepped = plain.step(torch.tensor([token, int(np.argmax(first[1]))])).numpy()[0].copy()
    fresh = _LlamaDecoder(backend).prefill([newcomer]).numpy()[0].copy()
    refill = _LlamaDecoder(backend)
    refill.prefill([ids, other])
    refill.keep(torch.tensor([0]))
    mixed = refill.step_admit(torch.tensor([token]), [newcomer]).numpy()
    assert mixed.shape[0] == 2
    assert np.allclose(mixed[0], stepped, atol=1e-2)
    assert np.allclose(mixed[1], fresh, atol=1e-2)
    assert not np.allclose(mixed[1], mixed[0], atol=1e-1)


@pytest.mark.parametrize("share", [True, False])
def test_a_prompt_a_live_row_holds_starts_from_its_cache_cut_back_to_the_prompt(
    pair: tuple[LoadedModel, LlamaCppBackend], share: bool
) -> None:
    """A refill whose prompt a live row already holds (a shot drawn again from the pool) is not
    decoded again: the live row's KV stream is copied and cut back to the prompt, so the new
    row continues exactly as a fresh prefill of the prompt would, not from the live row's
    generated tokens. Without sharing (the control) the prompt is decoded again, alike."""
    _, backend = pair
    ids = backend.tokenizer.encode(PROMPT, add_special_tokens=True)
    other = backend.tokenizer.encode("Prices rose sharply in", add_special_tokens=True)
    backend._ensure_context(2, max(len(ids), len(other)) + 8)
    fresh = _LlamaDecoder(backend)
    start = fresh.prefill([ids]).numpy()[0].copy()
    token = int(np.argmax(start))
    fresh_next = fresh.step(torch.tensor([token])).numpy()[0].copy()

    decoder = _LlamaDecoder(backend)
    decoder.share_live_prompts = share
    logits = decoder.prefill([ids, other]).numpy()
    generated = []
    for _ in range(3):  # the live row moves past its prompt
        step = torch.from_numpy(logits.argmax(-1))
        generated.append(int(step[0]))
        logits = decoder.step(step).numpy()
    decoder.keep(torch.tensor([0]))  # the other row ended; its sequence is free
    live_token = int(np.argmax(logits[0]))
    before = decoder.prefilled_tokens
    admitted = decoder.step_admit(torch.tensor([live_token]), [ids]).numpy()
    assert decoder.prefilled_tokens - before == (0 if share else len(ids))
    assert decoder._seqs == [0, 1] and decoder._pos == [len(ids) + 4, len(ids)]
    assert np.allclose(admitted[1], start, atol=1e-2)
    after = decoder.step(torch.tensor([generated[0], token])).numpy()
    # The new row saw the prompt only (a cut that kept the live row's tokens would differ).
    assert np.allclose(after[1], fresh_next, atol=1e-2)
    assert not np.allclose(after[1], after[0], atol=1e-1)


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(logits.numpy().argmax(-1))


@pytest.mark.parametrize("park", [True, False])
def test_a_finished_rows_prompt_is_kept_in_a_spare_sequence_for_a_later_row(
    pair: tuple[LoadedModel, LlamaCppBackend], park: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row whose prompt no live row holds any more (its row finished) starts from the spare
    sequence that kept that prompt, cut back to it: no prompt token is decoded, and the row
    continues exactly as a fresh prefill would. Without spare sequences (the control) the
    prompt is decoded again, alike; the batch's rows never take a spare sequence."""
    _, backend = pair
    monkeypatch.setattr(_LlamaDecoder, "park_prompts", park)
    ids = backend.tokenizer.encode(PROMPT, add_special_tokens=True)
    other = backend.tokenizer.encode("Prices rose sharply in", add_special_tokens=True)
    backend.close_context()
    backend._ensure_context(3, max(len(ids), len(other)) + 8)  # two rows and one spare
    fresh = _LlamaDecoder(backend)
    start = fresh.prefill([ids]).numpy()[0].copy()
    token = int(np.argmax(start))
    fresh_next = fresh.step(torch.tensor([token])).numpy()[0].copy()

    with pytest.raises(ValueError, match="3 prompts for a batch of 2 rows"):
        _LlamaDecoder(backend, rows=2).prefill([ids, other, ids])  # a row may not take a spare
    decoder = _LlamaDecoder(backend, rows=2)
    logits = decoder.prefill([ids, other])
    for _ in range(3):  # the first row moves past its prompt, then finishes
        logits = decoder.step(_greedy(logits))
    decoder.keep(torch.tensor([1]))
    live = _greedy(logits[1:])
    before = decoder.prefilled_tokens
    admitted = decoder.step_admit(live, [ids]).numpy()
    # Without spares the prompt is decoded again after the start it shares with the live row.
    assert decoder.prefilled_tokens - before == (0 if park else len(ids) - _shared(ids, other))
    assert decoder._seqs == [0, 1]
    # A copied prompt continues exactly; one decoded in two pieces, up to their rounding.
    alike = _same_next_token if not park else (lambda x, y: np.allclose(x, y, atol=1e-2))
    assert alike(admitted[1], start)
    after = decoder.step(torch.tensor([int(np.argmax(admitted[0])), token])).numpy()
    assert alike(after[1], fresh_next)


def _shared(a: list[int], b: list[int]) -> int:
    """Leading tokens two prompts share (counted here, apart from the code under test)."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def _same_next_token(ours: np.ndarray, theirs: np.ndarray) -> bool:
    """The same next-token distribution up to the quantized kernels' rounding.

    llama.cpp's matrix products round a token's row differently with the number of tokens
    in the decode (Gemma's Q4_K_M rows go through 4-row or 1-row kernels): a prompt decoded in
    two pieces is off by a total-variation distance of 0.034 on Gemma (0 on SmolLM2), the
    step after it 0.008. Another shot prompt's distribution is 0.44-0.56 away, the rest of the
    prompt decoded without its start 0.83.
    """
    p, q = (torch.softmax(torch.from_numpy(x).double(), -1) for x in (ours, theirs))
    return 0.5 * float((p - q).abs().sum()) < 0.1 and ours.argmax() == theirs.argmax()


@pytest.mark.parametrize("share", [True, False])
def test_a_prompt_starts_from_the_longest_prefix_another_sequence_holds(
    pair: tuple[LoadedModel, LlamaCppBackend], share: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two shot prompts of one label share the instruction before their shots: the second is
    started from the first one's KV stream cut back to the shared tokens, and only its own
    tokens are decoded (all of them without prefix sharing, the control). Its output, and the
    step after it, are a fresh prefill's (a stream cut in the wrong place, or the rest decoded
    at the wrong positions, would not be)."""
    _, backend = pair
    monkeypatch.setattr(_LlamaDecoder, "share_prefixes", share)
    first, second = (
        backend.tokenizer.encode(f"{PROMPT}{shot}\n\n{PROMPT}", add_special_tokens=True)
        for shot in ("A warm and funny film.", "Dull, long and loud.")
    )
    common = _shared(first, second)
    assert 5 < common < len(second) - 5
    backend.close_context()
    backend._ensure_context(2, max(len(first), len(second)) + 4)
    fresh = _LlamaDecoder(backend)
    alone = fresh.prefill([second]).numpy()[0].copy()
    token = int(np.argmax(alone))
    alone_next = fresh.step(torch.tensor([token])).numpy()[0].copy()

    decoder = _LlamaDecoder(backend)
    both = decoder.prefill([first, second]).numpy()
    assert decoder.prefilled_tokens == len(first) + len(second) - (common if share else 0)
    assert _same_next_token(both[1], alone)
    after = decoder.step(torch.tensor([int(np.argmax(both[0])), token])).numpy()
    assert _same_next_token(after[1], alone_next)


def test_a_kept_prompt_lends_its_prefix_and_counts_as_used(
    pair: tuple[LoadedModel, LlamaCppBackend],
) -> None:
    """A finished row's prompt kept in a spare sequence is also a prefix source: a new prompt
    sharing its start decodes only its own tokens, and that use makes the kept prompt the most
    recently used (the other kept prompt gives up its sequence first)."""
    _, backend = pair
    a, b, c = (
        backend.tokenizer.encode(f"{PROMPT}{shot}", add_special_tokens=True)
        for shot in ("A warm film.", "Prices rose", "A warm film. Really")
    )
    backend.close_context()
    backend._ensure_context(3, max(map(len, (a, b, c))) + 8)  # one row, two spares
    decoder = _LlamaDecoder(backend, rows=1)
    none = torch.tensor([], dtype=torch.long)
    decoder.prefill([a])
    counts = []
    for prompt in (b, c):  # a kept, then b kept; c shares a's start (its shot is a's, longer)
        decoder.keep(none)
        before = decoder.prefilled_tokens
        decoder.step_admit(none, [prompt])
        counts.append(decoder.prefilled_tokens - before)
    assert counts == [len(b) - _shared(a, b), len(c) - _shared(a, c)]
    assert _shared(a, c) == len(a) > _shared(a, b)
    # c finishes: with both spares taken, b (used before a lent its prefix) gives up its own.
    decoder.keep(none)
    assert list(decoder._parked) == [tuple(a), tuple(c)]


def test_the_least_recently_used_kept_prompt_gives_up_its_spare_sequence(
    pair: tuple[LoadedModel, LlamaCppBackend],
) -> None:
    """With two spare sequences a third finished prompt takes the one of the prompt used
    least recently (a copy counts as a use): that prompt is decoded again when drawn (after
    the start it shares with the others), the others are copied."""
    _, backend = pair
    a, b, c = (
        backend.tokenizer.encode(text, add_special_tokens=True)
        for text in (PROMPT, "Prices rose sharply in", "The weather")
    )
    backend.close_context()
    backend._ensure_context(3, max(map(len, (a, b, c))) + 8)
    decoder = _LlamaDecoder(backend, rows=1)
    none = torch.tensor([], dtype=torch.long)
    decoder.prefill([a])
    counts = []
    for prompt in (b, a, c, a, b):  # each row finishes at once and the next prompt comes in
        decoder.keep(none)
        before = decoder.prefilled_tokens
        decoder.step_admit(none, [prompt])
        counts.append(decoder.prefilled_tokens - before)
    # b decoded (new), a copied, c decoded (b is now the least recently used and gives up its
    # sequence to c), a copied, b decoded again; each after the start it shares with a.
    assert counts == [len(b) - _shared(a, b), 0, len(c) - _shared(a, c), 0, len(b) - _shared(a, b)]


def test_kept_prompts_leave_the_samples_as_they_were(
    pair: tuple[LoadedModel, LlamaCppBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A generation call that refills its batch from a few repeated prompts (shots from a
    pool) keeps finished rows' prompts and copies them back, and samples exactly what it
    sampled without spare sequences, steered or not."""
    _, backend = pair
    config = GenerationConfig(max_new_tokens=8, batch_size=3)
    prompts = [PROMPT, "A negative movie review:\n", "The weather"] * 4
    prompts = prompts[::2] + prompts[1::2]  # rows end and their prompts come back later
    push = {backend.num_layers // 2: torch.ones(backend.hidden_size) * 2.0}
    parked = []
    original = _LlamaDecoder._park

    def counted(self: _LlamaDecoder, memory: Any, seq: int, key: tuple[int, ...]) -> None:
        parked.append(key)
        original(self, memory, seq, key)

    monkeypatch.setattr(_LlamaDecoder, "_park", counted)
    # A prompt decoded again after a shared prefix is computed in other pieces, which llama.cpp
    # rounds differently (see _same_next_token): the exact comparison holds with whole prompts.
    monkeypatch.setattr(_LlamaDecoder, "share_prefixes", False)
    kept = [backend.generate(prompts, config=config, deltas=d, seed=5) for d in (None, push)]
    assert parked
    monkeypatch.setattr(_LlamaDecoder, "park_prompts", False)
    assert [
        backend.generate(prompts, config=config, deltas=d, seed=5) for d in (None, push)
    ] == kept


def test_a_restricted_vocabulary_gives_those_columns_of_the_full_logits(
    pair: tuple[LoadedModel, LlamaCppBackend],
) -> None:
    """``restrict_vocabulary`` (``--vocabulary latin``): the decoder returns exactly the kept
    token ids' logits, in their order, at prefill, step and refill; with the head in torch
    only those rows of it are multiplied, with llama.cpp's own head its logits are narrowed."""
    _, backend = pair
    ids = backend.tokenizer.encode(PROMPT, add_special_tokens=True)
    other = backend.tokenizer.encode("Prices rose sharply in", add_special_tokens=True)
    newcomer = backend.tokenizer.encode("The weather", add_special_tokens=True)
    backend._ensure_context(2, max(len(ids), len(other)) + 8)
    full = _LlamaDecoder(backend)
    first = full.prefill([ids, other]).numpy().copy()
    tokens = torch.from_numpy(first.argmax(-1))
    stepped = full.step(tokens).numpy().copy()
    full.keep(torch.tensor([1]))
    refilled = full.step_admit(tokens[:1], [newcomer]).numpy().copy()
    kept = torch.unique(torch.cat([torch.arange(5, backend._n_vocab, 7), tokens]))
    narrow = _LlamaDecoder(backend)
    narrow.restrict_vocabulary(kept)
    assert narrow.prefill([ids, other]).shape == (2, len(kept))
    assert np.allclose(narrow.prefill([ids, other]).numpy(), first[:, kept], rtol=1e-3, atol=1e-2)
    assert np.allclose(narrow.step(tokens).numpy(), stepped[:, kept], rtol=1e-3, atol=1e-2)
    narrow.keep(torch.tensor([1]))
    admitted = narrow.step_admit(tokens[:1], [newcomer]).numpy()
    assert np.allclose(admitted, refilled[:, kept], rtol=1e-3, atol=1e-2)
    config = GenerationConfig(max_new_tokens=8, batch_size=2, vocabulary="latin")
    texts = backend.generate([PROMPT] * 3, config=config, deltas=None, seed=1)
    assert len(texts) == 3 and all(t.strip() for t in texts)


def test_cli_generate_on_llama_cpp_refuses_a_release_it_cannot_steer(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedsynth.server.release import save_release
    from fedsynth.simulations.cli import app

    llama = load_model("tiny-llama")
    path = save_release(make_test_release(llama), tmp_path / "release.safetensors")
    out = tmp_path / "out.jsonl"
    runner = CliRunner()
    args = ["generate", "--release", str(path), "--n", "2", "--out", str(out)]
    result = runner.invoke(app, [*args, "--backend", "vllm"])
    assert result.exit_code == 2 and "backend='vllm'" in result.output
    result = runner.invoke(app, [*args, "--backend", "llamacpp"])
    assert result.exit_code == 2 and "packaged GGUF models" in result.output
    result = runner.invoke(app, [*args, "--backend", "llamacpp", "--llama-head", "gpu"])
    assert result.exit_code == 2 and "head='gpu': expected one of auto" in result.output
    result = runner.invoke(app, [*args, "--llama-head", "torch"])
    assert result.exit_code == 2 and "a llamacpp-backend option" in result.output
    assert not out.exists()


def test_demo_refuses_a_backend_it_cannot_run_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from fedsynth.simulations.cli import app
    from fedsynth.simulations.demo import demo_config

    with pytest.raises(ConfigError, match="backend='vllm'"):
        demo_config("quick", out_dir=tmp_path, backend="vllm")
    with pytest.raises(ConfigError, match="packaged GGUF models"):
        demo_config("quick", out_dir=tmp_path, backend="llamacpp", model="tiny-llama")
    assert demo_config("quick", out_dir=tmp_path, backend="llamacpp").backend == "llamacpp"
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(ConfigError, match=r"fedsynth\[llamacpp\]"):
        demo_config("quick", out_dir=tmp_path, backend="llamacpp")
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--backend", "llamacpp"])
    assert result.exit_code == 2 and "fedsynth[llamacpp]" in result.output
    assert not out.exists()  # no holder file written, no epsilon spent


def test_synthesis_service_on_llama_cpp_offers_only_releases_it_can_steer(
    pair: tuple[LoadedModel, LlamaCppBackend],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`serve --backend llamacpp`: samples over TLS are the backend's own for the same seed;
    a release that steers block 0 (which llama.cpp cannot steer) is not offered."""
    from fedsynth.server import synthesis_service as service
    from fedsynth.server.release import save_release
    from fedsynth.server.synthesis_client import SynthesisClient
    from fedsynth.server.synthesize import iter_release_samples
    from tests.server import releases
    from tests.server.synthesis_harness import TOKEN, make_pki, write_token_file

    loaded, backend = pair
    store = tmp_path / "releases"
    store.mkdir()
    steerable = releases.make_test_release(loaded)
    save_release(steerable, store / "steerable.safetensors")
    monkeypatch.setattr(releases, "LAYERS", (0, 1))
    save_release(
        releases.make_test_release(loaded, release_id="block-0"), store / "block0.safetensors"
    )
    pki = make_pki(tmp_path / "pki")
    tokens = write_token_file(tmp_path / "tokens", TOKEN)
    generation = GenerationConfig(max_new_tokens=6, batch_size=4)
    label = steerable.labels[0]
    running = service.serve(
        releases=store,
        loaded=backend,
        token_file=tokens,
        tls_cert=pki.cert,
        tls_key=pki.key,
        generation=generation,
    )
    with running, SynthesisClient(running.address, token=TOKEN, ca_cert=pki.ca) as client:
        assert [r.release_id for r in client.list_releases()] == ["release-1"]
        pulled = [s.text for s in client.generate("release-1", 3, label=label, seed=5)]
    expected = [
        s.text
        for s in iter_release_samples(
            backend,
            steerable,
            n_per_label=3,
            strength=service.DEFAULT_STRENGTH,
            config=generation,
            seed=service.label_seed(5, label),
            labels=(label,),
            shots=service.DEFAULT_SHOTS,
        )
    ]
    assert pulled == expected and all(t.strip() for t in pulled)


def test_serve_refuses_an_unknown_backend_before_loading_a_model(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedsynth.server.synthesis_client import synthesis_app

    args = ["serve", "--releases", str(tmp_path), "--model", "no-such-model"]
    result = CliRunner().invoke(
        synthesis_app, [*args, "--token-file", str(tmp_path / "t"), "--backend", "vllm"]
    )
    assert result.exit_code == 2 and "backend='vllm'" in result.output
    result = CliRunner().invoke(
        synthesis_app, [*args, "--token-file", str(tmp_path / "t"), "--llama-head", "torch"]
    )
    assert result.exit_code == 2 and "a llamacpp-backend option" in result.output
