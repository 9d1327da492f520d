"""Add-then-remove distributed noise: the target variance for every survivor count t..K."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from fedsynth.protocol.errors import ConfigError, ProtocolError
from fedsynth.protocol.exact_noise import (
    AUTO_UPLOAD_SAMPLES,
    SEED_BYTES,
    TOLERANCE,
    NoiseSchedule,
    aggregate_variance,
    chain_seeds,
    component_noise,
    excess_noise,
    holder_noise,
    removable_noise,
    removal_mode,
    revealed_seed,
    seeds_from_revealed,
)

V = 40.0  # a target variance per coordinate (Skellam: any positive value)


def _majority(k: int) -> int:
    return k // 2 + 1


@pytest.mark.parametrize("k", [2, 3, 5, 10, 20, 26])
def test_every_survivor_count_keeps_exactly_the_target(k: int) -> None:
    t = _majority(k)
    schedule = NoiseSchedule(total_variance=V, threshold=t, clients=k)
    assert not schedule.uses_blocks  # the exact ladder up to K = 26
    whole = schedule.whole
    assert whole == (k if k > t else None)  # W wherever there is something to remove
    base = V / k + V / (k - 1) - V / t if whole else V / k
    assert schedule.base_variance == pytest.approx(base)
    assert schedule.base_variance + sum(
        schedule.component_variance(j) for j in schedule.components
    ) == pytest.approx(V / t)
    assert schedule.share_variance == pytest.approx(V / t)
    for s in range(t, k + 1):
        assert schedule.kept_variance(s) == pytest.approx(V / s, rel=1e-12)
        assert s * schedule.kept_variance(s) == pytest.approx(V, rel=1e-12)
        assert aggregate_variance(schedule, s, s) == pytest.approx(V, rel=1e-12)
        # All surviving: W alone; otherwise the rungs t..s-1.
        assert list(schedule.removed(s)) == ([k] if s == k and whole else list(range(t, s)))
        # The plain share scheme's excess, which this removes: s / t times the target.
        assert aggregate_variance(schedule, s, 0) == pytest.approx(s * V / t)
    assert all(schedule.component_variance(j) > 0 for j in schedule.components)
    assert schedule.base_variance >= 0


@pytest.mark.parametrize("k", [3, 4, 5, 7, 10, 20, 51, 100, 101])
def test_every_threshold_a_holder_accepts_has_the_whole_round_component(k: int) -> None:
    """W needs 1/K + 1/(K − 1) >= 1/t (c subtracted), which 2t > K + c gives: so for every
    safe threshold below K, all surviving costs one component per survivor."""
    from fedsynth.protocol.secagg import min_safe_threshold

    for c in range(k):
        t = min_safe_threshold(k, c)
        if not c < t < k:
            continue
        for threshold in range(t, k):
            schedule = NoiseSchedule(total_variance=V, threshold=threshold, clients=k, colluders=c)
            assert schedule.whole == k - c  # on the ladder and beside binary blocks alike
            assert list(schedule.removed(k)) == [k - c]
            assert schedule.base_variance > 0
    # Below half, the base W would leave is negative: the plain ladder runs.
    low = NoiseSchedule(total_variance=V, threshold=2, clients=5)
    assert low.whole is None and list(low.components) == [2, 3, 4]
    assert list(low.removed(5)) == [2, 3, 4] and low.base_variance == pytest.approx(V / 5)


def test_a_survivor_that_does_not_reveal_keeps_its_whole_share() -> None:
    schedule = NoiseSchedule(total_variance=V, threshold=3, clients=5)
    assert aggregate_variance(schedule, 5, 4) == pytest.approx(4 * V / 5 + V / 3)
    assert aggregate_variance(schedule, 5, 4) > V  # more noise than the target, never less


def test_the_revealed_seed_regenerates_exactly_the_removed_components() -> None:
    k, t, dim = 7, 4, 500
    schedule = NoiseSchedule(total_variance=V, threshold=t, clients=k)
    top = os.urandom(SEED_BYTES)
    seeds = chain_seeds(top, schedule)
    # Rungs t..K-2 and W (index K); the root seed_{K-1} = top seeds nothing and never leaves.
    assert sorted(seeds) == [*range(t, k - 1), k] and top not in seeds.values()
    assert len(set(seeds.values())) == k - t
    for s in range(t + 1, k + 1):
        revealed = revealed_seed(top, schedule, s)
        removed = [k] if s == k else list(range(t, s))
        assert revealed == seeds[removed[-1]]
        derived = seeds_from_revealed(revealed, schedule, s)
        # Exactly the removable seeds: none of the components that must stay.
        assert derived == {j: seeds[j] for j in removed}
        expected = sum(component_noise(seeds[j], j, schedule, dim) for j in removed)
        np.testing.assert_array_equal(removable_noise(revealed, schedule, s, dim), expected)
    assert revealed_seed(top, schedule, t) is None


def test_holder_noise_minus_the_removed_components_is_the_kept_part() -> None:
    k, t, dim = 6, 4, 300
    schedule = NoiseSchedule(total_variance=V, threshold=t, clients=k)
    top = os.urandom(SEED_BYTES)
    seed = 1234
    noise = holder_noise(schedule, dim, rng=np.random.default_rng(seed), top=top)
    # The same OS draw alone: a schedule with no components and the same base variance.
    alone = NoiseSchedule(total_variance=schedule.base_variance * t, threshold=t, clients=t)
    base = holder_noise(alone, dim, rng=np.random.default_rng(seed), top=top)
    seeds = chain_seeds(top, schedule)
    assert sorted(seeds) == [4, 6]  # rung 4 and W
    for s, kept in ((5, [6]), (6, [4])):  # one dropped: W stays; all surviving: rung 4 stays
        want = base + sum(component_noise(seeds[j], j, schedule, dim) for j in kept)
        revealed = revealed_seed(top, schedule, s) or b""
        np.testing.assert_array_equal(
            noise - removable_noise(revealed, schedule, s, dim), want, err_msg=f"s={s}"
        )


def _round_noise(
    schedule: NoiseSchedule, survivors: int, dim: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The summed noise of ``survivors`` holders, and the sum of what they reveal for removal."""
    total = np.zeros(dim, dtype=np.int64)
    removed = np.zeros(dim, dtype=np.int64)
    for _ in range(survivors):
        top = rng.bytes(SEED_BYTES)
        total += holder_noise(schedule, dim, rng=rng, top=top)
        revealed = revealed_seed(top, schedule, survivors)
        if revealed is not None:
            removed += removable_noise(revealed, schedule, survivors, dim)
    return total, removed


@pytest.mark.parametrize(
    ("k", "survivors"), [(3, 2), (3, 3), (10, 6), (10, 9), (10, 10), (20, 11), (20, 20)]
)
def test_round_noise_after_removal_has_the_target_variance(k: int, survivors: int) -> None:
    """The sum of ``survivors`` holders' noise, less what they reveal: variance v (and the
    negative control: without removal, s/t times v)."""
    t = _majority(k)
    dim = 40_000
    schedule = NoiseSchedule(total_variance=V, threshold=t, clients=k)
    total, removed = _round_noise(schedule, survivors, dim, np.random.default_rng([k, survivors]))
    # Sample variance of n draws: relative sd sqrt(2 / n) (Skellam is near-Gaussian here).
    tol = 5 * math.sqrt(2 / dim)
    assert np.var(total - removed) == pytest.approx(V, rel=tol)
    assert np.var(total) == pytest.approx(survivors * V / t, rel=tol)
    assert abs(float(np.mean(total - removed))) < 5 * math.sqrt(V / dim)


def test_components_are_independent_of_each_other_and_of_other_seeds() -> None:
    schedule = NoiseSchedule(total_variance=V, threshold=2, clients=5)
    a, b = os.urandom(SEED_BYTES), os.urandom(SEED_BYTES)
    x2 = component_noise(a, 2, schedule, 20_000).astype(np.float64)
    x3 = component_noise(a, 3, schedule, 20_000).astype(np.float64)
    y2 = component_noise(b, 2, schedule, 20_000).astype(np.float64)
    np.testing.assert_array_equal(x2, component_noise(a, 2, schedule, 20_000))  # deterministic
    for u, w in ((x2, x3), (x2, y2)):
        assert abs(np.corrcoef(u, w)[0, 1]) < 0.05
    assert np.var(x2) == pytest.approx(schedule.component_variance(2), rel=0.1)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ConfigError, match="1 <= t <= K"):
        NoiseSchedule(total_variance=V, threshold=4, clients=3)
    with pytest.raises(ConfigError, match="total_variance"):
        NoiseSchedule(total_variance=-1.0, threshold=2, clients=3)
    with pytest.raises(ConfigError, match="clients"):
        NoiseSchedule(total_variance=V, threshold=2, clients=3.0)  # type: ignore[arg-type]
    schedule = NoiseSchedule(total_variance=V, threshold=3, clients=5)
    top = os.urandom(SEED_BYTES)
    for s in (2, 6, True):
        with pytest.raises(ProtocolError, match="survivors"):
            revealed_seed(top, schedule, s)
    with pytest.raises(ProtocolError, match="nothing to reveal"):
        seeds_from_revealed(top, schedule, 3)
    with pytest.raises(ProtocolError, match="32 bytes"):
        seeds_from_revealed(top[:-1], schedule, 4)
    with pytest.raises(ProtocolError, match="32 bytes"):
        chain_seeds(b"", schedule)
    with pytest.raises(ConfigError, match="component 4"):
        schedule.component_variance(4)  # rungs 3 and W (5): seed_4 is the root, no component
    with pytest.raises(ProtocolError, match="revealed"):
        aggregate_variance(schedule, 4, 5)


def test_manifest_noise_sharing_is_checked_and_defaults_by_mode() -> None:
    from fedsynth.protocol.manifest import PrivacySpec, default_noise_sharing

    terms = dict(
        epsilon=4.0,
        delta=1e-5,
        threshold=2,
        total_variance=V,
        noise_multiplier=1.0,
        l2_sensitivity=1.0,
        l1_sensitivity=1.0,
        accountant="test",
    )
    assert PrivacySpec(mode="distributed", **terms).noise_sharing == "plain"  # old manifests
    assert PrivacySpec(mode="distributed", noise_sharing="exact", **terms).noise_sharing == "exact"
    with pytest.raises(ConfigError, match="noise_sharing='some'"):
        PrivacySpec(mode="distributed", noise_sharing="some", **terms)
    for mode in ("local", "central"):
        with pytest.raises(ConfigError, match="distributed mode only"):
            PrivacySpec(mode=mode, noise_sharing="exact", **terms)
    assert default_noise_sharing("distributed", V) == "exact"
    assert default_noise_sharing("distributed", 0.0) == "plain"  # epsilon = inf: no noise
    assert default_noise_sharing("local", V) == default_noise_sharing("central", V) == "plain"


# ---------------------------------------------------------------------------------------------
# The derivation is a wire format: holder and coordinator of different versions must agree
# ---------------------------------------------------------------------------------------------


def test_chain_and_component_derivation_match_their_specification() -> None:
    """seed_k = SHA-256(chain domain ‖ k as 4 big-endian bytes ‖ seed_{k+1}); component k draws
    from PCG64 seeded with SHA-256(component domain ‖ k (4 bytes, big-endian) ‖ seed_k) read as
    a big-endian integer. Stated here independently of the module's helpers."""
    import hashlib

    from fedsynth.protocol.mechanisms import skellam_noise

    schedule = NoiseSchedule(total_variance=90.0, threshold=2, clients=5)
    top = bytes(range(32))
    expected = {4: top}
    for k in (3, 2):
        expected[k] = hashlib.sha256(
            b"fedsynth/exact-noise/chain/v1" + k.to_bytes(4, "big") + expected[k + 1]
        ).digest()
    assert chain_seeds(top, schedule) == expected
    for k, seed in expected.items():
        digest = hashlib.sha256(
            b"fedsynth/exact-noise/component/v1" + k.to_bytes(4, "big") + seed
        ).digest()
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest, "big")))
        want = skellam_noise((64,), variance=schedule.component_variance(k), rng=rng)
        assert np.array_equal(component_noise(seed, k, schedule, 64), want)
    # With the whole-round component (t = 3 of K = 5): rung 3's seed hashes down from the root
    # seed_4 = top, and W's seed is SHA-256(chain domain ‖ K (4 bytes) ‖ top).
    with_whole = NoiseSchedule(total_variance=90.0, threshold=3, clients=5)
    chain = b"fedsynth/exact-noise/chain/v1"
    assert chain_seeds(top, with_whole) == {
        3: hashlib.sha256(chain + (3).to_bytes(4, "big") + top).digest(),
        5: hashlib.sha256(chain + (5).to_bytes(4, "big") + top).digest(),
    }
    assert with_whole.component_variance(5) == pytest.approx(90.0 / 3 - 90.0 / 5)


def test_refusals_name_what_was_wrong() -> None:
    schedule = NoiseSchedule(total_variance=6.0, threshold=2, clients=4)
    with pytest.raises(ProtocolError, match=r"^chain seed: must be 32 bytes"):
        chain_seeds(b"short", schedule)
    with pytest.raises(ProtocolError, match=r"^revealed seed: must be 32 bytes"):
        seeds_from_revealed(b"short", schedule, 3)
    with pytest.raises(ProtocolError, match=r"^seed: must be 32 bytes"):
        component_noise(b"short", 2, schedule, 4)
    with pytest.raises(ConfigError, match=r"^component 3: must be one of 2, 4$"):
        schedule.component_variance(3)
    with pytest.raises(ConfigError, match=r"^threshold=2\.0: must be an integer"):
        NoiseSchedule(total_variance=6.0, threshold=2.0, clients=4)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^clients='4': must be an integer"):
        NoiseSchedule(total_variance=6.0, threshold=2, clients="4")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match=r"survivors=True: must be an integer"):
        schedule.check_survivors(True)
    with pytest.raises(ProtocolError, match=r"revealed=True: must be an integer in 0\.\.3"):
        aggregate_variance(schedule, 3, True)


def test_edge_schedules_are_accepted() -> None:
    """No noise (v = 0, epsilon = inf), a variance below 1, and t = 1 are valid schedules."""
    for v in (0, 0.5):
        assert NoiseSchedule(total_variance=v, threshold=2, clients=3).share_variance == v / 2
    single = NoiseSchedule(total_variance=4.0, threshold=1, clients=3)
    assert list(single.components) == [1, 2] and single.kept_variance(1) == 4.0


@pytest.mark.parametrize(("k", "t", "c"), [(5, 4, 1), (10, 7, 2), (20, 13, 4)])
def test_with_colluders_any_honest_survivors_alone_keep_the_target(k: int, t: int, c: int) -> None:
    """c holders may side with the coordinator and add nothing: every survivor count s keeps
    v/(s − c) per survivor, so the s − c honest ones alone carry v; shares are v/(t − c)."""
    schedule = NoiseSchedule(total_variance=V, threshold=t, clients=k, colluders=c)
    assert schedule.share_variance == pytest.approx(V / (t - c))
    honest = k - c
    assert schedule.base_variance == pytest.approx(V / honest + V / (honest - 1) - V / (t - c))
    assert list(schedule.components) == [*range(t - c, honest - 1), honest]
    for s in range(t, k + 1):
        assert (s - c) * schedule.kept_variance(s) == pytest.approx(V, rel=1e-12)
        want = [honest] if s == k else list(range(t - c, s - c))
        assert list(schedule.removed(s)) == want


@pytest.mark.parametrize(("k", "t", "c", "survivors"), [(10, 7, 2, 10), (10, 7, 2, 7)])
def test_colluders_that_add_no_noise_leave_the_target_in_the_sum(
    k: int, t: int, c: int, survivors: int
) -> None:
    """Empirically: s survivors of which c colluders add (and reveal) nothing; the honest ones'
    noise less what they reveal has variance v. The negative control is the schedule that
    ignores the colluders: it leaves (s − c)/s of v (0.8 v at s = 10), well outside the
    sampling error."""
    dim = 40_000
    rng = np.random.default_rng([k, t, c, survivors])
    tol = 5 * math.sqrt(2 / dim)
    for colluders, expected in ((c, V), (0, V * (survivors - c) / survivors)):
        schedule = NoiseSchedule(total_variance=V, threshold=t, clients=k, colluders=colluders)
        left = np.zeros(dim, dtype=np.int64)
        for _ in range(survivors - c):  # only honest holders add noise
            top = rng.bytes(SEED_BYTES)
            left += holder_noise(schedule, dim, rng=rng, top=top)
            revealed = revealed_seed(top, schedule, survivors)
            if revealed is not None:
                left -= removable_noise(revealed, schedule, survivors, dim)
        assert np.var(left) == pytest.approx(expected, rel=tol)
    assert (survivors - c) / survivors < 1 - 2 * tol  # the two cases are told apart


def test_colluders_must_leave_an_honest_threshold() -> None:
    with pytest.raises(ConfigError, match="colluders=3: must be an int with 0 <= c < t=3"):
        NoiseSchedule(total_variance=V, threshold=3, clients=5, colluders=3)
    with pytest.raises(ConfigError, match="colluders"):
        NoiseSchedule(total_variance=V, threshold=3, clients=5, colluders=-1)
    # Only whole numbers: a boolean or a fraction would size the ladder for a count of nobody.
    for bad in (True, 1.5):
        with pytest.raises(ConfigError, match=rf"^colluders={bad!r}: must be an int"):
            NoiseSchedule(total_variance=V, threshold=3, clients=5, colluders=bad)  # type: ignore[arg-type]


def test_a_survivors_own_excess_sum_is_what_its_revealed_seed_gives() -> None:
    k, t, dim = 7, 4, 300
    schedule = NoiseSchedule(total_variance=V, threshold=t, clients=k)
    top = os.urandom(SEED_BYTES)
    for s in range(t + 1, k + 1):
        revealed = revealed_seed(top, schedule, s)
        assert revealed is not None
        np.testing.assert_array_equal(
            excess_noise(top, schedule, s, dim), removable_noise(revealed, schedule, s, dim)
        )
    assert excess_noise(top, schedule, t, dim) is None
    with pytest.raises(ProtocolError, match="survivors=8"):
        excess_noise(top, schedule, k + 1, dim)


def test_removal_mode_asks_for_uploads_only_where_redrawing_is_costly() -> None:
    schedule = NoiseSchedule(total_variance=V, threshold=51, clients=100)
    assert removal_mode("seed", schedule, 100, 65_537) == "seed"
    assert removal_mode("upload", schedule, 52, 8) == "upload"
    # auto: s survivors x their removed components x d draws against the limit: at K = 100
    # W alone when all survive, else the blocks of the units removed (all 48 at s = 99: six;
    # at s = 60, 14 = 2 + 4 + 8: three).
    for s, components in ((100, 1), (99, 6), (60, 3)):
        assert len(schedule.removed(s)) == components
        just_below = AUTO_UPLOAD_SAMPLES // (s * components)
        assert removal_mode("auto", schedule, s, just_below) == "seed"
        assert removal_mode("auto", schedule, s, just_below + 1) == "upload"
    # K = 100, d = 65,537: seeds whatever the dropouts (at most 6 components per survivor).
    for s in range(51, 101):
        assert removal_mode("auto", schedule, s, 65_537) == "seed"
    assert removal_mode("auto", schedule, 99, 2**20) == "upload"  # d of a million: uploads
    ladder = NoiseSchedule(total_variance=V, threshold=14, clients=26)
    assert removal_mode("auto", ladder, 25, AUTO_UPLOAD_SAMPLES // (25 * 11) + 1) == "upload"
    assert removal_mode("auto", schedule, 51, 10**9) == "seed"  # s = t: nothing to redraw
    with pytest.raises(ConfigError, match="noise removal 'both': must be one of seed, upload"):
        removal_mode("both", schedule, 100, 8)


# ---------------------------------------------------------------------------------------------
# Binary blocks (K beyond 26): at most 6 components removed, the target within 1/TOLERANCE
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "t", "c"), [(27, 14, 0), (50, 26, 0), (100, 51, 0), (100, 60, 5)])
def test_blocks_keep_the_target_within_the_tolerance_and_exactly_at_both_ends(
    k: int, t: int, c: int
) -> None:
    """Binary blocks remove the excess of K − c − 1 or fewer honest survivors (at most six
    components, kept noise within 1/TOLERANCE above the target), W alone that of all K."""
    schedule = NoiseSchedule(total_variance=V, threshold=t, clients=k, colluders=c)
    honest, floor = k - c, t - c
    assert schedule.uses_blocks and schedule.whole == honest
    sizes = schedule.block_units
    top = honest - 1  # the blocks serve up to K − c − 1; W all K
    assert sum(sizes) == schedule.units >= TOLERANCE * (top - floor) / floor
    assert len(sizes) == schedule.units.bit_length() <= 6
    assert list(schedule.components) == [*range(len(sizes)), honest]
    assert schedule.base_variance == pytest.approx(V / honest + V / top - V / floor)
    assert schedule.base_variance > 0
    assert schedule.base_variance + sum(
        schedule.component_variance(j) for j in schedule.components
    ) == pytest.approx(schedule.share_variance, rel=1e-12)
    assert schedule.share_variance == pytest.approx(V / floor)
    for s in range(t, k):
        removed = schedule.removed(s)
        assert len(removed) <= 6 and list(removed) == sorted(set(removed))
        assert honest not in removed  # W only when all K survive
        assert sum(sizes[j] for j in removed) == schedule.units_removed(s)
        kept = (s - c) * schedule.kept_variance(s) / V  # the honest survivors' noise / target
        assert 1 - 1e-12 <= kept <= 1 + 1 / TOLERANCE
        # one unit more removed would leave less than the target: the most that may go
        assert (s - c) * (schedule.kept_variance(s) - schedule.unit_variance) < V * (1 - 1e-12)
    assert schedule.units_removed(t) == 0 and list(schedule.removed(t)) == []
    assert schedule.units_removed(k - 1) == schedule.units  # all blocks, exactly v/(K − c − 1)
    assert (k - 1 - c) * schedule.kept_variance(k - 1) == pytest.approx(V, rel=1e-12)
    assert list(schedule.removed(k)) == [honest] and schedule.units_removed(k) == 0
    assert (k - c) * schedule.kept_variance(k) == pytest.approx(V, rel=1e-12)


def test_every_number_of_units_is_some_blocks_and_nothing_else_is() -> None:
    schedule = NoiseSchedule(total_variance=V, threshold=51, clients=100)
    sizes = schedule.block_units
    assert sizes == (1, 2, 4, 8, 16, 17)
    for units in range(schedule.units + 1):
        blocks = schedule._blocks_for(units)
        assert sum(sizes[j] for j in blocks) == units
    with pytest.raises(ProtocolError, match="cannot be removed"):
        schedule._blocks_for(schedule.units + 1)


def test_block_seeds_regenerate_exactly_the_removed_blocks_and_no_other() -> None:
    k, t, dim = 40, 21, 400
    schedule = NoiseSchedule(total_variance=V, threshold=t, clients=k)
    assert schedule.uses_blocks
    top = os.urandom(SEED_BYTES)
    seeds = chain_seeds(top, schedule)
    assert sorted(seeds) == list(schedule.components) and top not in seeds.values()
    assert len(set(seeds.values())) == len(seeds)
    noise = holder_noise(schedule, dim, rng=np.random.default_rng(3), top=top)
    for s in range(t + 1, k + 1):
        removed = schedule.removed(s)
        revealed = revealed_seed(top, schedule, s)
        assert revealed == b"".join(seeds[j] for j in removed)
        assert len(revealed) == schedule.revealed_length(s) == SEED_BYTES * len(removed)
        # Exactly the removed blocks' seeds: a kept block's seed is nowhere in the reveal.
        assert seeds_from_revealed(revealed, schedule, s) == {j: seeds[j] for j in removed}
        for j in set(schedule.components) - set(removed):
            assert seeds[j] not in revealed
        expected = sum(component_noise(seeds[j], j, schedule, dim) for j in removed)
        np.testing.assert_array_equal(removable_noise(revealed, schedule, s, dim), expected)
        np.testing.assert_array_equal(excess_noise(top, schedule, s, dim), expected)
        kept = [j for j in schedule.components if j not in removed]
        base = noise - sum(component_noise(seeds[j], j, schedule, dim) for j in seeds)
        np.testing.assert_array_equal(
            noise - expected,
            base + sum((component_noise(seeds[j], j, schedule, dim) for j in kept), 0),
        )
        for bad in (revealed[:-1], revealed + bytes(SEED_BYTES), b""):
            with pytest.raises(ProtocolError, match="revealed seeds: must be"):
                seeds_from_revealed(bad, schedule, s)
    assert revealed_seed(top, schedule, t) is None


@pytest.mark.parametrize(("k", "survivors"), [(50, 26), (50, 38), (50, 50), (100, 99)])
def test_round_noise_after_block_removal_has_the_kept_variance(k: int, survivors: int) -> None:
    """Empirically, with blocks: the sum less the revealed blocks has the schedule's kept
    variance (within 1/TOLERANCE above v), and without removal s/t times v."""
    t = _majority(k)
    dim = 40_000
    schedule = NoiseSchedule(total_variance=V, threshold=t, clients=k)
    rng = np.random.default_rng([k, survivors, 1])
    total, removed = _round_noise(schedule, survivors, dim, rng)
    tol = 5 * math.sqrt(2 / dim)
    kept = aggregate_variance(schedule, survivors, survivors)
    assert V <= kept <= V * (1 + 1 / TOLERANCE)
    assert np.var(total - removed) == pytest.approx(kept, rel=tol)
    assert np.var(total) == pytest.approx(survivors * V / t, rel=tol)
