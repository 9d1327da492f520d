"""Demo configuration and data preparation (no model needed)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedsynth.client.data import Record
from fedsynth.protocol.errors import ConfigError, DataFileError
from fedsynth.simulations.demo import (
    PRESETS,
    DemoConfig,
    DemoData,
    check_text_length,
    demo_config,
    dropped_holders,
    gap_closed,
    generation_config,
    judge_records,
    prepare_data,
    real_reference,
    release_epsilons,
    removed_on_failure,
    split_data,
    task_config,
)


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_presets_and_overrides(tmp_path: Path) -> None:
    quick = demo_config("quick", out_dir=tmp_path, epsilon=2.0, samples=None)
    assert quick.private_per_label == PRESETS["quick"]["private_per_label"]
    assert quick.epsilon == 2.0
    assert release_epsilons(quick) == [2.0, float("inf")]
    with pytest.raises(ValueError, match="preset"):
        demo_config("huge", out_dir=tmp_path)
    # The prior condition generates its own samples: the public prior texts (the reference)
    # keep their own number however many samples are asked for.
    many = demo_config("default", out_dir=tmp_path, synthetic_per_label=1000)
    assert many.prior_per_label == 150 and many.synthetic_per_label == 1000


def test_user_data_gets_template_and_partitions(tmp_path: Path) -> None:
    rows = [{"body": f"text number {i}", "kind": "a" if i % 3 else "b"} for i in range(60)]
    data = _write(tmp_path / "mine.jsonl", rows)
    config = demo_config(
        "quick",
        out_dir=tmp_path / "out",
        data_path=data,
        text_field="body",
        label_field="kind",
        clients=3,
        instruction="A note of kind {label}:\n",
    )
    assert config.template.labels == ("a", "b")
    assert config.template.prefix("b") == "A note of kind b:\n"
    prepared = prepare_data(config)
    assert len(prepared.partitions) == 3
    assert sum(len(p) for p in prepared.partitions) == len(prepared.train)
    assert not {r.text for r in prepared.train} & {r.text for r in prepared.test}
    for i in range(3):
        lines = (prepared.partition_dir / f"partition-{i}.jsonl").read_text().splitlines()
        assert len(lines) == len(prepared.partitions[i])


def test_user_data_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "label": "x"}\n{"text": "", "label": "x"}\n')
    config = demo_config("quick", out_dir=tmp_path / "out", data_path=bad)
    with pytest.raises(DataFileError, match="line 2"):
        prepare_data(config)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--threshold", "5", "--clients", "3"], "threshold"),
        (["--clients", "1"], "clients"),
        (["--mode", "trusted"], "mode"),
        (["--epsilon", "-1"], "epsilon"),
        (["--drop", "2", "--clients", "3"], "threshold"),
        (["--prior-per-label", "0"], "--prior-per-label"),
        (["--contrast", "nan"], "contrast=nan"),
    ],
)
def test_cli_refuses_bad_settings_before_compute(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedsynth.simulations", "demo", "--out", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert needle in (proc.stdout + proc.stderr).lower()
    assert not (tmp_path / "synthetic.jsonl").exists()


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"strength": -1.0}, "strength=-1.0"),
        ({"strength": float("nan")}, "strength=nan"),
        ({"contrast": float("inf")}, "contrast=inf"),
        ({"synthetic_per_label": 0}, "synthetic_per_label"),
        ({"private_per_label": 0}, "private_per_label=0"),
        ({"epsilon": 0.0}, "epsilon=0.0"),
        ({"delta": 1.0}, "delta=1.0"),
        ({"mode": "trusted"}, "mode='trusted'"),
        ({"threshold": 1}, "threshold t=1"),
        ({"drop_clients": -1}, "drop=-1"),
        ({"layers": ()}, "layers=()"),
        ({"max_text_tokens": 0}, "max_text_tokens (--max-text-tokens)=0"),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ],
)
def test_demo_config_refuses_bad_settings(
    tmp_path: Path, overrides: dict[str, object], needle: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        DemoConfig(out_dir=tmp_path, **overrides)  # type: ignore[arg-type]
    assert needle in str(caught.value)


def test_federation_checks_name_k_t_and_drop(tmp_path: Path) -> None:
    DemoConfig(out_dir=tmp_path, clients=1)  # pooled baselines use one "holder"
    with pytest.raises(ConfigError, match="clients K=1"):
        DemoConfig(out_dir=tmp_path, clients=1).check_federation()
    with pytest.raises(ConfigError, match="threshold t=4"):
        DemoConfig(out_dir=tmp_path, clients=3, threshold=4).check_federation()
    with pytest.raises(ConfigError, match="drop=2 leaves 1 holders, below the threshold t=2"):
        DemoConfig(out_dir=tmp_path, clients=3, drop_clients=2).check_federation()
    DemoConfig(out_dir=tmp_path, clients=3, drop_clients=1).check_federation()
    assert dropped_holders(DemoConfig(out_dir=tmp_path, clients=5, drop_clients=2)) == (3, 4)


@pytest.mark.parametrize(
    ("labels", "needle"),
    [
        ({"a": 30}, "at least 2"),
        ({"a": 30, "b": 1}, "label 'b' has 0 held-out records"),
    ],
)
def test_data_checks_run_before_any_holder_file_is_written(
    tmp_path: Path, labels: dict[str, int], needle: str
) -> None:
    rows = [{"text": f"t {k} {i}", "label": k} for k, n in labels.items() for i in range(n)]
    config = demo_config(
        "quick", out_dir=tmp_path / "out", data_path=_write(tmp_path / "d.jsonl", rows)
    )
    with pytest.raises(DataFileError) as caught:
        prepare_data(config)
    assert needle in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_partitions_are_removed_when_the_run_fails(tmp_path: Path) -> None:
    rows = [{"text": f"t {i}", "label": "ab"[i % 2]} for i in range(40)]
    config = demo_config(
        "quick", out_dir=tmp_path / "out", data_path=_write(tmp_path / "d.jsonl", rows)
    )
    data = prepare_data(config)
    files = sorted(data.partition_dir.glob("partition-*.jsonl"))
    assert len(files) == 3
    with pytest.raises(RuntimeError, match="federation failed"), removed_on_failure(data):
        raise RuntimeError("federation failed")
    assert not list(data.partition_dir.glob("partition-*.jsonl"))
    kept = prepare_data(config)
    with removed_on_failure(kept):
        pass
    assert len(list(kept.partition_dir.glob("partition-*.jsonl"))) == 3


def test_the_fidelity_judge_never_trains_on_private_or_held_out_texts(tmp_path: Path) -> None:
    config = demo_config("quick", out_dir=tmp_path, private_per_label=100)
    data = split_data(config)
    assert data.judge
    judged = {r.text for r in data.judge}
    assert not judged & {r.text for r in data.train}
    assert not judged & {r.text for r in data.test}
    records, what = judge_records(data)
    assert records == data.judge and "neither the holders' data nor the held-out set" in what


def test_a_small_data_file_judges_with_the_private_records(tmp_path: Path) -> None:
    rows = [{"text": f"text number {i}", "label": "a" if i % 2 else "b"} for i in range(40)]
    config = demo_config(
        "quick", out_dir=tmp_path / "out", data_path=_write(tmp_path / "few.jsonl", rows)
    )
    data = split_data(config)
    records, what = judge_records(data)
    assert records == data.train and "private records" in what


def test_record_and_sample_length_follow_the_declared_maximum(tmp_path: Path) -> None:
    # The declared record length is public (part of the task, like the template): the
    # features read that much of a record and samples are that long at most.
    reviews = DemoConfig(out_dir=tmp_path)
    news = DemoConfig(out_dir=tmp_path, corpus="bbc_news")
    assert (reviews.text_tokens, reviews.new_tokens) == (48, 48)
    assert (news.text_tokens, news.new_tokens) == (128, 128)
    data = _write(tmp_path / "d.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "b"}])
    assert DemoConfig(out_dir=tmp_path, data_path=data).text_tokens == 64
    given = DemoConfig(out_dir=tmp_path, corpus="bbc_news", max_text_tokens=200)
    assert (given.text_tokens, given.new_tokens) == (200, 200)
    shorter = DemoConfig(out_dir=tmp_path, max_text_tokens=200, max_new_tokens=20)
    assert (shorter.text_tokens, shorter.new_tokens) == (200, 20)
    assert task_config(news, 4.0).max_text_tokens == 128
    assert task_config(news, 4.0).prior_generation.max_new_tokens == 128


def test_a_length_beyond_the_model_context_is_refused(tmp_path: Path) -> None:
    from fedsynth.protocol.models import tiny_model

    loaded = tiny_model(seed=0)  # 256 positions
    context = loaded.model.config.max_position_embeddings
    fits = DemoConfig(out_dir=tmp_path, max_text_tokens=context // 2, shots=0)
    check_text_length(fits, loaded)
    too_long = DemoConfig(out_dir=tmp_path, max_text_tokens=context, shots=0)
    with pytest.raises(ConfigError) as caught:
        check_text_length(too_long, loaded)
    message = str(caught.value)
    assert f"max_text_tokens={context}" in message
    assert f"context of {context} tokens" in message
    generation_too_long = DemoConfig(out_dir=tmp_path, max_new_tokens=context, shots=0)
    with pytest.raises(ConfigError, match=f"max_new_tokens={context}"):
        check_text_length(generation_too_long, loaded)


def test_shots_are_checked_before_anything_runs(tmp_path: Path) -> None:
    from fedsynth.protocol.models import tiny_model

    with pytest.raises(ConfigError, match="shots=-1"):
        DemoConfig(out_dir=tmp_path, shots=-1)
    assert demo_config("default", out_dir=tmp_path).shots == 1
    assert demo_config("quick", out_dir=tmp_path).shots == 0  # the quick preset stays quick
    assert demo_config("quick", out_dir=tmp_path, shots=2).shots == 2
    # Per corpus: BBC News articles without a shot (measured), a user's data with one.
    assert demo_config("default", out_dir=tmp_path, corpus="bbc_news").shots == 0
    assert demo_config("default", out_dir=tmp_path, corpus="bbc_news", shots=1).shots == 1
    assert demo_config("default", out_dir=tmp_path, corpus="rotten_tomatoes").shots == 1
    assert demo_config("default", out_dir=tmp_path, data_path=tmp_path / "d.jsonl").shots == 1
    loaded = tiny_model(seed=0)  # 256 positions
    check_text_length(DemoConfig(out_dir=tmp_path, max_text_tokens=40, shots=2), loaded)
    # Each shot adds a prompt and a whole sample: 5 shots of 40 tokens no longer fit.
    with pytest.raises(ConfigError, match=r"shots=5: .*context of 256 tokens"):
        check_text_length(DemoConfig(out_dir=tmp_path, max_text_tokens=40, shots=5), loaded)


def _records(words: dict[str, str], n: int, start: int = 0) -> list[Record]:
    return [
        Record(text=f"{word} story number {i} {word}", label=label)
        for label, word in words.items()
        for i in range(start, start + n)
    ]


def test_real_reference_draws_per_label_real_texts(tmp_path: Path) -> None:
    words = {"pos": "sunny", "neg": "gloomy"}
    data = DemoData(
        train=_records(words, 30),
        test=_records(words, 10, 100),
        partitions=[],
        partition_dir=tmp_path,
        source="test",
    )
    ref = real_reference(data, 5)
    assert ref["per_label"] == 5 and ref["draws"] == 3
    assert ref["tstr_accuracy"] == 1.0 and ref["tstr_accuracy_sd"] == 0.0  # separable words
    assert real_reference(data, 5) == ref  # seeded draws
    # Labels swapped in the training texts: the reference must see the real labels it is given.
    swapped = DemoData(
        train=[Record(text=r.text, label="neg" if r.label == "pos" else "pos") for r in data.train],
        test=data.test,
        partitions=[],
        partition_dir=tmp_path,
        source="test",
    )
    assert real_reference(swapped, 5)["tstr_accuracy"] == 0.0
    with pytest.raises(ConfigError, match="per_label=0"):
        real_reference(data, 0)


def test_gap_closed() -> None:
    assert gap_closed(0.5, 0.6, 0.7) == pytest.approx(0.5)
    assert gap_closed(0.5, 0.45, 0.7) == pytest.approx(-0.25)  # below the prior: negative
    assert math.isnan(gap_closed(0.7, 0.8, 0.6))  # real below the prior: no gap to close


def test_a_record_longer_than_a_holder_accepts_is_refused(tmp_path: Path) -> None:
    from fedsynth.client.data import MAX_CHARS
    from fedsynth.simulations.demo import check_demo_data

    config = demo_config("quick", out_dir=tmp_path)
    words = {"positive": "sunny", "negative": "gloomy"}
    train, test = _records(words, 3), _records(words, 2, 10)
    check_demo_data(config, train, test, source="corpus")
    train[1] = Record(text="x" * (MAX_CHARS + 1), label="positive")
    with pytest.raises(DataFileError, match=r"corpus: 1 private record\(s\) longer.*20001"):
        check_demo_data(config, train, test, source="corpus")


def test_selection_is_checked_before_anything_runs(tmp_path: Path) -> None:
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(ConfigError, match=f"select={bad}"):
            DemoConfig(out_dir=tmp_path, select=bad)
    assert DemoConfig(out_dir=tmp_path, select=0.5).select == 0.5


def test_top_p_is_checked_and_reaches_the_sampler(tmp_path: Path) -> None:
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match=f"top_p={bad}"):
            DemoConfig(out_dir=tmp_path, top_p=bad)
    assert generation_config(DemoConfig(out_dir=tmp_path)).top_p == 0.95
    assert generation_config(DemoConfig(out_dir=tmp_path, top_p=1.0)).top_p == 1.0


def test_colluders_raise_the_default_threshold_and_the_holders_demand(tmp_path: Path) -> None:
    from fedsynth.simulations.demo import simulated_holder_policy, task_config

    plain = DemoConfig(out_dir=tmp_path, clients=5)
    assert plain.secure_sum_threshold == 3
    sized = DemoConfig(out_dir=tmp_path, clients=5, colluders=1)
    assert sized.secure_sum_threshold == 4  # 2t - K > 1
    sized.check_federation()
    assert task_config(sized, 4.0).colluders == 1
    # The simulated holders demand it: a task sized for fewer colluders is refused by them.
    assert simulated_holder_policy(sized).max_colluders == 1
    with pytest.raises(ConfigError, match="3 colluders could unmask"):
        DemoConfig(out_dir=tmp_path, clients=5, threshold=4, colluders=3).check_federation()
    with pytest.raises(ConfigError, match="1 colluders could unmask a holder"):
        DemoConfig(out_dir=tmp_path, clients=5, threshold=3, colluders=1).check_federation()
    with pytest.raises(ConfigError, match="safe threshold for 4 colluders is 5"):
        DemoConfig(out_dir=tmp_path, clients=4, colluders=4).check_federation()
    with pytest.raises(ConfigError, match="colluders=-1"):
        DemoConfig(out_dir=tmp_path, clients=5, colluders=-1).check_federation()
    with pytest.raises(ConfigError, match="drop=2 leaves 3 holders, below the threshold t=4"):
        DemoConfig(out_dir=tmp_path, clients=5, colluders=1, drop_clients=2).check_federation()


def test_variants_are_checked_first_and_count_in_the_context(tmp_path: Path) -> None:
    from fedsynth.protocol.models import tiny_model

    assert demo_config("default", out_dir=tmp_path).variants == ()
    with pytest.raises(ConfigError, match=re.escape("variant='A review:' lacks a {label} slot")):
        DemoConfig(out_dir=tmp_path, variants=("A {label} review:", "A review:"))
    with pytest.raises(ConfigError, match=re.escape("its only slot must be {label}")):
        DemoConfig(out_dir=tmp_path, variants=("A {label} review of {film}:",))
    loaded = tiny_model(seed=0)  # 256 positions
    plain = DemoConfig(out_dir=tmp_path, max_text_tokens=200, shots=0)
    check_text_length(plain, loaded)
    # A variant 40 tokens longer than the template's instruction no longer fits.
    long_variant = "Here is a {label} movie review snippet" + " about the film" * 40 + ":\n"
    varied = dataclasses.replace(plain, variants=(long_variant,))
    with pytest.raises(ConfigError, match=r"max_text_tokens=200.*-token prompt"):
        check_text_length(varied, loaded)
    # Short variants do not excuse a long instruction: the features read the template's own.
    long_template = dataclasses.replace(
        plain, instruction=long_variant, variants=("A {label} review:",)
    )
    with pytest.raises(ConfigError, match=r"max_text_tokens=200.*-token prompt"):
        check_text_length(long_template, loaded)


def test_an_instruction_replaces_the_bundled_corpus_instruction(tmp_path: Path) -> None:
    """``--instruction`` without ``--data`` asks the bundled corpus's labels with it (it was
    once ignored there); one that the template cannot fill is refused with the config."""
    bundled = DemoConfig(out_dir=tmp_path).template
    asked = DemoConfig(out_dir=tmp_path, instruction="A {label} film review:\n").template
    assert asked.label_names == bundled.label_names
    assert asked.prefix("positive") == "A positive film review:\n"
    with pytest.raises(ConfigError, match=re.escape("'A review:\\n' lacks a {label} slot")):
        DemoConfig(out_dir=tmp_path, instruction="A review:\n")
    with pytest.raises(ConfigError, match=re.escape("its only slot must be {label}")):
        DemoConfig(out_dir=tmp_path, instruction="A {label} review of {film}:")
