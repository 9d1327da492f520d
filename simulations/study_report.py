"""The study's report: tables of results.csv (mean ± sd over seeds) in report.md, and plots.

Plots (only when the study varies the axis): utility vs ε per method, utility vs K, utility vs
dropout rate, membership-inference AUC vs ε.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedsynth.simulations.study_config import METHODS, METRIC_COLUMNS, METRICS

if TYPE_CHECKING:
    from fedsynth.simulations.study import StudyRunner

GROUP = ("method", "mode", "epsilon", "clients", "partition", "dropout")
TABLE_METRICS = (
    ("tstr_accuracy", "TSTR acc"),
    ("tstr_macro_f1", "TSTR F1"),
    ("label_fidelity", "fidelity"),
    ("embedding_fd", "FD"),
    ("mauve", "MAUVE"),
    ("self_bleu", "Self-BLEU"),
    ("distinct_2", "distinct-2"),
    ("next_word_accuracy", "next-word"),
    ("mia_auc", "MIA AUC"),
    ("canary_exposure", "canary exp."),
    ("noise_multiplier", "σ/Δ"),
    ("client_seconds", "client s"),
    ("bytes_per_client", "bytes/client"),
    ("coordinator_seconds", "coord. s"),
    ("generation_tokens_per_s", "tok/s"),
)


AGGREGATED = tuple(
    dict.fromkeys(
        [c for c, _ in TABLE_METRICS] + [c for cols in METRIC_COLUMNS.values() for c in cols]
    )
)


def _float(text: str) -> float:
    if text == "":
        return math.nan
    return float(text)


def aggregate(rows: Sequence[Mapping[str, str]]) -> list[dict[str, Any]]:
    """Mean and sd over seeds for each (method, mode, ε, K, partition, dropout) group."""
    groups: dict[tuple[str, ...], list[Mapping[str, str]]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[c] for c in GROUP)].append(row)
    out = []
    for key, members in groups.items():
        entry: dict[str, Any] = dict(zip(GROUP, key, strict=True))
        entry["seeds"] = len(members)
        entry["status"] = ", ".join(sorted({m["status"].split(":")[0] for m in members}))
        for column in AGGREGATED:
            values = np.array([_float(m.get(column, "")) for m in members])
            values = values[~np.isnan(values)]
            entry[column] = float(values.mean()) if len(values) else math.nan
            entry[column + "_sd"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        out.append(entry)
    order = list(METHODS)
    out.sort(
        key=lambda e: (
            order.index(e["method"]) if e["method"] in order else 99,
            e["mode"],
            float(e["epsilon"]),
            int(e["clients"]),
            e["partition"],
            float(e["dropout"]),
        )
    )
    return out


def _fmt(mean: float, sd: float, column: str) -> str:
    if math.isnan(mean):
        return "–"
    digits = 0 if column in ("bytes_per_client", "generation_tokens_per_s") else 3
    if column.endswith("seconds"):
        digits = 1
    text = f"{mean:.{digits}f}"
    if not math.isnan(sd):
        text += f" ± {sd:.{digits}f}"
    return text


def results_table(groups: Sequence[Mapping[str, Any]]) -> str:
    """The aggregated results as a Markdown table (columns without any value are left out)."""
    present = [(c, h) for c, h in TABLE_METRICS if any(not math.isnan(g[c]) for g in groups)]
    head = ["method", "mode", "ε", "K", "partition", "dropout", "seeds"] + [h for _, h in present]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = [g[c] for c in GROUP] + [str(g["seeds"])]
        if g["status"] != "ok":
            cells[0] += f" ({g['status']})"
        cells += [_fmt(g[c], g[c + "_sd"], c) for c, _ in present]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def holder_table(tables: Mapping[str, Sequence[Mapping[str, int]]]) -> str:
    """Per-holder size and label histogram for each partition the study ran."""
    parts = []
    for name, holders in sorted(tables.items()):
        labels = [k for k in holders[0] if k != "size"]
        head = ["holder", "records", *labels]
        lines = [f"**{name}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, h in enumerate(holders):
            lines.append(
                "| " + " | ".join([str(i), *(str(h[c]) for c in ["size", *labels])]) + " |"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _most_common(groups: Sequence[Mapping[str, Any]], column: str) -> str:
    return str(Counter(g[column] for g in groups).most_common(1)[0][0])


def _slice_along(federated: Sequence[Mapping[str, Any]], axis: str) -> dict[str, str]:
    """Values of the other axes at which the study varies ``axis`` the most.

    Picks the (ε, K, partition, dropout) slice whose cells cover the most distinct values of
    ``axis`` (ties: more cells, then no dropout and the most common values).
    """
    others = [c for c in ("epsilon", "clients", "partition", "dropout") if c != axis]
    values: dict[tuple[str, ...], set[str]] = defaultdict(set)
    sizes: Counter[tuple[str, ...]] = Counter()
    for g in federated:
        key = tuple(g[c] for c in others)
        if axis == "epsilon" and not math.isfinite(float(g[axis])):
            continue
        values[key].add(g[axis])
        sizes[key] += 1
    if not values:
        return {c: _most_common(federated, c) for c in others}
    best = max(
        values,
        key=lambda k: (
            len(values[k]),
            sizes[k],
            "dropout" in others and float(k[others.index("dropout")]) == 0.0,
        ),
    )
    return dict(zip(others, best, strict=True))


def _line_plot(
    groups: Sequence[Mapping[str, Any]],
    *,
    axis: str,
    column: str,
    path: Path,
    title: str,
    band: tuple[float, float] | None = None,
) -> bool:
    """Plot one line per federated (method, mode) over ``axis``.

    The other axes stay at their most common value; methods that do not vary along the axis
    (prior, pooled, controls) are flat lines. Along ε, each partition the study ran at that
    K and dropout gets a panel of its own (an IID and a label-skewed federation differ), the
    pooled methods repeated in each.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    federated = [g for g in groups if METHODS[g["method"]].federated]
    if not federated:
        return False
    fixed = _slice_along(federated, axis)
    panels = [fixed]
    if axis == "epsilon":
        partitions = sorted(
            {
                g["partition"]
                for g in federated
                if all(g[c] == v for c, v in fixed.items() if c != "partition")
            }
        )
        panels = [{**fixed, "partition": part} for part in partitions]
    drawn = [_panel_lines(groups, axis=axis, column=column, fixed=f) for f in panels]
    kept = [
        (f, d)
        for f, d in zip(panels, drawn, strict=True)
        if any(len(v) >= 2 for v in d[0].values())
    ]
    if not kept:
        return False
    names = sorted({name for _, (lines, flat) in kept for name in [*lines, *flat]})
    # tab20's dark shades first, then the light ones: 20 colours before one repeats.
    palette = [matplotlib.colormaps["tab20"](i) for i in [*range(0, 20, 2), *range(1, 20, 2)]]
    colour = {name: palette[i % 20] for i, name in enumerate(names)}
    marker = {name: "os^D"[i % 4] for i, name in enumerate(names)}
    fig, axes = plt.subplots(
        1, len(kept), figsize=(4.2 * len(kept) + 2.4, 4.2), sharey=True, squeeze=False
    )
    for ax, (f, (lines, flat)) in zip(axes[0], kept, strict=True):
        for name, points in sorted(lines.items()):
            points.sort()
            xs, ys, sds = (np.array(v, dtype=float) for v in zip(*points, strict=True))
            ax.errorbar(
                xs,
                ys,
                yerr=np.nan_to_num(sds),
                marker=marker[name],
                capsize=3,
                color=colour[name],
                label=name,
            )
        for name, value in sorted(flat.items()):
            ax.axhline(value, ls="--", lw=1, color=colour[name], label=name)
        if band is not None:
            ax.axhspan(*band, color="grey", alpha=0.15, label="[0.45, 0.55]")
        if axis == "epsilon":
            ax.set_xscale("log")
            ticks = sorted({x for points in lines.values() for x, _, _ in points})
            ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
            ax.minorticks_off()
            ax.set_xlabel("ε")
        else:
            ax.set_xlabel({"clients": "holders K", "dropout": "dropout rate"}[axis])
        shown = ", ".join(f"{k}={v}" for k, v in f.items())
        ax.set_title(f"federated cells at {shown}", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(column.replace("_", " "))
    handles: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="center right")
    fig.suptitle(f"{title} (mean ± sd over seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.1 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _panel_lines(
    groups: Sequence[Mapping[str, Any]], *, axis: str, column: str, fixed: Mapping[str, str]
) -> tuple[dict[str, list[tuple[float, float, float]]], dict[str, float]]:
    """The lines (name -> (x, mean, sd) points) and flat levels of one panel of a plot."""
    lines: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    flat: dict[str, float] = {}
    for g in groups:
        if math.isnan(g[column]):
            continue
        info = METHODS[g["method"]]
        if info.federated:
            if any(g[c] != v for c, v in fixed.items()):
                continue
            x = float(g[axis])
            if axis == "epsilon" and not math.isfinite(x):
                continue
            lines[f"{g['method']} ({g['mode']})"].append((x, g[column], g[column + "_sd"]))
        elif axis == "epsilon" and info.uses_epsilon:
            lines[g["method"]].append((float(g["epsilon"]), g[column], g[column + "_sd"]))
        elif not info.uses_epsilon or g["epsilon"] == fixed.get("epsilon"):
            label = g["method"] if not info.uses_epsilon else f"{g['method']} (ε={g['epsilon']})"
            flat[label] = g[column]
    return lines, flat


def write_plots(groups: Sequence[Mapping[str, Any]], out_dir: Path, utility: str) -> list[str]:
    """Write the four study plots that the data supports; return the files written.

    ``utility`` is the y axis of the utility plots.
    """
    written = []
    if any(not math.isnan(g.get(utility, math.nan)) for g in groups):
        for axis, name, title in (
            ("epsilon", "utility_vs_epsilon.png", "Utility vs ε"),
            ("clients", "utility_vs_clients.png", "Utility vs number of holders"),
            ("dropout", "utility_vs_dropout.png", "Utility vs dropout rate"),
        ):
            if _line_plot(groups, axis=axis, column=utility, path=out_dir / name, title=title):
                written.append(name)
    if any(not math.isnan(g["mia_auc"]) for g in groups) and _line_plot(
        groups,
        axis="epsilon",
        column="mia_auc",
        path=out_dir / "mia_vs_epsilon.png",
        title="Membership inference AUC vs ε",
        band=(0.45, 0.55),
    ):
        written.append("mia_vs_epsilon.png")
    return written


ALPHA = 0.05
"""Two-sided level of every comparison the report makes."""
POWER = 0.8
"""Power at which a comparison's detectable difference is stated."""
EQUIVALENCE = 0.01
"""Tolerance of an equality claim: one point on a [0, 1] metric (the study's headline question)."""


def compare_seeds(
    a: Sequence[float], b: Sequence[float], *, tolerance: float = EQUIVALENCE
) -> dict[str, Any]:
    """Welch comparison of two conditions' per-seed results, with its power stated.

    ``detectable`` is the smallest true difference the test finds with probability
    :data:`POWER` at level :data:`ALPHA` for these seed counts and spreads. The verdict is
    ``higher`` or ``lower`` (a against b, significant), ``equal`` (the 1 − α confidence interval
    of the difference lies within ± ``tolerance``), ``inconclusive`` (neither: too few seeds or
    too much spread to tell) or ``not testable`` (a side with fewer than two seeds), so a check
    without the data to fail is never reported as passed.
    """
    from scipy import stats

    x = np.array([v for v in a if not math.isnan(v)], dtype=float)
    y = np.array([v for v in b if not math.isnan(v)], dtype=float)
    out: dict[str, Any] = {
        "mean_a": float(x.mean()) if len(x) else math.nan,
        "mean_b": float(y.mean()) if len(y) else math.nan,
        "seeds": (len(x), len(y)),
        "difference": float(x.mean() - y.mean()) if len(x) and len(y) else math.nan,
        "standard_error": math.nan,
        "detectable": math.nan,
        "verdict": "not testable",
    }
    if len(x) < 2 or len(y) < 2:
        return out
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(va + vb)
    diff = out["difference"]
    if se == 0:
        out.update(standard_error=0.0, detectable=0.0)
        out["verdict"] = "equal" if diff == 0 else ("higher" if diff > 0 else "lower")
        return out
    df = (va + vb) ** 2 / (va**2 / (len(x) - 1) + vb**2 / (len(y) - 1))
    critical = float(stats.t.ppf(1 - ALPHA / 2, df))
    out["standard_error"] = se
    out["detectable"] = (critical + float(stats.t.ppf(POWER, df))) * se
    if abs(diff) > critical * se:
        out["verdict"] = "higher" if diff > 0 else "lower"
    elif abs(diff) + critical * se <= tolerance:
        out["verdict"] = "equal"
    else:
        out["verdict"] = "inconclusive"
    return out


def compare_paired(
    a: Mapping[Any, float], b: Mapping[Any, float], *, tolerance: float = EQUIVALENCE
) -> dict[str, Any]:
    """Paired comparison by seed: a − b on the seeds both have, with its t-interval.

    Keys are seeds, or any sortable key that pairs two cells (e.g. seed and partition).

    The cells of one seed share the data split (and the holders' partition), so the per-seed
    difference removes what the split moves in both; with few seeds this is the more powerful
    test. Verdicts as in :func:`compare_seeds`, from the 1 − α interval ``(low, high)`` of the
    mean difference: ``higher`` / ``lower`` if it excludes 0, ``equal`` if it lies within
    ± ``tolerance``, else ``inconclusive``; ``not testable`` under two common seeds.
    """
    from scipy import stats

    seeds = sorted(s for s in set(a) & set(b) if not (math.isnan(a[s]) or math.isnan(b[s])))
    diffs = np.array([a[s] - b[s] for s in seeds], dtype=float)
    out: dict[str, Any] = {
        "seeds": len(seeds),
        "differences": [float(d) for d in diffs],
        "difference": float(diffs.mean()) if len(diffs) else math.nan,
        "low": math.nan,
        "high": math.nan,
        "verdict": "not testable",
    }
    if len(diffs) < 2:
        return out
    half = float(stats.t.ppf(1 - ALPHA / 2, len(diffs) - 1)) * float(
        diffs.std(ddof=1) / math.sqrt(len(diffs))
    )
    low, high = out["difference"] - half, out["difference"] + half
    out.update(low=low, high=high)
    if low > 0:
        out["verdict"] = "higher"
    elif high < 0:
        out["verdict"] = "lower"
    elif -tolerance <= low and high <= tolerance:
        out["verdict"] = "equal"
    else:
        out["verdict"] = "inconclusive"
    return out


def _by_seed(rows: Sequence[Mapping[str, str]], column: str, match: Any) -> dict[int, float]:
    return {int(r["seed"]): _float(r.get(column, "")) for r in rows if match(r)}


def _column(rows: Sequence[Mapping[str, str]], column: str, match: Any) -> list[float]:
    return [_float(r.get(column, "")) for r in rows if match(r)]


def federated_vs_pooled(
    rows: Sequence[Mapping[str, str]], column: str = "tstr_accuracy"
) -> list[dict[str, Any]]:
    """Federated vector (central mode, no dropout) vs central EPSVec on the pooled data, per ε.

    Both add the same Gaussian noise to the same clipped, rounded sums, so their utility should
    agree: each ε gets :func:`compare_seeds` of the federated against the pooled cells.
    """
    out = []
    epsilons = sorted({float(r["epsilon"]) for r in rows if r["method"] == "vector-pooled"})
    for eps in epsilons:
        if not math.isfinite(eps):
            continue

        def is_fed(r: Mapping[str, str], e: float = eps) -> bool:
            return (
                r["method"] == "vector"
                and r["mode"] == "central"
                and float(r["dropout"]) == 0
                and r["partition"] == "iid"
                and float(r["epsilon"]) == e
            )

        def is_pooled(r: Mapping[str, str], e: float = eps) -> bool:
            return r["method"] == "vector-pooled" and float(r["epsilon"]) == e

        result = compare_seeds(_column(rows, column, is_fed), _column(rows, column, is_pooled))
        if min(result["seeds"]) == 0:
            continue
        result.update(epsilon=eps, federated=result["mean_a"], pooled=result["mean_b"])
        result["paired"] = compare_paired(
            _by_seed(rows, column, is_fed), _by_seed(rows, column, is_pooled)
        )
        out.append(result)
    return out


REFERENCE = ("vector", "distributed")
"""The condition every other method is compared against."""
UNPARTITIONED = {"prior", "vector-pooled", "vector-nonprivate", "dp-sgd", "rpsg", "noisy-icl"}
"""Methods whose cells do not depend on how the data is split over holders."""
NO_EPSILON = {"prior", "vector-nonprivate"}
"""Methods whose cells do not depend on ε (the floor and the non-private ceiling)."""


def method_comparisons(
    rows: Sequence[Mapping[str, str]], column: str = "tstr_accuracy"
) -> list[dict[str, Any]]:
    """The federated vector (distributed mode, no dropout) against every other condition.

    Per ε and partition of the reference cells (at their most common K): each other (method,
    mode) at the same ε (any ε for the prior and the non-private vector) and, for methods that
    depend on the split, the same partition and K; :func:`compare_seeds` of the reference
    against it.
    """
    usable = [r for r in rows if r.get("status", "ok") == "ok" and float(r["dropout"]) == 0]
    reference = [r for r in usable if (r["method"], r["mode"]) == REFERENCE]
    if not reference:
        return []
    clients = Counter(r["clients"] for r in reference).most_common(1)[0][0]
    others = sorted(
        {(r["method"], r["mode"]) for r in usable} - {REFERENCE},
        key=lambda mm: (list(METHODS).index(mm[0]) if mm[0] in METHODS else 99, mm[1]),
    )
    cells = sorted(
        {(float(r["epsilon"]), r["partition"]) for r in reference if r["clients"] == clients}
    )
    out = []
    for eps, partition in cells:

        def is_mine(r: Mapping[str, str], e: float = eps, p: str = partition) -> bool:
            return (
                (r["method"], r["mode"]) == REFERENCE
                and float(r["epsilon"]) == e
                and r["partition"] == p
                and r["clients"] == clients
            )

        mine = _column(usable, column, is_mine)
        for method, mode in others:

            def theirs(
                r: Mapping[str, str],
                m: str = method,
                md: str = mode,
                eps: float = eps,
                partition: str = partition,
            ) -> bool:
                if (r["method"], r["mode"]) != (m, md):
                    return False
                if m not in NO_EPSILON and float(r["epsilon"]) != eps:
                    return False
                return m in UNPARTITIONED or (
                    r["partition"] == partition and r["clients"] == clients
                )

            result = compare_seeds(mine, _column(usable, column, theirs))
            if min(result["seeds"]) == 0:
                continue
            result.update(epsilon=eps, partition=partition, method=method, mode=mode)
            result["paired"] = compare_paired(
                _by_seed(usable, column, is_mine), _by_seed(usable, column, theirs)
            )
            out.append(result)
    return out


def headline(comparisons: Sequence[Mapping[str, Any]], *, epsilon: float = 1.0) -> list[str]:
    """Plain-words answers for the lowest-ε label-skewed cell (ε = 1 where the study has it)."""
    skewed = _skewed(comparisons)
    if not skewed:
        return []
    eps = (
        epsilon
        if any(c["epsilon"] == epsilon for c in skewed)
        else min(c["epsilon"] for c in skewed)
    )
    partition = sorted({c["partition"] for c in skewed if c["epsilon"] == eps})[0]
    at = {
        (c["method"], c["mode"]): c
        for c in skewed
        if c["epsilon"] == eps and c["partition"] == partition
    }

    def said(c: Mapping[str, Any] | None, yes: str) -> str:
        if c is None:
            return "not in this study"
        paired = c.get("paired")
        if paired is not None and paired["verdict"] != "not testable":
            # The seeds share their split: the paired test is the one to answer with.
            c = paired
            detail = (
                f"paired by seed: difference {c['difference']:+.3f}, "
                f"{1 - ALPHA:.0%} CI [{c['low']:+.3f}, {c['high']:+.3f}] over {c['seeds']} seeds"
            )
        else:
            detail = (
                f"difference {c['difference']:+.3f}, could detect ≥ {c['detectable']:.3f} "
                f"with {c['seeds'][0]} and {c['seeds'][1]} seeds"
            )
        if c["verdict"] == yes:
            return f"**yes** ({detail})"
        if c["verdict"] in ("inconclusive", "not testable"):
            return f"**not shown** ({c['verdict']}: {detail})"
        return f"**no** ({c['verdict']}: {detail})"

    lines = [
        f"At ε = {eps:g}, {partition}: is the federated vector within {EQUIVALENCE:g} of central "
        f"EPSVec on the pooled data? {said(at.get(('vector-pooled', 'central')), 'equal')}."
    ]
    for method, mode in (("pe", "distributed"), ("dp-fedavg", "local"), ("prior", "none")):
        lines.append(f"Does it beat {method}? {said(at.get((method, mode)), 'higher')}.")
    return lines


def _skewed(comparisons: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The comparisons made on label-skewed holders (the headline's federation)."""
    return [c for c in comparisons if c["partition"].startswith("label-skew")]


def _skewed_epsilons(comparisons: Sequence[Mapping[str, Any]]) -> list[float]:
    """Each ε at which the federated vector was compared on label-skewed holders, ascending."""
    return sorted({c["epsilon"] for c in _skewed(comparisons)})


ATTACK_POWER_AUC = 0.6
"""A leaky control at or above this AUC shows the membership attack can see membership."""


def attack_check(rows: Sequence[Mapping[str, str]], *, max_epsilon: float = 4.0) -> dict[str, Any]:
    """Membership-inference AUCs of the formally DP cells at ε ≤ ``max_epsilon`` and the control.

    The DP cells should sit in [0.45, 0.55], the leaky control clearly above (attack power).
    """
    dp = [
        (r["key"], _float(r.get("mia_auc", "")))
        for r in rows
        if METHODS[r["method"]].formal_dp and float(r["epsilon"]) <= max_epsilon
    ]
    dp = [(k, v) for k, v in dp if not math.isnan(v)]
    control = [_float(r.get("mia_auc", "")) for r in rows if r["method"] == "icl-verbatim"]
    control = [v for v in control if not math.isnan(v)]
    return {
        "dp_aucs": dp,
        "dp_within": all(0.45 <= v <= 0.55 for _, v in dp),
        "control_aucs": control,
        "control_min": min(control) if control else math.nan,
    }


def _paired_text(c: Mapping[str, Any]) -> str:
    if c["verdict"] == "not testable":
        return f"not testable ({c['seeds']} common seeds)"
    return (
        f"{c['difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}], {c['verdict']} "
        f"({c['seeds']} seeds)"
    )


def _verdict(c: Mapping[str, Any]) -> str:
    if c["verdict"] == "not testable":
        return "not testable (a side has one seed)"
    return f"{c['verdict']} (detectable ≥ {c['detectable']:.3f})"


def _evidence_section(rows: Sequence[Mapping[str, str]], metric: str) -> list[str]:
    parts: list[str] = []
    power = (
        f"Each comparison is Welch's test at two-sided α = {ALPHA:g} over the seeds; "
        f"*detectable* is the smallest true difference it finds with power {POWER:g} at these "
        f"seed counts. *equal* needs the {1 - ALPHA:.0%} confidence interval of the difference "
        f"within ±{EQUIVALENCE:g}; *inconclusive* means the seeds cannot tell (never a pass)."
    )
    comparison = federated_vs_pooled(rows, metric)
    if comparison:
        parts += [
            "## Federated vector vs central EPSVec on the pooled data",
            "",
            "Same ε, same Gaussian noise (federated cells in central trust mode, IID, no "
            f"dropout); {metric}, mean over seeds. {power}",
            "",
            "| ε | federated | pooled | difference | std. error | verdict (Welch) | "
            "paired by seed: difference [95 % CI], verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in comparison:
            parts.append(
                f"| {c['epsilon']:g} | {c['federated']:.3f} | {c['pooled']:.3f} | "
                f"{c['difference']:+.3f} | {c['standard_error']:.3f} | {_verdict(c)} | "
                f"{_paired_text(c['paired'])} |"
            )
        parts.append("")
    methods = method_comparisons(rows, metric)
    if methods:
        parts += [
            "## The federated vector against every other method",
            "",
            f"Federated vector (distributed, no dropout) minus each other condition, {metric}. "
            + ("" if comparison else power),
            "",
            *(
                line
                for eps in _skewed_epsilons(methods)
                for answer in headline(methods, epsilon=eps)
                for line in (answer, "")
            ),
            "| ε | partition | other | vector | other's | difference | verdict (Welch) | "
            "paired by seed: difference [95 % CI], verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in methods:
            parts.append(
                f"| {c['epsilon']:g} | {c['partition']} | {c['method']} ({c['mode']}) | "
                f"{c['mean_a']:.3f} | {c['mean_b']:.3f} | {c['difference']:+.3f} | "
                f"{_verdict(c)} | {_paired_text(c['paired'])} |"
            )
        parts.append("")
    check = attack_check(rows)
    if check["dp_aucs"] or check["control_aucs"]:
        low, high = (
            (min(v for _, v in check["dp_aucs"]), max(v for _, v in check["dp_aucs"]))
            if check["dp_aucs"]
            else (math.nan, math.nan)
        )
        parts += [
            "## Does the attack have power?",
            "",
            f"Membership-inference AUC of the formally DP cells at ε ≤ 4: {len(check['dp_aucs'])} "
            f"cells, range [{low:.3f}, {high:.3f}] "
            f"({'all' if check['dp_within'] else 'NOT all'} within [0.45, 0.55]). "
            f"Leaky control (icl-verbatim): lowest AUC {check['control_min']:.3f}. "
            + (
                "The attack has power (the control is at or above "
                f"{ATTACK_POWER_AUC:g}), so DP cells near 0.5 are evidence."
                if check["control_min"] >= ATTACK_POWER_AUC
                else "The attack shows no power here (no control, or the control below "
                f"{ATTACK_POWER_AUC:g}): DP cells near 0.5 are not evidence of privacy."
            ),
            "",
        ]
    return parts


def write_report(runner: StudyRunner, rows: Sequence[Mapping[str, str]]) -> Path:
    """Write report.md (and the plots) for the study's current results."""
    config = runner.config
    out_dir = runner.out_dir
    invalid = [r for r in rows if r["status"].startswith("invalid")]
    rows = [r for r in rows if not r["status"].startswith("invalid")]
    groups = aggregate(rows)
    plots = write_plots(groups, out_dir, config.plot_metric)
    used = {r["method"] for r in rows}
    parts = [
        f"# Study {config.name}",
        "",
        f"Corpus `{config.corpus}`, model `{config.model}`, layers {list(config.layers)}, "
        f"δ = {config.delta:g}, seeds {list(config.seeds)}; {config.data.private_per_label} "
        f"private and {config.data.test_per_label} held-out records per label, "
        f"{config.data.synthetic_per_label} synthetic samples per label. Settings fingerprint "
        f"`{config.fingerprint()}`; {len(rows)} cells in `results.csv`.",
        "",
        "## Methods and the guarantee each gives",
        "",
        "| method | guarantee |",
        "|---|---|",
        *(f"| {m} | {info.guarantee} |" for m, info in METHODS.items() if m in used),
        "",
        "## Results (mean ± sd over seeds)",
        "",
        results_table(groups) if groups else "No cells finished yet.",
        "",
        "Metrics: " + "; ".join(f"**{m}**: {METRICS[m]}" for m in config.metrics) + ".",
        "Performance: client s = wall time of the stage in which the holders compute (they run "
        "in parallel; for pooled baselines, the curator's feature pass); bytes/client = "
        "serialized replies per holder over all stages; coord. s = the rest of the cell "
        "(reference, secure-sum bookkeeping, PE generation); tok/s = generation speed.",
        "",
    ]
    parts += _evidence_section(rows, config.plot_metric)
    if plots:
        parts += ["## Plots", "", *(f"![{p}]({p})" for p in plots), ""]
    if runner.holder_tables:
        parts += ["## Holders' data", "", holder_table(runner.holder_tables), ""]
    audit = out_dir / "audit.csv"
    if audit.exists():
        parts += ["## Empirical privacy audit", "", _audit_table(audit), ""]
    noise = out_dir / "noise.csv"
    if noise.exists() or invalid:
        parts += ["## Realized noise", "", noise_section(noise, invalid), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _audit_table(path: Path) -> str:
    import csv

    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    lines = [
        "Distinguishing audit on the released vector (runs with and without one worst-case "
        "record; Clopper-Pearson at 95 %). The lower bound must stay below the claimed ε. "
        "The largest bound the runs could report at all (perfect separation) is shown next to "
        "it: where it is below the claimed ε, the audit could not have refuted the claim.",
        "",
        "| mode | claimed ε | empirical ε lower bound | largest reportable bound | could refute | "
        "runs per side | FPR bound | FNR bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        attainable = r.get("attainable_bound") or ""
        refute = (
            "?"
            if not attainable
            else ("yes" if float(attainable) > float(r["claimed_epsilon"]) else "no")
        )
        shown = f"{float(attainable):.3f}" if attainable else "n/a"
        lines.append(
            f"| {r['mode']} | {r['claimed_epsilon']} | {float(r['epsilon_lower_bound']):.3f} | "
            f"{shown} | {refute} | {r['runs']} | {float(r['false_positive_rate']):.3f} | "
            f"{float(r['false_negative_rate']):.3f} |"
        )
    return "\n".join(lines)


def noise_section(path: Path, invalid: Sequence[Mapping[str, str]]) -> str:
    """The realized-noise checks (:mod:`fedsynth.simulations.noise_check`) in a few lines."""
    import csv

    checks: list[dict[str, str]] = []
    if path.exists():
        with path.open(newline="", encoding="utf-8") as handle:
            checks = list(csv.DictReader(handle))
    latest = {(c["key"], c["release"]): c for c in checks}  # a rerun's check replaces the old
    passed = [c for c in latest.values() if c["verdict"] == "ok"]
    lines = [
        "Each noisy release, measured against the records it was computed from (in a "
        "dropout cell, the survivors'): the mean square of (released sum − noise-free sum) "
        "over the stated per-coordinate variance, which must lie in the chi-square band of "
        "the stated noise. "
        "Less noise than stated would break the guarantee; more makes the release's own "
        "signal-to-noise figures (and the steering strength chosen from them) wrong.",
        "",
    ]
    if passed:
        ratios = [float(c["ratio"]) for c in passed]
        lines.append(
            f"{len(passed)} of {len(latest)} releases within their band (ratios "
            f"{min(ratios):.3f}–{max(ratios):.3f})."
        )
    if invalid:
        lines += [
            "",
            f"{len(invalid)} cells failed and are left out of every table above; the next run "
            "measures them again:",
            "",
            *(f"* `{r['key']}`: {r['status'][len('invalid: ') :]}" for r in invalid),
        ]
    return "\n".join(lines)
