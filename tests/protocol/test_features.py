"""Tests of the feature function: prompt templates, feature extraction, clipping, class sums."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsynth.protocol.errors import ConfigError, ShapeError
from fedsynth.protocol.features import (
    FeatureSpec,
    PromptTemplate,
    check_instruction,
    class_unit_sums,
    clip_to_unit,
    encode_example,
    extract_features,
)
from fedsynth.protocol.models import LoadedModel, tiny_model

TEMPLATE = PromptTemplate(
    instruction="Review ({label}): ",
    label_names=(("pos", "positive"), ("neg", "negative")),
    shots=(("neg", "  dull and slow  "), ("pos", "a joy")),
)
TEXTS = [
    "good",
    "a much longer text about several things at once",
    "meh",
    "x" * 90,
    "café ünïcode ✓",
    "ok ok",
    "z",
    "another one here, with punctuation!",
    "",
    "q r s",
]
LABELS = ["pos", "neg", "pos", "neg", "pos", "neg", "pos", "neg", "pos", "neg"]


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request: pytest.FixtureRequest) -> LoadedModel:
    return tiny_model(seed=0, arch=request.param)


# ---------------------------------------------------------------------------------------------
# PromptTemplate and FeatureSpec
# ---------------------------------------------------------------------------------------------


def test_template_requires_label_slot() -> None:
    with pytest.raises(ConfigError, match=r"instruction.*label"):
        PromptTemplate(instruction="Review: ", label_names=(("pos", "positive"),))


@pytest.mark.parametrize(
    "label_names",
    [(("pos", "positive"), ("pos", "also positive")), ()],
)
def test_template_requires_distinct_labels(label_names: tuple[tuple[str, str], ...]) -> None:
    with pytest.raises(ConfigError, match="label_names"):
        PromptTemplate(instruction="{label}: ", label_names=label_names)


def test_template_rejects_shot_with_unknown_label() -> None:
    with pytest.raises(ConfigError, match=r"shots.*'neutral'"):
        PromptTemplate(
            instruction="{label}: ",
            label_names=(("pos", "positive"), ("neg", "negative")),
            shots=(("pos", "nice"), ("neutral", "fine")),
        )


def test_prefix_renders_shots_in_order_then_instruction() -> None:
    assert TEMPLATE.labels == ("pos", "neg")
    assert TEMPLATE.prefix("pos") == (
        "Review (negative): dull and slow\n\nReview (positive): a joy\n\nReview (positive): "
    )
    assert TEMPLATE.prefix("neg").endswith("\n\nReview (negative): ")
    plain = PromptTemplate(instruction="A {label} one:\n", label_names=(("a", "good"),))
    assert plain.prefix("a") == "A good one:\n"


def test_prefix_unknown_label_and_dict_round_trip() -> None:
    with pytest.raises(ConfigError, match="label='other'"):
        TEMPLATE.prefix("other")
    assert PromptTemplate.from_dict(TEMPLATE.to_dict()) == TEMPLATE


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"layers": ()}, "layers"),
        ({"layers": (-1, 2)}, "layers"),
        ({"layers": (2, 1)}, "layers"),
        ({"layers": (1, 1)}, "layers"),
        ({"layers": (1,), "max_text_tokens": 0}, "max_text_tokens"),
        ({"layers": (1,), "batch_size": 0}, "batch_size"),
    ],
)
def test_feature_spec_validation(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        FeatureSpec(TEMPLATE, **kwargs)  # type: ignore[arg-type]


def test_encode_example_truncates_text_and_never_leaves_it_empty(tiny: LoadedModel) -> None:
    ids, plen = encode_example(tiny.tokenizer, "P: ", "abcdefgh", 3)
    prefix_ids = tiny.tokenizer.encode("P: ", add_special_tokens=True)
    assert plen == len(prefix_ids)
    assert ids == prefix_ids + tiny.tokenizer.encode("abc", add_special_tokens=False)
    ids, plen = encode_example(tiny.tokenizer, "P: ", "", 3)
    assert len(ids) == plen + 1


# ---------------------------------------------------------------------------------------------
# extract_features
# ---------------------------------------------------------------------------------------------


def _spec(
    batch_size: int, layers: tuple[int, ...] = (0, 2), max_text_tokens: int = 64
) -> FeatureSpec:
    return FeatureSpec(TEMPLATE, layers, max_text_tokens, batch_size)


def test_extract_shapes_and_dtype(tiny: LoadedModel) -> None:
    feats, norms = extract_features(tiny, TEXTS, LABELS, _spec(4))
    assert feats.shape == (len(TEXTS), 2, tiny.hidden_size)
    assert norms.shape == (len(TEXTS), 2)
    assert feats.dtype == np.float32
    assert norms.dtype == np.float32
    assert np.all(np.isfinite(feats))
    assert np.all(norms > 0)
    # Distinct inputs give distinct features (no row was left at zero or overwritten).
    assert len({feats[i].tobytes() for i in range(len(TEXTS))}) == len(TEXTS)


def test_extract_independent_of_batch_size(tiny: LoadedModel) -> None:
    one, one_norms = extract_features(tiny, TEXTS, LABELS, _spec(1))
    seven, seven_norms = extract_features(tiny, TEXTS, LABELS, _spec(7))
    everything, _ = extract_features(tiny, TEXTS, LABELS, _spec(64))
    np.testing.assert_allclose(seven, one, atol=1e-5, rtol=0)
    np.testing.assert_allclose(everything, one, atol=1e-5, rtol=0)
    np.testing.assert_allclose(seven_norms, one_norms, atol=1e-5, rtol=1e-6)


def test_extract_independent_of_input_order(tiny: LoadedModel) -> None:
    feats, norms = extract_features(tiny, TEXTS, LABELS, _spec(3))
    perm = np.random.default_rng(5).permutation(len(TEXTS))
    shuffled, shuffled_norms = extract_features(
        tiny, [TEXTS[i] for i in perm], [LABELS[i] for i in perm], _spec(3)
    )
    np.testing.assert_allclose(shuffled, feats[perm], atol=1e-5, rtol=0)
    np.testing.assert_allclose(shuffled_norms, norms[perm], atol=1e-5, rtol=1e-6)


def test_extract_matches_manual_hidden_states(tiny: LoadedModel) -> None:
    layers = (0, 2)
    feats, norms = extract_features(tiny, TEXTS, LABELS, _spec(4, layers))
    for i, (text, label) in enumerate(zip(TEXTS, LABELS, strict=True)):
        ids, plen = encode_example(tiny.tokenizer, TEMPLATE.prefix(label), text, 64)
        with torch.no_grad():
            out = tiny.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        for j, layer in enumerate(layers):
            hidden = out.hidden_states[layer + 1][0]  # output of block `layer`
            text_part = hidden[plen:]
            np.testing.assert_allclose(
                feats[i, j], text_part.mean(dim=0).numpy(), atol=1e-5, rtol=0
            )
            assert norms[i, j] == pytest.approx(float(text_part.norm(dim=-1).mean()), abs=1e-5)
            # The prompt tokens are excluded: averaging over everything gives another value.
            assert not np.allclose(feats[i, j], hidden.mean(dim=0).numpy(), atol=1e-4)


def test_extract_truncates_text_tokens(tiny: LoadedModel) -> None:
    long_text = "abcdefghijklmnop"
    truncated, _ = extract_features(tiny, [long_text], ["pos"], _spec(1, max_text_tokens=5))
    short, _ = extract_features(tiny, [long_text[:5]], ["pos"], _spec(1, max_text_tokens=64))
    np.testing.assert_allclose(truncated, short, atol=1e-6)


def test_extract_label_changes_prefix(tiny: LoadedModel) -> None:
    feats, _ = extract_features(tiny, ["same text", "same text"], ["pos", "neg"], _spec(2))
    assert not np.allclose(feats[0], feats[1])


def test_extract_rejects_layer_beyond_model(tiny: LoadedModel) -> None:
    with pytest.raises(ConfigError, match="layers"):
        extract_features(tiny, TEXTS[:2], LABELS[:2], _spec(2, (1, tiny.num_layers)))


def test_extract_rejects_length_mismatch(tiny: LoadedModel) -> None:
    with pytest.raises(ShapeError):
        extract_features(tiny, TEXTS[:3], LABELS[:2], _spec(2))


def test_extract_reports_progress_and_removes_hooks(tiny: LoadedModel) -> None:
    seen: list[int] = []
    extract_features(tiny, TEXTS, LABELS, _spec(4), progress=seen.append)
    assert sum(seen) == len(TEXTS)
    assert seen == [4, 4, 2]
    # The forward pass is whole again after extraction: no hook stops it early.
    ids = torch.tensor([tiny.tokenizer.encode("hello")])
    with torch.no_grad():
        out = tiny.model(input_ids=ids, output_hidden_states=True)
    assert len(out.hidden_states) == tiny.num_layers + 1


# ---------------------------------------------------------------------------------------------
# clip_to_unit and class_unit_sums
# ---------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 6),
    n_layers=st.integers(1, 4),
    hidden=st.integers(1, 9),
    magnitude=st.floats(1e-3, 1e3),
)
def test_clip_to_unit_bounds_norm_and_keeps_direction(
    seed: int, n: int, n_layers: int, hidden: int, magnitude: float
) -> None:
    rng = np.random.default_rng(seed)
    diffs = rng.normal(size=(n, n_layers, hidden)) * magnitude
    clip = rng.uniform(0.1, 10.0, size=n_layers)
    unit = clip_to_unit(diffs, clip)
    assert unit.shape == diffs.shape
    assert unit.dtype == np.float64
    norms = np.linalg.norm(unit, axis=-1)
    assert np.all(norms <= 1.0 + 1e-12)
    raw = np.linalg.norm(diffs, axis=-1)
    # Same direction: unit is a positive multiple of diffs.
    cos = np.sum(unit * diffs, axis=-1) / (norms * raw)
    np.testing.assert_allclose(cos, 1.0, atol=1e-9)
    # Below the clip norm nothing is clipped, only divided by m_l; above, the norm is exactly 1.
    expected = np.where(raw <= clip[None, :], raw / clip[None, :], 1.0)
    np.testing.assert_allclose(norms, expected, rtol=1e-9)


def test_clip_to_unit_zero_row_and_errors() -> None:
    unit = clip_to_unit(np.zeros((1, 2, 3)), np.array([1.0, 2.0]))
    assert not unit.any()
    with pytest.raises(ShapeError):
        clip_to_unit(np.zeros((1, 2, 3)), np.array([1.0]))
    with pytest.raises(ShapeError):
        clip_to_unit(np.zeros((2, 3)), np.array([1.0, 1.0]))
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ConfigError, match="clip_norms"):
            clip_to_unit(np.zeros((1, 2, 3)), np.array([1.0, bad]))


def test_class_unit_sums_layout() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(5, 2, 3)) * 4
    labels = ["b", "a", "b", "b", "a"]
    reference = rng.normal(size=(3, 2, 3))
    clip = np.array([1.5, 2.5])
    out = class_unit_sums(
        feats,
        labels,
        label_order=("a", "b", "c"),
        reference=reference,
        clip_norms=clip,
        count_weight=0.5,
    )
    assert out.shape == (3, 2 * 3 + 1)
    for c, label in enumerate(("a", "b")):
        rows = feats[[i for i, x in enumerate(labels) if x == label]]
        expected = clip_to_unit(rows - reference[c][None], clip).sum(axis=0).reshape(-1)
        np.testing.assert_allclose(out[c, :-1], expected)
        assert out[c, -1] == 0.5 * len(rows)
    assert not out[2].any()  # a class without records stays zero
    with pytest.raises(ShapeError):
        class_unit_sums(
            feats,
            labels,
            label_order=("a", "b"),
            reference=reference,
            clip_norms=clip,
            count_weight=0.5,
        )


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 6),
    n_layers=st.integers(1, 4),
    hidden=st.integers(1, 8),
    n_classes=st.integers(1, 3),
    magnitude=st.floats(1e-2, 1e2),
    gamma=st.floats(0.05, 5.0),
)
def test_class_unit_sums_sensitivity(
    seed: int,
    n: int,
    n_layers: int,
    hidden: int,
    n_classes: int,
    magnitude: float,
    gamma: float,
) -> None:
    rng = np.random.default_rng(seed)
    order = tuple(f"c{i}" for i in range(n_classes))
    feats = rng.normal(size=(n, n_layers, hidden)) * magnitude
    labels = [order[i] for i in rng.integers(0, n_classes, size=n)]
    reference = rng.normal(size=(n_classes, n_layers, hidden))
    clip = rng.uniform(0.1, 3.0, size=n_layers)
    extra = rng.normal(size=(1, n_layers, hidden)) * magnitude
    extra_label = order[int(rng.integers(0, n_classes))]

    def sums(f: np.ndarray, lab: list[str]) -> np.ndarray:
        return class_unit_sums(
            f, lab, label_order=order, reference=reference, clip_norms=clip, count_weight=gamma
        )

    before = sums(feats, labels)
    after = sums(np.concatenate([feats, extra]), [*labels, extra_label])
    change = np.linalg.norm(after - before, axis=1)
    changed_row = order.index(extra_label)
    assert change[changed_row] <= math.sqrt(n_layers + gamma**2) * (1 + 1e-9)
    assert change[changed_row] >= gamma * (1 - 1e-9)  # the count always moves
    others = np.delete(change, changed_row)
    assert np.all(others <= 1e-9)


def test_class_unit_sums_sensitivity_bound_is_tight() -> None:
    rng = np.random.default_rng(1)
    reference = np.zeros((1, 3, 4))
    clip = np.array([0.5, 1.0, 2.0])
    big = rng.normal(size=(1, 3, 4)) * 100  # clipped in every layer
    one = class_unit_sums(
        big, ["x"], label_order=("x",), reference=reference, clip_norms=clip, count_weight=0.7
    )
    assert np.linalg.norm(one[0]) == pytest.approx(math.sqrt(3 + 0.7**2))


def test_a_non_finite_row_clips_to_no_direction() -> None:
    """A record whose difference holds NaN or inf (a poisoned reference row, an overflow) adds
    no direction instead of making the class sum NaN, which would fail only its holder."""
    diffs = np.ones((3, 2, 4))
    diffs[1, 0, 2] = np.nan
    diffs[2, 1, 0] = np.inf
    unit = clip_to_unit(diffs, np.array([1.0, 1.0]))
    assert np.isfinite(unit).all()
    assert np.all(unit[1, 0] == 0) and np.all(unit[2, 1] == 0)
    assert np.allclose(np.linalg.norm(unit[0], axis=-1), 1.0)
    assert np.allclose(np.linalg.norm(unit[1, 1]), 1.0)


@pytest.mark.parametrize(
    "instruction",
    [
        "{label}{label:>30000000}",  # a few characters that render 30 million
        "A {label} {label!r} text:\n",
        "A {label} {label.__class__} text:\n",
        "A {label} {label[0]} text:\n",
        "A {label:{label}} text:\n",
        "A {label} text {}:\n",
    ],
)
def test_an_instruction_slot_must_be_a_bare_label(instruction: str) -> None:
    """Format specs, conversions, attributes and indexes are refused: a width in a consumer's
    variant rendered a prompt of any length past every request-size limit."""
    with pytest.raises(ConfigError, match=re.escape("its only slot must be {label}")):
        check_instruction(instruction, "instruction")


def test_an_instruction_may_repeat_its_bare_label_and_escape_braces() -> None:
    check_instruction("A {label} text about {{braces}}, {label} again:\n", "instruction")
