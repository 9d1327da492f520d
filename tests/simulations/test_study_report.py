"""The report's evidence checks on hand-made results rows."""

from __future__ import annotations

import math

from fedsynth.simulations.study_report import aggregate, attack_check, federated_vs_pooled


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


def test_federated_vs_pooled_within_and_outside_seed_noise() -> None:
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
    assert out[4.0]["within"] is True
    assert math.isclose(out[4.0]["difference"], -0.01, abs_tol=1e-9)
    assert out[1.0]["within"] is False  # 0.4 apart with tiny seed spread
    # A single seed cannot say anything about seed noise.
    single = federated_vs_pooled([rows[0], rows[2]])
    assert single[0]["within"] is False and math.isnan(single[0]["standard_error"])


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
