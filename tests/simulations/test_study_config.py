"""Study configs: the grid they expand to, and every bad input refused before compute."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from fedsynth.protocol.errors import ConfigError, TimeBudgetError
from fedsynth.simulations.study import (
    RESULT_COLUMNS,
    _slug,
    check_time_budget,
    open_results_folder,
)
from fedsynth.simulations.study_config import (
    STUDY_FORMAT,
    load_study_config,
    parse_study,
)

GOOD = """
name = "t"
seeds = [0, 1]
metrics = ["tstr", "mia"]

[data]
private_per_label = 50

[[sweep]]
name = "eps"
methods = ["prior", "vector", "vector-pooled", "vector-nonprivate"]
epsilons = [1, 4, "inf"]
clients = [3, 5]
partitions = ["iid", "label-skew:0.5"]
modes = ["central", "distributed"]

[[sweep]]
name = "drop"
methods = ["vector"]
epsilons = [4]
clients = [5]
dropouts = [0.0, 0.2]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def _raw(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"name": "t", "sweep": [{"methods": ["vector"]}]}
    raw.update(changes)
    return raw


def test_good_config_expands_to_the_union_of_sweeps(tmp_path: Path) -> None:
    config = load_study_config(_write(tmp_path, GOOD))
    cells = config.cells()
    per_seed = (
        1  # prior: one pooled cell
        + 3 * 2 * 2 * 2  # vector: eps x K x partition x mode
        + 3  # vector-pooled: one per eps, pooled
        + 1  # non-private
        + 1  # drop sweep: dropout 0.2 at K=5 (dropout 0 duplicates the first sweep)
    )
    assert len(cells) == 2 * per_seed
    assert len({c.key for c in cells}) == len(cells)
    assert {c.partition for c in cells if c.method == "prior"} == {"pooled"}
    assert {c.mode for c in cells if c.method == "vector-pooled"} == {"central"}
    assert any(math.isinf(c.epsilon) and c.method == "vector" for c in cells)
    assert {c.dropped_clients for c in cells if c.dropout == 0.2} == {1}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_raw(sweep=[{"methods": ["dp-magic"]}]), "method 'dp-magic' is unknown"),
        (_raw(metrics=["bleurt"]), "metric 'bleurt' is unknown"),
        (_raw(sweep=[{"methods": ["vector"], "partitions": ["shards"]}]), "partition 'shards'"),
        (_raw(sweep=[{"methods": ["vector"], "partitions": ["label-skew:0"]}]), "alpha > 0"),
        (_raw(sweep=[{"methods": ["vector"], "partitions": ["label-skew:-2"]}]), "alpha > 0"),
        (
            _raw(sweep=[{"methods": ["vector"], "clients": [500]}], data={"private_per_label": 10}),
            "K=500 holders exceed the 20 private training records",
        ),
        (_raw(sweep=[{"methods": ["vector"], "clients": [1]}]), "clients must be an integer >= 2"),
        (_raw(sweep=[{"methods": ["vector"], "modes": ["trusted"]}]), "trust mode 'trusted'"),
        (_raw(sweep=[{"methods": ["vector"], "epsilons": [0]}]), "ε must be > 0"),
        (
            _raw(sweep=[{"methods": ["vector"], "dropouts": [0.5], "clients": [3]}]),
            "below the secure sum's threshold",
        ),
        (_raw(sweep=[{"methods": ["vector"], "dropouts": [1.0]}]), r"in \[0, 1\)"),
        (_raw(sweep=[]), "at least one"),
        (_raw(corpus="imdb"), "corpus 'imdb' is unknown"),
        (_raw(format=99), "format = 99"),
        (_raw(colour="blue"), "unknown key"),
        (_raw(data={"private_per_label": 0}), "private_per_label must be an integer >= 1"),
        (_raw(data={"strength": -1.0}), "strength must be > 0"),
        (_raw(data={"shots": -1}), "shots must be an integer >= 0"),
        (_raw(data={"shots": 1.5}), "shots must be an integer"),
        (_raw(data={"variants": "A {label} note:"}), "variants must be a list of strings"),
        (_raw(data={"variants": ["A {label} note:", "A note:"]}), "'A note:' lacks a {label}"),
        (_raw(pe={"init_fraction": 1.0}), r"\[pe\] init_fraction must be < 1, got 1.0"),
        (_raw(pe={"init_fraction": 0}), r"\[pe\] init_fraction must be > 0"),
        (_raw(pe={"output": 0}), r"\[pe\] output must be an integer >= 1"),
        (_raw(pe={"output": 2.5}), r"\[pe\] output must be an integer"),
        (_raw(steering={"denoise": 1}), r"\[steering\] denoise must be true or false"),
        (
            _raw(steering={"min_signal_share": 2}),
            r"\[steering\] min_signal_share=2.0: must be a number in \[0, 1\]",
        ),
        (
            _raw(data={"colluders": 3}, sweep=[{"methods": ["vector"], "clients": [3]}]),
            r"\[data\] colluders=3: at K=3 with 0 dropped the safe threshold t=4",
        ),
        (_raw(data={"colluders": -1}), r"colluders must be an integer >= 0"),
        (_raw(steering={"rank": 8}), "unknown key"),
        (_raw(seeds=[1, 1]), "seeds repeat"),
        (_raw(delta=1.5), "delta"),
        (_raw(time_budget_minutes=0), "time_budget_minutes must be a number > 0"),
        (_raw(time_budget_minutes="1h"), "time_budget_minutes must be a number"),
        (_raw(time_budget_minutes=float("inf")), "time_budget_minutes must be a number > 0"),
    ],
)
def test_bad_configs_are_refused(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_study(raw)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_study_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_study_config(_write(tmp_path, "name = [unclosed"))


def test_results_folder_checks(tmp_path: Path) -> None:
    config = parse_study(_raw())
    out = tmp_path / "results"
    assert open_results_folder(config, out) == set()
    assert open_results_folder(config, out) == set()  # reopening the same study is fine
    # Spelling out a default changes nothing; only the grid changed: still compatible.
    assert parse_study(_raw(data={"audit_runs": 200})).fingerprint() == config.fingerprint()
    wider = parse_study(_raw(seeds=[0, 1], metrics=["tstr"]))
    open_results_folder(wider, out)
    # Other fixed settings: rows would not be comparable.
    other = parse_study(_raw(data={"private_per_label": 99}))
    with pytest.raises(ConfigError, match="other fixed settings"):
        open_results_folder(other, out)
    # A folder from another study format.
    meta = json.loads((out / "study.json").read_text())
    meta["format"] = STUDY_FORMAT + 1
    (out / "study.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="format"):
        open_results_folder(config, out)
    # A results.csv with other columns.
    meta["format"] = STUDY_FORMAT
    (out / "study.json").write_text(json.dumps(meta))
    (out / "results.csv").write_text("key,method\nx,y\n")
    with pytest.raises(ConfigError, match="other columns"):
        open_results_folder(config, out)
    (out / "results.csv").write_text(",".join(RESULT_COLUMNS) + "\n")
    assert open_results_folder(config, out) == set()
    # Written by a version with fewer metric columns: kept, migrated to the current header.
    older = [c for c in RESULT_COLUMNS if c != "mauve"]
    (out / "results.csv").write_text(
        ",".join(older) + "\n" + ",".join("x" if c in ("key", "status") else "" for c in older)
    )
    assert open_results_folder(config, out) == {"x"}
    assert (out / "results.csv").read_text().splitlines()[0] == ",".join(RESULT_COLUMNS)
    # Not a study folder at all.
    (out / "study.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a study file"):
        open_results_folder(config, out)
    # Someone else's results.csv is never overwritten.
    (out / "study.json").unlink()
    with pytest.raises(ConfigError, match=r"no study\.json"):
        open_results_folder(config, out)
    assert (out / "results.csv").exists()


def _rows(out: Path, methods: list[str]) -> None:
    lines = [",".join(RESULT_COLUMNS)]
    for m in methods:
        values = {"key": f"{m}|seed=0", "method": m, "status": "ok"}
        lines.append(",".join(values.get(c, "") for c in RESULT_COLUMNS))
    (out / "results.csv").write_text("\n".join(lines) + "\n")
    for m in methods:
        (out / "cells" / _slug(f"{m}|seed=0")).mkdir(parents=True)


def test_a_changed_method_section_makes_only_its_rows_stale(tmp_path: Path) -> None:
    config = parse_study(_raw())
    out = tmp_path / "results"
    open_results_folder(config, out)
    _rows(out, ["vector", "pe", "pe-steered", "dp-sgd"])
    everything = {"vector|seed=0", "pe|seed=0", "pe-steered|seed=0", "dp-sgd|seed=0"}
    changed = parse_study(_raw(pe={"population": 12, "output": 150}))
    assert changed.fingerprints()["common"] == config.fingerprints()["common"]
    assert changed.fingerprints()["pe"] != config.fingerprints()["pe"]
    # Refused by default, naming the section and the methods; nothing is touched.
    with pytest.raises(ConfigError, match=r"\[pe\] changed since 2 rows.*--rerun-changed"):
        open_results_folder(changed, out)
    assert open_results_folder(config, out) == everything
    # Asked for: the PE rows and their cell folders go, every other row stays.
    assert open_results_folder(changed, out, rerun_changed=True) == {
        "vector|seed=0",
        "dp-sgd|seed=0",
    }
    assert not (out / "cells" / _slug("pe|seed=0")).exists()
    assert (out / "cells" / _slug("vector|seed=0")).exists()
    assert open_results_folder(changed, out) == {"vector|seed=0", "dp-sgd|seed=0"}
    # The old settings are now the changed ones: no PE rows left, so nothing is stale.
    assert open_results_folder(config, out) == {"vector|seed=0", "dp-sgd|seed=0"}
    # A setting every cell reads is refused whatever the flag says.
    other = parse_study(_raw(data={"private_per_label": 99}))
    with pytest.raises(ConfigError, match="other fixed settings"):
        open_results_folder(other, out, rerun_changed=True)


def test_an_interrupted_cell_of_a_changed_section_starts_afresh(tmp_path: Path) -> None:
    config = parse_study(_raw())
    out = tmp_path / "results"
    open_results_folder(config, out)
    _rows(out, ["vector"])
    # A PE cell interrupted under the old settings: a folder (its checkpoint), no row.
    interrupted = out / "cells" / _slug("pe|distributed|eps=1|seed=0")
    (interrupted / "pe-checkpoint").mkdir(parents=True)
    steered = out / "cells" / _slug("pe-steered|distributed|eps=1|seed=0")
    steered.mkdir()
    changed = parse_study(_raw(pe={"population": 12}))
    assert open_results_folder(changed, out) == {"vector|seed=0"}
    assert not interrupted.exists() and not steered.exists()
    assert (out / "cells" / _slug("vector|seed=0")).exists()


def test_folder_from_before_section_fingerprints_is_upgraded(tmp_path: Path) -> None:
    config = parse_study(_raw())
    out = tmp_path / "results"
    out.mkdir()
    old = {"format": STUDY_FORMAT, "fingerprint": config.fingerprint(), "name": config.name}
    (out / "study.json").write_text(json.dumps(old))
    _rows(out, ["pe"])
    assert open_results_folder(config, out) == {"pe|seed=0"}
    assert json.loads((out / "study.json").read_text())["fingerprints"] == config.fingerprints()
    (out / "study.json").write_text(json.dumps(old))
    # An old folder whose single fingerprint differs cannot say which section changed.
    with pytest.raises(ConfigError, match="other fixed settings"):
        open_results_folder(parse_study(_raw(pe={"rounds": 1})), out, rerun_changed=True)


@pytest.mark.parametrize("name", ["small.toml", "gpu.toml", "scale.toml", "compare.toml"])
def test_shipped_study_configs_are_valid(name: str) -> None:
    config = load_study_config(Path(__file__).parents[2] / "studies" / name)
    assert len(config.cells()) >= 6


def test_federated_refusals_are_results_but_crashes_rerun() -> None:
    from fedsynth.simulations.methods.common import federated_failure

    with pytest.raises(ConfigError, match="max_epsilon_per_task"):
        federated_failure("x", ["PolicyViolationError: epsilon=16 exceeds max_epsilon_per_task"])
    with pytest.raises(ConfigError):
        federated_failure("x", ["TooFewParticipantsError: only 0 of 3 clients completed setup"])
    with pytest.raises(RuntimeError, match="actor died"):
        federated_failure("x", ["RayActorError: actor died"])


def _privacy(mode: str, noise_sharing: str = "plain") -> Any:
    """Terms with v = 100, t = 2 and noise multiplier 1.2 (the study's sigma over Delta)."""
    from fedsynth.protocol.manifest import PrivacySpec

    return PrivacySpec(
        epsilon=4.0,
        delta=1e-5,
        mode=mode,
        threshold=2,
        total_variance=100.0,
        noise_multiplier=1.2,
        l2_sensitivity=1.0,
        l1_sensitivity=1.0,
        accountant="test",
        noise_sharing=noise_sharing,
    )


@pytest.mark.parametrize(("mode", "factor"), [("central", 1.0), ("distributed", 1.5), ("local", 3)])
def test_effective_noise_counts_every_surviving_share(mode: str, factor: float) -> None:
    from fedsynth.simulations.methods.common import effective_noise_multiplier

    assert effective_noise_multiplier(_privacy(mode), survivors=3) == pytest.approx(
        1.2 * factor**0.5
    )


def test_effective_noise_under_exact_sharing_is_the_target_once_excess_is_removed() -> None:
    from fedsynth.simulations.methods.common import effective_noise_multiplier

    privacy = _privacy("distributed", "exact")
    assert effective_noise_multiplier(privacy, survivors=3, removed=3) == pytest.approx(1.2)
    # One survivor's excess stays: 2/3 + 1/2 of the target.
    assert effective_noise_multiplier(privacy, survivors=3, removed=2) == pytest.approx(
        1.2 * (2 / 3 + 1 / 2) ** 0.5
    )


def test_time_budget_is_judged_on_the_measured_cells_and_left_out_of_the_fingerprint() -> None:
    config = parse_study(_raw(time_budget_minutes=10))
    assert config.time_budget_minutes == 10.0
    assert config.fingerprint() == parse_study(_raw()).fingerprint()  # results stay comparable
    check_time_budget(config, [60.0, 60.0], remaining=10)  # 10 min: within
    check_time_budget(config, [], remaining=1000)  # nothing measured yet: no judgement
    with pytest.raises(TimeBudgetError, match=r"11 cells left, about 11 min") as info:
        check_time_budget(config, [30.0, 90.0], remaining=11)
    assert "time_budget_minutes=10" in str(info.value) and "--yes" in str(info.value)
    check_time_budget(parse_study(_raw()), [1e6], remaining=1000)  # no budget: never refused


def test_shots_default_to_the_plain_prompt_and_enter_the_fingerprint() -> None:
    plain = parse_study(_raw())
    assert plain.data.shots == 0  # studies run before shots existed open unchanged
    assert parse_study(_raw(data={"shots": 0})).fingerprint() == plain.fingerprint()
    shot = parse_study(_raw(data={"shots": 2}))
    assert shot.data.shots == 2 and shot.fingerprint() != plain.fingerprint()
    assert load_study_config(Path(__file__).parents[2] / "studies" / "compare.toml").data.shots == 1


def test_variants_default_to_the_template_and_enter_the_fingerprint() -> None:
    plain = parse_study(_raw())
    assert plain.data.variants == ()  # studies run before variants existed open unchanged
    assert parse_study(_raw(data={"variants": []})).fingerprint() == plain.fingerprint()
    varied = parse_study(_raw(data={"variants": ["A {label} note:"]}))
    assert varied.data.variants == ("A {label} note:",)
    assert varied.fingerprint() != plain.fingerprint()


def test_denoising_makes_only_the_release_methods_rows_stale(tmp_path: Path) -> None:
    # Generation from a release changes; PE, the fine-tuned models and the baselines do not.
    config = parse_study(_raw())
    assert config.steering.denoise is False  # older studies' results stay comparable
    out = tmp_path / "results"
    open_results_folder(config, out)
    _rows(out, ["vector", "vector-pooled", "pe", "pe-steered", "dp-sgd", "prior"])
    denoised = parse_study(_raw(steering={"denoise": True}))
    assert denoised.steering.denoise is True
    assert denoised.fingerprints()["common"] == config.fingerprints()["common"]
    with pytest.raises(ConfigError, match=r"\[steering\] changed since 3 rows"):
        open_results_folder(denoised, out)
    assert open_results_folder(denoised, out, rerun_changed=True) == {
        "pe|seed=0",
        "dp-sgd|seed=0",
        "prior|seed=0",
    }


def test_the_signal_share_cut_reaches_the_cells_and_only_a_changed_one_is_stale() -> None:
    from fedsynth.simulations.study import StudyRunner

    config = parse_study(_raw())
    assert config.steering.min_signal_share == 0.5
    plain = parse_study(_raw(steering={"min_signal_share": 0.0}))
    assert plain.fingerprints()["common"] == config.fingerprints()["common"]
    assert plain.fingerprints()["steering"] != config.fingerprints()["steering"]
    cell = next(c for c in plain.cells() if c.method == "vector")
    assert StudyRunner(plain, Path("unused")).demo_config(cell).min_signal_share == 0.0
    assert StudyRunner(config, Path("unused")).demo_config(cell).min_signal_share == 0.5


def test_colluders_reach_every_federated_cell(tmp_path: Path) -> None:
    from fedsynth.simulations.study import StudyRunner

    config = parse_study(
        _raw(data={"colluders": 1}, sweep=[{"methods": ["vector", "prior"], "clients": [5]}])
    )
    assert parse_study(_raw()).data.colluders == 0
    assert config.fingerprints()["common"] != parse_study(_raw()).fingerprints()["common"]
    runner = StudyRunner(config, tmp_path / "out")
    for cell in config.cells():
        demo = runner.demo_config(cell)
        assert demo.colluders == 1
        if cell.method == "vector":
            assert demo.secure_sum_threshold == 4


def test_folder_from_before_a_new_section_keeps_its_rows(tmp_path: Path) -> None:
    # A study.json written before [steering] existed names no fingerprint for it: its rows were
    # made with the section's defaults, so they stay; a changed section still makes them stale.
    config = parse_study(_raw())
    out = tmp_path / "results"
    open_results_folder(config, out)
    meta = json.loads((out / "study.json").read_text())
    del meta["fingerprints"]["steering"]
    (out / "study.json").write_text(json.dumps(meta))
    _rows(out, ["vector", "pe"])
    assert open_results_folder(config, out) == {"vector|seed=0", "pe|seed=0"}
    assert "steering" in json.loads((out / "study.json").read_text())["fingerprints"]
    (out / "study.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"\[steering\] changed since 1 rows"):
        open_results_folder(parse_study(_raw(steering={"denoise": True})), out)
