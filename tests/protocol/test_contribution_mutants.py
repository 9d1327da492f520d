"""Edges of the contribution encoding and the release decoder that mutation testing showed untested.

Each test states the behaviour a one-token change of protocol/contribution.py broke without any
other test failing; see docs/mutation-testing.md for the mutants.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from test_contribution import build_manifest

from fedsynth.protocol.codec import to_field
from fedsynth.protocol.contribution import (
    conditional_round,
    decode_release,
    encode_contribution,
    integer_class_sums,
    noise_schedule,
    noise_share_variance,
    remove_excess_noise,
    share_noise,
)
from fedsynth.protocol.errors import ConfigError, FieldRangeError, ShapeError
from fedsynth.protocol.exact_noise import (
    SEED_BYTES,
    NoiseSchedule,
    removable_noise,
    revealed_seed,
)
from fedsynth.protocol.manifest import PrivacySpec


class _ScriptedRng:
    """Stands in for a Generator: ``random`` returns the scripted uniforms in order."""

    def __init__(self, *draws: float | list[float]) -> None:
        self._draws = list(draws)
        self.calls = 0

    def random(self, shape: tuple[int, ...]) -> np.ndarray:
        value = self._draws[self.calls]
        self.calls += 1
        return np.broadcast_to(np.asarray(value, dtype=np.float64), shape).copy()


def test_a_row_rounded_exactly_onto_the_bound_is_kept() -> None:
    # The accountant assumes norm <= bound: (2.5, 4) rounded up to (3, 4) has norm 5 = bound
    # and is kept as drawn, without another draw.
    rng = _ScriptedRng(0.0, 0.99)
    out = conditional_round(np.array([[2.5, 4.0]]), l2_bound=5.0, rng=rng)  # type: ignore[arg-type]
    np.testing.assert_array_equal(out, [[3, 4]])
    assert rng.calls == 1


def test_a_redraw_landing_exactly_on_the_bound_is_kept() -> None:
    # (2.5, 4, 0.5) first rounds to (3, 4, 1), norm 5.10 > 5; the redraw gives (3, 4, 0), norm
    # exactly 5, which is within the bound and kept. A uniform of exactly 0 (a possible draw)
    # rounds every fraction up but never an integer coordinate: 4 stays 4 in both draws.
    rng = _ScriptedRng(0.0, [0.0, 0.0, 0.99])
    out = conditional_round(np.array([[2.5, 4.0, 0.5]]), l2_bound=5.0, rng=rng)  # type: ignore[arg-type]
    np.testing.assert_array_equal(out, [[3, 4, 0]])
    assert rng.calls == 2


def test_redraws_round_every_coordinate_independently() -> None:
    # (0.5, 0.5) under the bound 1: (1, 1) is redrawn, and independent redraws leave the three
    # accepted outcomes (0, 0), (1, 0), (0, 1) equally likely (1/3 each). One uniform shared by
    # a whole redraw would only ever give (0, 0) or (1, 1), so (0, 0) would reach 1/2.
    n = 6000
    out = conditional_round(
        np.full((n, 2), 0.5), l2_bound=1.0, rng=np.random.default_rng(21), max_tries=200
    )
    share = np.mean((out == 0).all(axis=1))
    assert abs(share - 1 / 3) < 0.03
    assert np.mean((out == [1, 0]).all(axis=1)) == pytest.approx(1 / 3, abs=0.03)


def test_max_tries_counts_the_redraws_after_the_first_draw() -> None:
    # (0.5, 0.5) rounds to (1, 1), norm 1.41 > 0.9, on a uniform of 0; to (0, 0) on 0.99.
    rows = np.array([[0.5, 0.5]])
    rng = _ScriptedRng(0.0, 0.99)
    out = conditional_round(rows, l2_bound=0.9, rng=rng, max_tries=1)  # type: ignore[arg-type]
    np.testing.assert_array_equal(out, [[0, 0]])
    assert rng.calls == 2
    with pytest.raises(FieldRangeError, match=r"^1 rows could not be rounded within l2_bound=0.9 "):
        conditional_round(rows, l2_bound=0.9, rng=_ScriptedRng(0.0, 0.0), max_tries=1)  # type: ignore[arg-type]
    # Two redraws allowed: the second one succeeds.
    rng = _ScriptedRng(0.0, 0.0, 0.99)
    out = conditional_round(rows, l2_bound=0.9, rng=rng, max_tries=2)  # type: ignore[arg-type]
    np.testing.assert_array_equal(out, [[0, 0]])
    assert rng.calls == 3


def test_a_holder_without_records_of_the_first_class_still_sums_the_others() -> None:
    manifest, reference = build_manifest(hidden=8)
    rng = np.random.default_rng(3)
    n = 5
    feats = reference[[1] * n] + 0.01 * rng.normal(size=(n, 2, manifest.hidden_size))
    sums = integer_class_sums(feats, ["neg"] * n, manifest=manifest, reference=reference, rng=rng)
    assert not sums[0].any()
    # Independent reference: each record's count coordinate is gamma * scale = 50, an integer,
    # so it rounds to exactly 50.
    assert sums[1, -1] == n * manifest.count_weight * manifest.scale
    assert sums[1, :-1].any()


def test_a_feature_shape_error_states_both_shapes() -> None:
    manifest, reference = build_manifest(hidden=8)
    feats = np.zeros((4, 3, 8))
    with pytest.raises(ShapeError, match=re.escape("features shape (3, 8) != manifest's (2, 8)")):
        integer_class_sums(
            feats, ["pos"] * 4, manifest=manifest, reference=reference, rng=np.random.default_rng()
        )


def test_the_decoder_names_both_lengths_of_a_wrong_sum() -> None:
    manifest, _ = build_manifest()
    with pytest.raises(
        ShapeError, match=re.escape(f"sum shape ({manifest.dim + 1},) != ({manifest.dim},)")
    ):
        decode_release(np.zeros(manifest.dim + 1, dtype=np.uint64), manifest=manifest, survivors=1)


def test_central_decoding_without_an_rng_is_refused_saying_why() -> None:
    manifest, _ = build_manifest(mode="central", total_variance=4.0)
    with pytest.raises(
        ConfigError, match=r"^central mode needs an rng for the coordinator's noise$"
    ):
        decode_release(np.zeros(manifest.dim, dtype=np.uint64), manifest=manifest, survivors=1)


def _corrupt(manifest_dim: int, index: int, value: int, bits: int) -> np.ndarray:
    ints = np.zeros(manifest_dim, dtype=np.int64)
    ints[index] = value
    return to_field(ints, bits=bits)


def test_range_refusals_end_by_saying_the_release_is_discarded() -> None:
    manifest, _ = build_manifest(max_records=10, total_variance=100.0)
    ending = r"a client sent a malformed input and this release is discarded$"
    count = manifest.row_dim - 1
    with pytest.raises(FieldRangeError, match=ending):
        decode_release(
            _corrupt(manifest.dim, count, -10_000, manifest.bits), manifest=manifest, survivors=1
        )
    with pytest.raises(FieldRangeError, match=r"layer 0 has an L2 norm .*" + ending):
        decode_release(
            _corrupt(manifest.dim, 0, 10**7, manifest.bits), manifest=manifest, survivors=1
        )


def test_an_overflow_refusal_says_the_task_needs_more_bits() -> None:
    manifest, reference = build_manifest(bits=16, scale=100.0, max_records=10, total_variance=1.0)
    rng = np.random.default_rng(10)
    feats = reference[[0] * 300] + rng.normal(size=(300, 2, manifest.hidden_size))
    big = integer_class_sums(feats, ["pos"] * 300, manifest=manifest, reference=reference, rng=rng)
    with pytest.raises(
        FieldRangeError,
        match=r"for K=3 clients without risk of wrapping; the task needs more field bits$",
    ):
        encode_contribution(big, manifest=manifest, rng=rng)


# --------------------------------------------------------------------------- batches, noise


def test_batches_of_one_class_add_up_and_are_counted() -> None:
    # A holder streams its records in batches: a second batch of the same class adds to the
    # first (it must not replace it), and the record count covers every batch (the policy
    # compares it with max_records).
    from fedsynth.protocol.contribution import ClassSumAccumulator

    manifest, reference = build_manifest()
    feats = np.random.default_rng(4).normal(size=(7, 2, 8)).astype(np.float32)
    accumulator = ClassSumAccumulator(manifest=manifest, reference=reference)
    accumulator.add(feats[:3], ["pos"] * 3, rng=np.random.default_rng(9))
    first = accumulator.sums
    accumulator.add(feats[3:], ["pos"] * 4, rng=np.random.default_rng(10))
    assert accumulator.n_records == 7
    second = integer_class_sums(
        feats[3:],
        ["pos"] * 4,
        manifest=manifest,
        reference=reference,
        rng=np.random.default_rng(10),
    )
    np.testing.assert_array_equal(accumulator.sums, first + second)
    assert accumulator.sums[0, -1] == round(7 * manifest.count_weight * manifest.scale)


def _exact_privacy(threshold: int = 2) -> PrivacySpec:
    return PrivacySpec(
        epsilon=4.0,
        delta=1e-5,
        mode="distributed",
        threshold=threshold,
        total_variance=400.0,
        noise_multiplier=1.0,
        l2_sensitivity=1.0,
        l1_sensitivity=1.0,
        accountant="test",
        noise_sharing="exact",
    )


def test_excess_removal_takes_only_well_formed_seeds_of_survivors() -> None:
    # K = 4, t = 2, survivors 1-3: each reveals seed_2, the coordinator subtracts component 2.
    # A seed from a node outside the survivor set, a value that is not bytes and a seed of the
    # wrong length are ignored (that survivor's excess stays: more noise, never less), and none
    # of them crashes the decoder.
    privacy = _exact_privacy()
    schedule = NoiseSchedule(privacy.total_variance, privacy.threshold, 4)
    tops = {node: bytes([node]) * SEED_BYTES for node in range(1, 5)}
    seeds = {node: revealed_seed(top, schedule, 3) for node, top in tops.items()}
    dim = 16
    field_sum = to_field(np.arange(dim, dtype=np.int64) * 1000, bits=48)
    revealed: dict[int, object] = {1: seeds[1], 2: "not bytes", 3: seeds[3][:-1], 4: seeds[4]}
    out, removed = remove_excess_noise(
        field_sum, revealed, privacy=privacy, clients=4, survivors=[1, 2, 3], bits=48
    )
    assert removed == [1]
    expected = np.arange(dim, dtype=np.int64) * 1000 - removable_noise(seeds[1], schedule, 3, dim)
    np.testing.assert_array_equal(out, to_field(expected, bits=48))


def test_uploaded_excess_replaces_the_seed_of_its_survivor_only() -> None:
    # K = 4, t = 2, survivors 1-3. Survivor 1 uploads its excess (and a seed that must not be
    # used as well), 2 reveals a seed, 3 uploads a vector of the wrong size (its excess stays);
    # node 4, not a survivor, uploads one that is ignored.
    privacy = _exact_privacy()
    schedule = NoiseSchedule(privacy.total_variance, privacy.threshold, 4)
    tops = {node: bytes([node]) * SEED_BYTES for node in range(1, 5)}
    seeds = {node: revealed_seed(top, schedule, 3) for node, top in tops.items()}
    dim = 16
    excess = {node: removable_noise(seed, schedule, 3, dim) for node, seed in seeds.items()}
    field_sum = to_field(np.arange(dim, dtype=np.int64) * 1000, bits=48)
    out, removed = remove_excess_noise(
        field_sum,
        {1: seeds[1], 2: seeds[2]},
        privacy=privacy,
        clients=4,
        survivors=[1, 2, 3],
        bits=48,
        uploaded={1: excess[1], 3: excess[3][:-1], 4: excess[4]},
    )
    assert removed == [1, 2]
    expected = np.arange(dim, dtype=np.int64) * 1000 - excess[1] - excess[2]
    np.testing.assert_array_equal(out, to_field(expected, bits=48))


def test_plain_shares_and_threshold_survivors_remove_nothing() -> None:
    field_sum = to_field(np.arange(8, dtype=np.int64), bits=48)
    plain = dataclasses.replace(_exact_privacy(), noise_sharing="plain")
    seed = bytes(SEED_BYTES)
    out, removed = remove_excess_noise(
        field_sum, {1: seed, 2: seed}, privacy=plain, clients=3, survivors=[1, 2], bits=48
    )
    assert removed == [] and out is field_sum
    # Exact sharing with exactly t survivors: every component stays, nothing is revealed.
    out, removed = remove_excess_noise(
        field_sum,
        {1: seed, 2: seed},
        privacy=_exact_privacy(),
        clients=3,
        survivors=[1, 2],
        bits=48,
    )
    assert removed == [] and out is field_sum


def test_exact_shares_need_the_holders_chain_seed() -> None:
    with pytest.raises(ConfigError, match=r"^exact noise sharing needs this holder's chain seed$"):
        share_noise(
            _exact_privacy(), clients=4, dim=8, rng=np.random.default_rng(0), noise_seed=None
        )


@pytest.mark.parametrize("sharing", ["plain", "exact"])
def test_shares_are_sized_for_the_honest_holders_only(sharing: str) -> None:
    # t = 3 with one colluder that may add nothing: the two honest holders of any t must carry
    # the whole target, so each share is v / (t - c) = v / 2 (v / (t + c) would leave half of
    # it), and the exact-sharing ladder runs over the honest holders with that total.
    privacy = dataclasses.replace(_exact_privacy(threshold=3), colluders=1, noise_sharing=sharing)
    assert noise_share_variance(privacy) == pytest.approx(400.0 / 2)
    assert noise_share_variance(dataclasses.replace(privacy, colluders=0)) == pytest.approx(
        400.0 / 3
    )
    schedule = noise_schedule(privacy, clients=5)
    if sharing == "plain":
        assert schedule is None
        return
    assert schedule is not None
    assert schedule.colluders == 1
    assert schedule.total_variance == pytest.approx(400.0)
    assert schedule == NoiseSchedule(400.0, 3, 5, colluders=1)
