"""Tests of release files, the privacy ledger, steering hooks, sampling and steered generation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from releases import LAYERS, make_manifest, make_test_release
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from scipy.stats import chisquare

from fedsynth.protocol.errors import (
    BudgetExceededError,
    ConfigError,
    ModelMismatchError,
    ReleaseIntegrityError,
)
from fedsynth.protocol.mechanisms import trust_statement
from fedsynth.protocol.models import LoadedModel, decoder_layers, tiny_model
from fedsynth.server.generation import (
    GenerationConfig,
    count_threshold,
    generate_texts,
    row_logsumexp,
    sample_top_p,
    steering,
    steering_deltas,
    text_logprobs,
    top_set,
    topk_by_blocks,
)
from fedsynth.server.ledger import PrivacyLedger, file_digest
from fedsynth.server.release import (
    RELEASE_FORMAT,
    Release,
    load_release,
    privacy_report,
    release_digest,
    save_release,
)
from fedsynth.server.secure_round import RoundResult
from fedsynth.server.synthesize import generate_from_release, iter_release_samples

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    return tiny_model(seed=0, arch="llama")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request: pytest.FixtureRequest, llama: LoadedModel) -> LoadedModel:
    return llama if request.param == "llama" else tiny_model(seed=0, arch="gpt2")


# ---------------------------------------------------------------------------------------------
# Release files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [2.0, math.inf])
def test_save_load_round_trip(tmp_path: Path, llama: LoadedModel, epsilon: float) -> None:
    release = make_test_release(llama, epsilon=epsilon)
    path = save_release(release, tmp_path / "out" / "release.safetensors")
    assert path.exists()
    assert [p.name for p in path.parent.iterdir()] == ["release.safetensors"]  # no temp left
    back = load_release(path)
    assert back.release_id == release.release_id
    assert back.manifest == release.manifest
    np.testing.assert_array_equal(back.vectors, release.vectors)
    assert back.vectors.dtype == np.float32
    np.testing.assert_array_equal(back.counts, release.counts)
    assert back.report == json.loads(json.dumps(release.report))
    assert back.labels == ("pos", "neg", "mix")
    assert back.report["format"] == RELEASE_FORMAT
    assert back.report["epsilon"] == ("inf" if math.isinf(epsilon) else epsilon)


def test_privacy_report_counts_the_actual_noise(llama: LoadedModel) -> None:
    manifest = make_manifest(llama)
    result = RoundResult(np.zeros(1, dtype=np.uint64), survivors=[1, 2, 3], dropped=[4])
    report = privacy_report(manifest, result, model_name="m")
    assert report["noise"]["aggregate_variance_target_scaled"] == 400.0
    assert report["noise"]["aggregate_variance_actual_scaled"] == pytest.approx(400.0 * 3 / 2)
    assert report["survivors"] == 3
    assert report["dropped_clients"] == ["4"]
    assert report["K"] == 4
    assert report["threshold_t"] == 2
    local = privacy_report(make_manifest(llama, mode="local"), result, model_name="m")
    assert local["noise"]["aggregate_variance_actual_scaled"] == pytest.approx(400.0 * 3)


def test_load_refuses_missing_and_corrupt_files(tmp_path: Path, llama: LoadedModel) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_release(tmp_path / "absent.safetensors")
    with pytest.raises(ConfigError, match=r"is a directory, not a release file"):
        load_release(tmp_path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    with pytest.raises(ConfigError, match="not a readable release"):
        load_release(garbage)
    good = save_release(make_test_release(llama), tmp_path / "good.safetensors")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError):
        load_release(truncated)
    # Corrupt the manifest inside the header (same length, so the file still parses).
    needle = b'\\"task_id\\": \\"release-1\\"'
    assert needle in data
    broken = tmp_path / "broken-manifest.safetensors"
    broken.write_bytes(data.replace(needle, needle.replace(b"task_id", b"task_xx")))
    with pytest.raises(ReleaseIntegrityError, match="digest mismatch"):
        load_release(broken)


def test_load_refuses_foreign_or_inconsistent_files(tmp_path: Path, llama: LoadedModel) -> None:
    release = make_test_release(llama)
    meta = {
        "format": RELEASE_FORMAT,
        "release_id": "r",
        "manifest": release.manifest.to_json(),
        "report": "{}",
    }
    tensors = {"vectors": release.vectors, "counts": release.counts}
    other = tmp_path / "other.safetensors"
    save_file(tensors, str(other), metadata={**meta, "format": "something.else"})
    with pytest.raises(ConfigError, match="format"):
        load_release(other)
    no_meta = tmp_path / "no-meta.safetensors"
    save_file(tensors, str(no_meta))
    with pytest.raises(ConfigError, match="format"):
        load_release(no_meta)
    wrong_shape = tmp_path / "shape.safetensors"
    short = {**tensors, "vectors": release.vectors[:2]}
    digest = release_digest(
        release_id="r",
        manifest_json=meta["manifest"],
        report_json=meta["report"],
        vectors=short["vectors"],
        counts=short["counts"],
    )
    save_file(short, str(wrong_shape), metadata={**meta, "digest": digest})
    with pytest.raises(ConfigError, match="shape"):
        load_release(wrong_shape)
    # A well-formed file whose report says nothing of the manifest's terms.
    empty_report = tmp_path / "empty-report.safetensors"
    digest = release_digest(
        release_id="r",
        manifest_json=meta["manifest"],
        report_json="{}",
        vectors=release.vectors,
        counts=release.counts,
    )
    save_file(tensors, str(empty_report), metadata={**meta, "digest": digest})
    with pytest.raises(ReleaseIntegrityError, match="release_id='r'"):
        load_release(empty_report)
    no_manifest = tmp_path / "no-manifest.safetensors"
    save_file(
        tensors, str(no_manifest), metadata={k: v for k, v in meta.items() if k != "manifest"}
    )
    with pytest.raises(ConfigError, match="manifest"):
        load_release(no_manifest)


def _parts(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with safe_open(str(path), framework="numpy") as handle:
        metadata = dict(handle.metadata() or {})
    return dict(load_file(str(path))), metadata


def _rewrite(
    path: Path,
    out: Path,
    *,
    redigest: bool,
    tensors: dict[str, np.ndarray] | None = None,
    **changes: str,
) -> Path:
    """Copy a release with some metadata changed; ``redigest`` recomputes the digest too."""
    old_tensors, metadata = _parts(path)
    tensors = tensors or old_tensors
    metadata.update(changes)
    if redigest:
        metadata["digest"] = release_digest(
            release_id=metadata["release_id"],
            manifest_json=metadata["manifest"],
            report_json=metadata["report"],
            vectors=tensors["vectors"],
            counts=tensors["counts"],
        )
    save_file(tensors, str(out), metadata=metadata)
    return out


def test_tampered_release_files_are_refused(tmp_path: Path, llama: LoadedModel) -> None:
    good = save_release(make_test_release(llama), tmp_path / "good.safetensors")
    assert load_release(good).report["epsilon"] == 2.0  # the untouched file loads
    data = good.read_bytes()
    _, metadata = _parts(good)
    assert metadata["digest"].startswith("sha256:")

    # One flipped byte inside the stored vectors (same length: the file still parses).
    header_len = int.from_bytes(data[:8], "little")
    start, _end = json.loads(data[8 : 8 + header_len])["vectors"]["data_offsets"]
    flipped = bytearray(data)
    flipped[8 + header_len + start + 5] ^= 0x01
    (tmp_path / "flipped.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ReleaseIntegrityError, match="digest mismatch"):
        load_release(tmp_path / "flipped.safetensors")

    # The report claims a stronger guarantee than the manifest the noise was drawn for.
    report = json.loads(metadata["report"])
    stronger = json.dumps({**report, "epsilon": 0.5}, sort_keys=True)
    edited = _rewrite(good, tmp_path / "report.safetensors", redigest=False, report=stronger)
    with pytest.raises(ReleaseIntegrityError, match="digest mismatch"):
        load_release(edited)
    # ... even with the digest recomputed over the edit, the report must match the manifest.
    forged = _rewrite(good, tmp_path / "forged.safetensors", redigest=True, report=stronger)
    with pytest.raises(
        ReleaseIntegrityError, match=r"epsilon=0\.5 differs from the manifest's 2\.0"
    ):
        load_release(forged)

    # The manifest is edited (its epsilon), the report left as it was.
    manifest = json.loads(metadata["manifest"])
    manifest["privacy"]["epsilon"] = 8.0
    weaker = json.dumps(manifest, sort_keys=True)
    with pytest.raises(ReleaseIntegrityError, match="digest mismatch"):
        load_release(_rewrite(good, tmp_path / "m.safetensors", redigest=False, manifest=weaker))
    with pytest.raises(ReleaseIntegrityError, match=r"report epsilon=2\.0 differs"):
        load_release(_rewrite(good, tmp_path / "m2.safetensors", redigest=True, manifest=weaker))

    # Replaced vectors with the old digest; and a file without any digest.
    tensors, _ = _parts(good)
    swapped = {**tensors, "vectors": tensors["vectors"] * 2.0}
    with pytest.raises(ReleaseIntegrityError, match="digest mismatch"):
        load_release(_rewrite(good, tmp_path / "v.safetensors", redigest=False, tensors=swapped))
    save_file(
        tensors,
        str(tmp_path / "bare.safetensors"),
        metadata={k: v for k, v in metadata.items() if k != "digest"},
    )
    with pytest.raises(ReleaseIntegrityError, match="no digest"):
        load_release(tmp_path / "bare.safetensors")
    assert load_release(good).release_id == "release-1"


def test_an_inconsistent_release_is_never_written(tmp_path: Path, llama: LoadedModel) -> None:
    release = make_test_release(llama)
    bad = Release(
        release_id=release.release_id,
        manifest=release.manifest,
        vectors=release.vectors,
        counts=release.counts,
        report={**release.report, "epsilon": 1.0},
    )
    with pytest.raises(ReleaseIntegrityError, match="epsilon"):
        save_release(bad, tmp_path / "bad.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_directions_with_contrast(llama: LoadedModel) -> None:
    release = make_test_release(llama)
    mean = release.vectors.mean(axis=0)
    plain = release.directions("neg")
    assert sorted(plain) == list(LAYERS)
    for j, layer in enumerate(LAYERS):
        assert plain[layer].dtype == torch.float32
        np.testing.assert_allclose(plain[layer].numpy(), release.vectors[1, j], atol=1e-6)
    sharp = release.directions("neg", contrast=3.0)
    flat = release.directions("neg", contrast=0.0)
    for j, layer in enumerate(LAYERS):
        expected = mean[j] + 3.0 * (release.vectors[1, j] - mean[j])
        np.testing.assert_allclose(sharp[layer].numpy(), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(flat[layer].numpy(), mean[j], atol=1e-6)
    # Contrast only amplifies what separates the classes: the contrast directions sum to
    # C times the mean, whatever the contrast.
    total = sum(release.directions(label, contrast=5.0)[1].numpy() for label in release.labels)
    np.testing.assert_allclose(total, 3 * mean[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="label='other'"):
        release.directions("other")
    assert release.residual_norms() == {1: 5.0, 2: 7.0}


# ---------------------------------------------------------------------------------------------
# Privacy ledger
# ---------------------------------------------------------------------------------------------


def test_a_published_release_is_the_file_its_ledger_row_names(
    tmp_path: Path, llama: LoadedModel
) -> None:
    release = make_test_release(llama, epsilon=2.0)
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite", max_total_epsilon=5.0)
    path = tmp_path / "store" / "release-1.safetensors"
    row = ledger.publish(release.report, path=path, write=lambda p: save_release(release, p))
    assert load_release(path).release_id == row["task_id"] == "release-1"
    assert row["epsilon"] == "2.0" and row["survivors"] == 3
    assert row["refusals"] == {"protocol": 1}  # "masked_input: gone" is not a category
    assert row["digest"] == file_digest(path)
    assert not path.with_name(path.name + ".tmp").exists()
    assert ledger.spent() == 2.0
    with pytest.raises(BudgetExceededError, match=r"max_total_epsilon=5\.0"):
        ledger.check(3.5)
    # A file altered after publication no longer matches its row.
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert file_digest(path) != row["digest"]


# ---------------------------------------------------------------------------------------------
# Steering hooks
# ---------------------------------------------------------------------------------------------


def _logits(loaded: LoadedModel, text: str = "steer me please") -> torch.Tensor:
    ids = torch.tensor([loaded.tokenizer.encode(text)])
    with torch.no_grad():
        out: torch.Tensor = loaded.model(input_ids=ids).logits
    return out


def test_steering_changes_logits_and_is_removed_afterwards(tiny: LoadedModel) -> None:
    before = _logits(tiny)
    delta = torch.from_numpy(np.random.default_rng(0).normal(size=tiny.hidden_size)).float()
    with steering(tiny.model, {1: delta}):
        steered = _logits(tiny)
    with steering(tiny.model, {1: torch.zeros(tiny.hidden_size), 2: torch.zeros(tiny.hidden_size)}):
        unchanged = _logits(tiny)
    after = _logits(tiny)
    assert (steered - before).abs().max() > 1e-3
    torch.testing.assert_close(unchanged, before, rtol=0, atol=0)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert all(not block._forward_hooks for block in decoder_layers(tiny.model))


def _reference_logprob(loaded: LoadedModel, prompt: str, text: str) -> float:
    """One text alone, no padding: the mean log-probability of its tokens after ``prompt``."""
    prompt_ids = loaded.tokenizer.encode(prompt, add_special_tokens=True)
    text_ids = loaded.tokenizer.encode(text, add_special_tokens=False)
    ids = torch.tensor([prompt_ids + text_ids])
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits[0]
    logp = torch.log_softmax(logits[len(prompt_ids) - 1 : -1].float(), dim=-1)
    return float(logp.gather(-1, torch.tensor(text_ids).unsqueeze(-1)).mean())


def test_batched_text_logprobs_equal_each_text_scored_alone(tiny: LoadedModel) -> None:
    """Right padding in a batch changes no text's score, steered or not, in the input order."""
    texts = ["a", "a much longer text with many more tokens in it", "mid length text", "b c"]
    prompt = "Review:"
    alone = [_reference_logprob(tiny, prompt, text) for text in texts]
    batched = text_logprobs(tiny, prompt, texts, batch_size=3)
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-5)
    delta = torch.from_numpy(np.random.default_rng(1).normal(size=tiny.hidden_size)).float()
    steered = text_logprobs(tiny, prompt, texts, deltas={1: delta}, batch_size=4)
    one_by_one = text_logprobs(tiny, prompt, texts, deltas={1: delta}, batch_size=1)
    np.testing.assert_allclose(steered, one_by_one, rtol=0, atol=1e-5)
    assert max(abs(a - b) for a, b in zip(steered, batched, strict=True)) > 1e-4
    with pytest.raises(ConfigError, match="batch_size"):
        text_logprobs(tiny, prompt, texts, batch_size=0)


def test_steering_hooks_are_removed_after_an_exception(tiny: LoadedModel) -> None:
    before = _logits(tiny)
    delta = torch.ones(tiny.hidden_size) * 3.0
    with pytest.raises(RuntimeError, match="boom"), steering(tiny.model, {0: delta}):
        raise RuntimeError("boom")
    torch.testing.assert_close(_logits(tiny), before, rtol=0, atol=0)


def test_steering_rejects_bad_layer_without_leaving_hooks(tiny: LoadedModel) -> None:
    before = _logits(tiny)
    delta = torch.from_numpy(np.random.default_rng(1).normal(size=tiny.hidden_size)).float()
    with (
        pytest.raises(ConfigError, match="steering layer 99"),
        steering(tiny.model, {0: delta, 99: delta}),
    ):
        pass
    assert all(not block._forward_hooks for block in decoder_layers(tiny.model))
    torch.testing.assert_close(_logits(tiny), before, rtol=0, atol=0)


def test_steering_deltas_scale_to_residual_norm() -> None:
    directions = {1: torch.tensor([3.0, 4.0]), 2: torch.tensor([0.0, -2.0])}
    deltas = steering_deltas(directions, strength=0.5, residual_norms={1: 10.0, 2: 4.0})
    assert float(deltas[1].norm()) == pytest.approx(5.0)
    assert float(deltas[2].norm()) == pytest.approx(2.0)
    torch.testing.assert_close(deltas[1], torch.tensor([3.0, 4.0]))
    with pytest.raises(ConfigError, match="zero"):
        steering_deltas({1: torch.zeros(2)}, strength=1.0, residual_norms={1: 1.0})


# ---------------------------------------------------------------------------------------------
# Top-p sampling
# ---------------------------------------------------------------------------------------------

VOCAB = 300
TOP_P = 0.9


def _distributions() -> list[np.ndarray]:
    """Rows whose nucleus holds about 4, 30 and 150 tokens, ids shuffled."""
    rng = np.random.default_rng(42)
    rows = []
    small = 0.5 ** np.arange(1, VOCAB + 1)
    medium = 0.93 ** np.arange(VOCAB)
    large = np.concatenate([np.arange(250, 0, -1, dtype=np.float64), np.full(50, 1e-3)])
    for weights in (small, medium, large):
        p = weights / weights.sum()
        rows.append(p[rng.permutation(VOCAB)])
    return rows


def _nucleus(p: np.ndarray, margin: float = 1e-4) -> dict[int, float]:
    order = np.argsort(-p, kind="stable")
    cumulative = np.cumsum(p[order])
    before = cumulative - p[order]
    # Keep the test away from float32 ties at the boundary.
    assert np.min(np.abs(before - TOP_P)) > margin
    keep = order[before < TOP_P]
    mass = p[keep].sum()
    return {int(i): float(p[i] / mass) for i in keep}


@pytest.mark.parametrize(
    ("rows", "vocab", "k", "ties"),
    [
        (8, 262_144, 256, False),  # Gemma's vocabulary: blocks of 64
        (4, 262_144, 2000, False),  # the wider pass: blocks of 16
        (6, 50_257, 256, False),  # GPT-2's: a tail after the last whole block
        (6, 50_257, 256, True),  # few distinct values: many ties at the k-th
        (3, 300, 8, False),  # too short for blocks: torch.topk itself
    ],
)
def test_topk_by_blocks_finds_the_k_largest_values(
    rows: int, vocab: int, k: int, ties: bool
) -> None:
    gen = torch.Generator().manual_seed(rows * vocab + k)
    x = torch.randn(rows, vocab, generator=gen) * 3
    if ties:
        x = torch.round(x)  # about 20 distinct values
    x[0, : vocab // 2] = float("-inf")  # masked tokens, as control tokens are
    x[1, -5:] = x[1].max() + 1 + torch.arange(5.0)  # the largest values in the last columns
    values, ids = topk_by_blocks(x, k)
    expected = torch.topk(x, k, dim=-1)
    assert torch.equal(values, expected.values)
    assert torch.equal(x.gather(1, ids), values)  # each index holds its value
    assert all(len(set(row.tolist())) == k for row in ids)  # no index twice
    # The same indices wherever the value is not shared (random floats tie now and then).
    unique = values != torch.roll(values, 1, dims=1)
    unique &= values != torch.roll(values, -1, dims=1)
    assert torch.equal(ids[unique], expected.indices[unique])


@pytest.mark.parametrize(("rows", "vocab"), [(64, 262_144), (3, 262_144), (70, 300), (1, 5)])
def test_row_logsumexp_is_torchs_logsumexp(rows: int, vocab: int) -> None:
    x = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab)) * 4
    x[0, 1:] = float("-inf")  # a row with one finite logit
    if rows > 1:
        x[1, 0] = 80.0  # a dominant one
    assert torch.equal(row_logsumexp(x), torch.logsumexp(x, dim=-1, keepdim=True))


@pytest.mark.parametrize("candidate_k", [8, 2000])
def test_sample_top_p_matches_the_renormalized_nucleus(candidate_k: int) -> None:
    dists = _distributions()
    nuclei = [_nucleus(p) for p in dists]
    sizes = [len(n) for n in nuclei]
    assert sizes[0] <= 8 < sizes[1] <= 64 < sizes[2]  # first pass, wider pass, full sort
    reps = 4000
    logits = torch.from_numpy(np.log(np.stack(dists * reps))).float()  # rows interleaved
    generator = torch.Generator().manual_seed(2024)
    draws = sample_top_p(logits, top_p=TOP_P, candidate_k=candidate_k, generator=generator)
    assert draws.shape == (len(dists) * reps,)
    assert draws.dtype == torch.long
    for r, nucleus in enumerate(nuclei):
        ids = draws[r :: len(dists)].numpy()
        assert set(ids.tolist()) <= set(nucleus), "sampled outside the nucleus"
        keys = sorted(nucleus)
        observed = np.array([(ids == k).sum() for k in keys])
        expected = np.array([nucleus[k] for k in keys]) * reps
        assert chisquare(observed, expected).pvalue > 1e-3


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sample_top_p_wide_nucleus_goes_past_every_candidate_width(temperature: float) -> None:
    # About 270 of 300 tokens in the nucleus: wider than every candidate width (8, 64, 256),
    # so the full sort decides; the logits are scaled so that temperature restores p.
    rng = np.random.default_rng(7)
    p = 1.0 + 0.2 * rng.random(VOCAB)
    p /= p.sum()
    nucleus = _nucleus(p)
    assert len(nucleus) > 256
    reps = 20_000
    logits = torch.from_numpy(np.log(np.tile(p, (reps, 1))) * temperature).float()
    original = logits.clone()
    draws = sample_top_p(
        logits,
        top_p=TOP_P,
        candidate_k=8,
        generator=torch.Generator().manual_seed(5),
        temperature=temperature,
    ).numpy()
    assert torch.equal(logits, original), "the caller's logits were modified"
    assert set(draws.tolist()) <= set(nucleus)
    keys = sorted(nucleus)
    observed = np.array([(draws == k).sum() for k in keys])
    assert chisquare(observed, np.array([nucleus[k] for k in keys]) * reps).pvalue > 1e-3


@pytest.mark.parametrize(("rows", "vocab"), [(5, 262_144), (4, 50_257), (3, 300)])
def test_top_set_is_every_value_at_or_above_the_threshold(rows: int, vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(rows, vocab, generator=gen) * 3
    x[0, : vocab // 2] = float("-inf")  # masked tokens
    x[1] = torch.round(x[1])  # ties at the threshold
    threshold = (
        torch.stack(
            [
                torch.kthvalue(-row, k).values
                for row, k in zip(x, [5, 40, 1] + [7] * (rows - 3), strict=True)
            ]
        )
        .neg()
        .unsqueeze(1)
    )
    values, columns = top_set(x, threshold)
    for r in range(rows):
        expected = torch.sort(x[r][x[r] >= threshold[r]], descending=True).values
        n = len(expected)
        assert torch.equal(values[r, :n], expected)
        assert torch.equal(x[r, columns[r, :n]], expected)  # each column holds its value
        assert len(set(columns[r, :n].tolist())) == n
        assert bool((values[r, n:] == float("-inf")).all())  # the padding
    assert values.shape[1] == max(int((x[r] >= threshold[r]).sum()) for r in range(rows))


@pytest.mark.parametrize("k", [2000, 16_000])
def test_count_threshold_keeps_about_k_values(k: int) -> None:
    # Gemma-sized rows whose logits fall with the token id (ids follow frequency ranks).
    gen = torch.Generator().manual_seed(k)
    vocab = 262_144
    x = torch.randn(6, vocab, generator=gen) * 2 - torch.log1p(torch.arange(float(vocab)))
    counts = (x >= count_threshold(x, k)).sum(-1)
    assert bool((counts >= k // 2).all()) and bool((counts <= 2 * k).all()), counts


@pytest.mark.parametrize(("nucleus_size", "seed"), [(1_500, 1), (12_000, 0)])
def test_sample_top_p_wide_nucleus_at_gemmas_vocabulary(nucleus_size: int, seed: int) -> None:
    # A nucleus of about 1,460 or 10,500 of 262,144 tokens: past the first width, found by the
    # sampled thresholds of about candidate_k and 8 * candidate_k tokens. Checked per rank
    # group of the nucleus, and nothing drawn outside it. (Seeds whose nucleus boundary is
    # clear of float32 rounding.)
    rng = np.random.default_rng(seed)
    vocab = 262_144
    p = 1e-12 * (1.0 + rng.random(vocab))  # a tail without ties
    heads = rng.choice(vocab, size=nucleus_size + 200, replace=False)
    p[heads] = 1.0 + rng.random(len(heads))  # distinct, spread over the vocabulary
    p /= p.sum()
    nucleus = _nucleus(p, margin=2e-5)
    assert 0.8 * nucleus_size < len(nucleus) < nucleus_size  # past FIRST_WIDTH (and 2,000)
    logits = torch.from_numpy(np.log(p)).float().unsqueeze(0).expand(64, -1).contiguous()
    generator = torch.Generator().manual_seed(nucleus_size)
    draws = np.concatenate(
        [
            sample_top_p(logits, top_p=TOP_P, candidate_k=2000, generator=generator).numpy()
            for _ in range(20)
        ]
    )
    assert set(draws.tolist()) <= set(nucleus), "sampled outside the nucleus"
    ranked = sorted(nucleus, key=lambda i: -nucleus[i])
    groups = np.array_split(np.array(ranked), 8)
    group_of = {int(i): g for g, members in enumerate(groups) for i in members}
    observed = np.bincount([group_of[int(d)] for d in draws], minlength=len(groups))
    expected = np.array([sum(nucleus[int(i)] for i in members) for members in groups])
    assert chisquare(observed, expected * len(draws)).pvalue > 1e-3


def test_sample_top_p_one_keeps_every_token() -> None:
    p = np.array([0.7, 0.2, 0.1])
    logits = torch.from_numpy(np.log(np.tile(p, (20_000, 1)))).float()
    draws = sample_top_p(
        logits, top_p=1.0, candidate_k=1, generator=torch.Generator().manual_seed(3)
    ).numpy()
    observed = np.bincount(draws, minlength=3)
    assert chisquare(observed, p * len(draws)).pvalue > 1e-3


def test_sample_top_p_tiny_nucleus_is_greedy() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9]] * 50)
    draws = sample_top_p(
        logits, top_p=1e-6, candidate_k=2, generator=torch.Generator().manual_seed(0)
    )
    assert set(draws.tolist()) == {1}


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def test_generation_config_validation() -> None:
    for kwargs, name in [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"batch_size": 0}, "batch_size"),
    ]:
        with pytest.raises(ConfigError, match=name):
            GenerationConfig(**kwargs)  # type: ignore[arg-type]


def test_generate_texts_is_deterministic_and_batched(tiny: LoadedModel) -> None:
    config = GenerationConfig(max_new_tokens=6, batch_size=3)
    progress: list[tuple[int, int]] = []
    first = generate_texts(
        tiny, "Say: ", 5, config=config, seed=11, progress=lambda *a: progress.append(a)
    )
    again = generate_texts(tiny, "Say: ", 5, config=config, seed=11)
    other = generate_texts(tiny, "Say: ", 5, config=config, seed=12)
    assert len(first) == 5
    assert all(isinstance(t, str) for t in first)
    assert first == again
    assert first != other
    assert [n for n, _ in progress] == [3, 2]
    assert all(0 < tokens <= n * 6 for n, tokens in progress)
    assert all("\n" not in t for t in first)
    singles = generate_texts(
        tiny, "Say: ", 5, config=GenerationConfig(max_new_tokens=6, batch_size=1), seed=11
    )
    assert len(singles) == 5
    assert generate_texts(tiny, "Say: ", 0, config=config, seed=1) == []
    with pytest.raises(ConfigError, match="n=-1"):
        generate_texts(tiny, "Say: ", -1, config=config, seed=1)


def test_generate_texts_is_steered(tiny: LoadedModel) -> None:
    config = GenerationConfig(max_new_tokens=6, batch_size=4, stop_at_newline=False)
    plain = generate_texts(tiny, "Say: ", 4, config=config, seed=5)
    big = torch.from_numpy(np.random.default_rng(2).normal(size=tiny.hidden_size) * 50).float()
    steered = generate_texts(tiny, "Say: ", 4, config=config, seed=5, deltas={1: big})
    assert steered != plain
    # No hook survives the call.
    assert generate_texts(tiny, "Say: ", 4, config=config, seed=5) == plain


# ---------------------------------------------------------------------------------------------
# Generation from a release
# ---------------------------------------------------------------------------------------------


def test_release_samples_refuse_another_model(llama: LoadedModel) -> None:
    release = make_test_release(llama)
    other = tiny_model(seed=1)
    config = GenerationConfig(max_new_tokens=4, batch_size=2)
    samples = iter_release_samples(
        other, release, n_per_label=2, strength=0.1, config=config, seed=0
    )
    with pytest.raises(ModelMismatchError, match="model_fingerprint"):
        next(samples)
    with pytest.raises(ModelMismatchError):
        generate_from_release(other, release, n_per_label=1, strength=0.1, config=config, seed=0)


def test_release_samples_per_label(llama: LoadedModel) -> None:
    release = make_test_release(llama)
    config = GenerationConfig(max_new_tokens=4, batch_size=2)
    progress: list[tuple[int, int]] = []
    samples = generate_from_release(
        llama,
        release,
        n_per_label=3,
        strength=0.2,
        config=config,
        seed=4,
        progress=lambda done, total: progress.append((done, total)),
    )
    assert [s.label for s in samples] == ["pos"] * 3 + ["neg"] * 3 + ["mix"] * 3
    assert all(s.release_id == release.release_id for s in samples)
    assert progress[-1] == (9, 9)
    again = generate_from_release(
        llama, release, n_per_label=3, strength=0.2, config=config, seed=4
    )
    assert [s.text for s in again] == [s.text for s in samples]
    only = list(
        iter_release_samples(
            llama, release, n_per_label=1, strength=0.2, config=config, seed=4, labels=("mix",)
        )
    )
    assert [s.label for s in only] == ["mix"]
    with pytest.raises(ConfigError, match="strength"):
        next(
            iter_release_samples(
                llama, release, n_per_label=1, strength=-1.0, config=config, seed=0
            )
        )


def test_privacy_report_restates_the_manifests_terms(llama: LoadedModel) -> None:
    """Every privacy term in the report is the manifest's, not a default or another field."""
    for mode in ("distributed", "local", "central"):
        manifest = make_manifest(llama, mode=mode)
        result = RoundResult(np.zeros(1, dtype=np.uint64), survivors=[1, 3], dropped=[2, 4])
        report = privacy_report(manifest, result, model_name="m")
        p = manifest.privacy
        assert report["trust_mode"] == mode
        assert report["trust"] == trust_statement(mode)
        assert (report["epsilon"], report["delta"]) == (p.epsilon, p.delta)
        assert (report["adjacency"], report["accountant"]) == (p.adjacency, p.accountant)
        assert report["noise"]["noise_multiplier"] == p.noise_multiplier
        assert report["noise"]["aggregate_variance_target_scaled"] == p.total_variance
        assert report["noise"]["l2_sensitivity_scaled"] == p.l2_sensitivity
        assert report["noise"]["l1_sensitivity_scaled"] == p.l1_sensitivity
        assert report["noise"]["scale"] == manifest.scale
        assert report["noise"]["count_weight"] == manifest.count_weight
        assert report["noise"]["field_bits"] == manifest.bits
        actual = {"distributed": p.total_variance * 2 / p.threshold, "local": p.total_variance * 2}
        assert report["noise"]["aggregate_variance_actual_scaled"] == pytest.approx(
            actual.get(mode, p.total_variance)
        )
        assert report["model_fingerprint"] == manifest.model_fingerprint
        assert report["layers"] == list(manifest.layers)
        assert report["clip_norms"] == list(manifest.clip_norms)
        assert report["labels"] == list(manifest.labels)
        assert report["dropped_clients"] == ["2", "4"]


@pytest.mark.parametrize("key", ["task_id", "epsilon", "delta", "trust_mode", "model_fingerprint"])
def test_a_report_without_a_privacy_term_is_refused(
    tmp_path: Path, llama: LoadedModel, key: str
) -> None:
    good = save_release(make_test_release(llama), tmp_path / "good.safetensors")
    _, metadata = _parts(good)
    report = json.loads(metadata["report"])
    del report[key]
    stripped = _rewrite(
        good, tmp_path / "stripped.safetensors", redigest=True, report=json.dumps(report)
    )
    with pytest.raises(ReleaseIntegrityError, match=f"report {key}=None differs"):
        load_release(stripped)


@pytest.mark.parametrize(
    ("report_json", "error", "message"),
    [
        ("{not json", ConfigError, "bad manifest or report JSON"),
        ("[1, 2]", ReleaseIntegrityError, "not a JSON object"),
    ],
)
def test_a_digested_but_malformed_report_is_refused(
    tmp_path: Path, llama: LoadedModel, report_json: str, error: type[Exception], message: str
) -> None:
    good = save_release(make_test_release(llama), tmp_path / "good.safetensors")
    bad = _rewrite(good, tmp_path / "bad.safetensors", redigest=True, report=report_json)
    with pytest.raises(error, match=message):
        load_release(bad)
