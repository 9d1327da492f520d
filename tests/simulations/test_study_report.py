"""The report's evidence checks on hand-made results rows."""

from __future__ import annotations

import math
from typing import Any

import pytest

from fedsynth.simulations.study_report import (
    _skewed_epsilons,
    aggregate,
    attack_check,
    compare_paired,
    compare_seeds,
    federated_vs_pooled,
    headline,
    method_comparisons,
)


def _row(method: str, mode: str, eps: str, seed: int, tstr: float, mia: float) -> dict[str, str]:
    return {
        "key": f"{method}|{mode}|{eps}|{seed}",
        "method": method,
        "mode": mode,
        "epsilon": eps,
        "clients": "3" if method == "vector" else "1",
        "partition": "iid" if method == "vector" else "pooled",
        "dropout": "0",
        "seed": str(seed),
        "status": "ok",
        "tstr_accuracy": str(tstr),
        "mia_auc": str(mia),
    }


def test_federated_vs_pooled_states_what_the_seeds_can_tell() -> None:
    rows = [
        _row("vector", "central", "4", 0, 0.60, 0.5),
        _row("vector", "central", "4", 1, 0.64, 0.5),
        _row("vector-pooled", "central", "4", 0, 0.61, 0.5),
        _row("vector-pooled", "central", "4", 1, 0.65, 0.5),
        _row("vector", "distributed", "4", 0, 0.10, 0.5),  # other trust mode: not compared
        _row("vector", "central", "1", 0, 0.90, 0.5),
        _row("vector", "central", "1", 1, 0.91, 0.5),
        _row("vector-pooled", "central", "1", 0, 0.50, 0.5),
        _row("vector-pooled", "central", "1", 1, 0.51, 0.5),
    ]
    out = {c["epsilon"]: c for c in federated_vs_pooled(rows)}
    # 0.01 apart, but two seeds with this spread could only detect a much larger difference:
    # not a pass.
    assert out[4.0]["verdict"] == "inconclusive"
    assert math.isclose(out[4.0]["difference"], -0.01, abs_tol=1e-9)
    assert out[4.0]["detectable"] > 0.1
    assert out[1.0]["verdict"] == "higher"  # 0.4 apart with tiny seed spread
    # Paired by seed: both seeds exactly 0.01 apart, so the interval is that point.
    assert out[4.0]["paired"]["seeds"] == 2
    assert out[4.0]["paired"]["differences"] == pytest.approx([-0.01, -0.01])
    assert out[4.0]["paired"]["verdict"] == "lower"
    # A single seed cannot say anything about seed noise.
    single = federated_vs_pooled([rows[0], rows[2]])
    assert single[0]["verdict"] == "not testable" and math.isnan(single[0]["standard_error"])


def test_compare_seeds_is_welchs_test_with_its_power() -> None:
    from scipy import stats

    a, b = [0.61, 0.64, 0.60, 0.66], [0.55, 0.58, 0.57]
    c = compare_seeds(a, b)
    welch = stats.ttest_ind(a, b, equal_var=False)
    assert (welch.pvalue < 0.05) == (c["verdict"] == "higher")
    assert math.isclose(c["difference"] / c["standard_error"], welch.statistic, rel_tol=1e-9)
    assert compare_seeds(b, a)["verdict"] == "lower"
    # Equal only when the confidence interval sits inside the tolerance.
    tight_a = [0.600, 0.601, 0.599, 0.600, 0.600]
    tight_b = [0.601, 0.600, 0.600, 0.599, 0.601]
    assert compare_seeds(tight_a, tight_b)["verdict"] == "equal"
    assert compare_seeds(tight_a, tight_b, tolerance=0.0001)["verdict"] == "inconclusive"
    # The detectable difference shrinks with more seeds and grows with the spread.
    few = compare_seeds([0.5, 0.6, 0.55], [0.5, 0.6, 0.55])
    many = compare_seeds([0.5, 0.6, 0.55] * 4, [0.5, 0.6, 0.55] * 4)
    assert few["verdict"] == many["verdict"] == "inconclusive"
    assert many["detectable"] < few["detectable"] / 2
    assert compare_seeds([0.5, float("nan")], [0.4, 0.5])["verdict"] == "not testable"


def _cell(method: str, mode: str, eps: str, partition: str, seed: int, tstr: float) -> dict:
    row = _row(method, mode, eps, seed, tstr, 0.5)
    row.update(partition=partition, clients="10" if partition != "pooled" else "1")
    return row


def test_the_federated_vector_is_compared_with_each_method_and_answered_in_words() -> None:
    rows = []
    for seed in range(3):
        jitter = 0.002 * seed
        for eps in ("1", "4"):
            for part in ("iid", "label-skew:0.5"):
                rows.append(_cell("vector", "distributed", eps, part, seed, 0.60 + jitter))
                rows.append(_cell("pe", "distributed", eps, part, seed, 0.52 + 3 * jitter))
                rows.append(_cell("dp-fedavg", "local", eps, part, seed, 0.45 + seed * 0.08))
            rows.append(_cell("vector-pooled", "central", eps, "pooled", seed, 0.6 + jitter))
        rows.append(_cell("prior", "none", "0", "pooled", seed, 0.50 + jitter))
    rows.append(_cell("vector", "distributed", "1", "label-skew:0.5", 9, 0.0) | {"dropout": "0.2"})
    found = method_comparisons(rows)
    at = {(c["epsilon"], c["partition"], c["method"]): c for c in found}
    assert len(found) == 4 * 4  # (ε, partition) x {pe, dp-fedavg, vector-pooled, prior}
    skew = "label-skew:0.5"
    assert at[(1.0, skew, "pe")]["verdict"] == "higher"
    assert at[(1.0, skew, "prior")]["verdict"] == "higher"  # the prior has no ε: any matches
    assert at[(1.0, skew, "dp-fedavg")]["verdict"] == "inconclusive"  # wide spread
    assert at[(1.0, skew, "vector-pooled")]["seeds"] == (3, 3)  # the dropout cell left out
    words = "\n".join(headline(found))
    assert "At ε = 1, label-skew:0.5" in words
    assert "Does it beat pe? **yes**" in words
    assert "Does it beat dp-fedavg? **not shown** (inconclusive" in words
    assert (
        "central EPSVec on the pooled data? **yes** (paired by seed: difference +0.000, "
        "95% CI [+0.000, +0.000] over 3 seeds)" in words
    )
    assert at[(1.0, skew, "dp-fedavg")]["paired"]["seeds"] == 3
    at_four = "\n".join(headline(found, epsilon=4.0))
    assert at_four.startswith("At ε = 4, label-skew:0.5") and "Does it beat pe? **yes**" in at_four
    assert _skewed_epsilons(found) == [1.0, 4.0]


def test_paired_comparison_uses_the_common_seeds_and_states_its_interval() -> None:
    a = {0: 0.524, 1: 0.559, 2: 0.521, 3: 0.9}
    b = {0: 0.535, 1: 0.559, 2: 0.521, 4: 0.1}
    c = compare_paired(a, b)
    assert c["seeds"] == 3 and c["differences"] == pytest.approx([-0.011, 0.0, 0.0])
    # mean -0.00367, sd 0.00635: t(0.975, 2) = 4.303 gives the half-width 0.0158
    assert c["difference"] == pytest.approx(-0.011 / 3)
    assert c["low"] == pytest.approx(-0.011 / 3 - 0.015776, abs=1e-5)
    assert c["high"] == pytest.approx(-0.011 / 3 + 0.015776, abs=1e-5)
    assert c["verdict"] == "inconclusive"
    assert compare_paired(a, b, tolerance=0.02)["verdict"] == "equal"
    shifted = {s: v + 0.05 for s, v in b.items()}
    assert compare_paired(shifted, b)["verdict"] == "higher"  # every seed +0.05: sd 0
    assert compare_paired(b, shifted)["verdict"] == "lower"
    # A seed effect that Welch cannot see through is removed by pairing.
    split = {0: 0.50, 1: 0.60, 2: 0.70}
    better = {s: v + 0.02 + 0.001 * s for s, v in split.items()}
    assert compare_seeds(list(better.values()), list(split.values()))["verdict"] == "inconclusive"
    assert compare_paired(better, split)["verdict"] == "higher"
    assert compare_paired({0: 0.5, 1: math.nan}, {0: 0.4, 1: 0.3})["verdict"] == "not testable"


def test_attack_check_separates_dp_cells_and_control() -> None:
    rows = [
        _row("vector", "central", "4", 0, 0.6, 0.52),
        _row("vector-pooled", "central", "1", 0, 0.6, 0.47),
        _row("vector", "central", "16", 0, 0.6, 0.70),  # ε > 4: not checked
        _row("vector-nonprivate", "none", "inf", 0, 0.6, 0.60),  # not DP: not checked
        _row("icl-verbatim", "none", "inf", 0, 0.6, 0.91),
    ]
    check = attack_check(rows)
    assert check["dp_within"] is True
    assert [k for k, _ in check["dp_aucs"]] == [rows[0]["key"], rows[1]["key"]]
    assert check["control_min"] == 0.91
    rows.append(_row("pe", "distributed", "2", 0, 0.6, 0.58))
    assert attack_check(rows)["dp_within"] is False


def test_aggregate_mean_and_sd_over_seeds() -> None:
    rows = [
        _row("vector", "central", "4", 0, 0.60, 0.5),
        _row("vector", "central", "4", 1, 0.64, 0.5),
    ]
    (group,) = aggregate(rows)
    assert group["seeds"] == 2
    assert math.isclose(group["tstr_accuracy"], 0.62)
    assert math.isclose(group["tstr_accuracy_sd"], math.sqrt(0.0008))


def test_utility_vs_epsilon_has_a_panel_per_partition(tmp_path: Any) -> None:
    from fedsynth.simulations.study_report import _panel_lines, write_plots

    rows = [_cell("prior", "none", "0", "pooled", s, 0.50) for s in range(2)]
    for partition, base in (("iid", 0.60), ("label-skew:0.5", 0.70)):
        for eps, gain in (("1", 0.0), ("4", 0.05)):
            rows += [
                _cell("vector", "distributed", eps, partition, s, base + gain) for s in range(2)
            ]
    groups = aggregate(rows)
    fixed = {"clients": "10", "dropout": "0"}
    for partition, base in (("iid", 0.60), ("label-skew:0.5", 0.70)):
        lines, flat = _panel_lines(
            groups, axis="epsilon", column="tstr_accuracy", fixed={**fixed, "partition": partition}
        )
        points = sorted(lines["vector (distributed)"])
        assert [(x, round(y, 6)) for x, y, _ in points] == [(1.0, base), (4.0, base + 0.05)]
        assert flat == {"prior": pytest.approx(0.50)}
    assert "utility_vs_epsilon.png" in write_plots(groups, tmp_path, "tstr_accuracy")
    assert (tmp_path / "utility_vs_epsilon.png").read_bytes()[:4] == b"\x89PNG"
