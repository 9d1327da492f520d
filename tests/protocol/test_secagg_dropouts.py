"""Every dropout pattern at every stage of the secure sum.

For K = 3..6 (threshold t at the safe floor and at K) every assignment of at most K - t
dropouts to the five stages is enumerated with itertools; larger K are sampled with hypothesis,
derandomized so CI runs the same cases every time. Each round must give exactly the survivors'
sum; one dropout more than K - t must abort it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from secagg_harness import make_round

from fedsynth.protocol.errors import TooFewParticipantsError
from fedsynth.protocol.secagg import Stage, min_safe_threshold

STAGES = ("setup", "share", "masked", "consistency", "unmask")
Plan = dict[str, list[int]]


def _plans(k: int, t: int, drops: int) -> Iterator[Plan]:
    """Every way to pick ``drops`` of the K nodes (ids 100..) and a stage for each."""
    ids = list(range(100, 100 + k))
    for nodes in itertools.combinations(ids, drops):
        for stages in itertools.product(STAGES, repeat=drops):
            plan: Plan = {stage: [] for stage in STAGES}
            for node, stage in zip(nodes, stages, strict=True):
                plan[stage].append(node)
            yield plan


def _cases() -> Iterator[tuple[int, int]]:
    for k in range(3, 7):
        for t in sorted({min_safe_threshold(k), k}):
            yield k, t


def _run(k: int, t: int, plan: Plan, seed: int) -> None:
    rnd = make_round(k, t, bits=64, dim=3, seed=seed)
    result = rnd.run(
        absent_setup=plan["setup"],
        absent_share=plan["share"],
        absent_masked=plan["masked"],
        absent_consistency=plan["consistency"],
        absent_unmask=plan["unmask"],
    )
    gone_early = set(plan["setup"]) | set(plan["share"]) | set(plan["masked"])
    assert rnd.survivors == sorted(set(rnd.config.node_ids) - gone_early)
    assert rnd.dropped == sorted(plan["masked"])
    assert rnd.server.signers == sorted(set(rnd.survivors) - set(plan["consistency"]))
    np.testing.assert_array_equal(result, rnd.expected())
    assert rnd.server.stage == Stage.DONE


@pytest.mark.parametrize(("k", "t"), list(_cases()))
def test_every_dropout_pattern_up_to_k_minus_t(k: int, t: int) -> None:
    count = 0
    for drops in range(k - t + 1):
        for plan in _plans(k, t, drops):
            _run(k, t, plan, seed=count)
            count += 1
    expected = sum(
        len(list(itertools.combinations(range(k), d))) * len(STAGES) ** d for d in range(k - t + 1)
    )
    assert count == expected


@pytest.mark.parametrize(("k", "t"), list(_cases()))
@pytest.mark.parametrize("stage", STAGES)
def test_one_dropout_too_many_aborts_at_that_stage(k: int, t: int, stage: str) -> None:
    for nodes in itertools.combinations(range(100, 100 + k), k - t + 1):
        rnd = make_round(k, t, bits=32, dim=2)
        steps = {
            "setup": rnd.setup,
            "share": rnd.share_keys,
            "masked": rnd.masked_input,
            "consistency": rnd.consistency,
        }
        revealed = False
        with pytest.raises(TooFewParticipantsError):
            for name in STAGES[:-1]:
                steps[name](nodes if name == stage else ())
            responses = rnd.responses(nodes if stage == "unmask" else ())
            revealed = True
            rnd.server.unmask(responses)
        # Shares leave the holders only when the failing stage is the last one.
        assert revealed == (stage == "unmask")
        assert rnd.server.stage != Stage.DONE


@st.composite
def _large_plans(draw: st.DrawFn) -> tuple[int, int, Plan]:
    k = draw(st.integers(7, 14))
    t = draw(st.integers(min_safe_threshold(k), k))
    ids = list(range(100, 100 + k))
    dropped = draw(st.lists(st.sampled_from(ids), unique=True, max_size=k - t))
    plan: Plan = {stage: [] for stage in STAGES}
    for node in dropped:
        plan[draw(st.sampled_from(STAGES))].append(node)
    return k, t, plan


@settings(
    max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(case=_large_plans())
def test_dropouts_for_larger_k(case: tuple[int, int, Plan]) -> None:
    k, t, plan = case
    _run(k, t, plan, seed=k * 100 + t)
