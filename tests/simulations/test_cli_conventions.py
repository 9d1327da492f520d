"""The CLI's shared conventions: errors on stderr, progress in logs, quiet libraries, fetch-model.

* Every command group prints its errors as one ``error:`` line on stderr with exit status 2,
  and nothing on stdout (a script that reads stdout never takes an error for a result).
* Without a terminal (a file, a pipe, a log) progress is plain periodic lines without ANSI
  escape codes; the number of lines per phase is bounded.
* Flower's log lines, Ray's and transformers' notices and third-party deprecation warnings
  are hidden unless ``--verbose``; fedsynth's own warnings always show; the Flower simulation
  is started with the matching Ray and Flower log levels.
* ``fedsynth node fetch-model NAME`` prints the fingerprint the holder's ClientApp compares
  with a task manifest built by the coordinator.
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from fedsynth.protocol import cli_common
from fedsynth.protocol.cli_common import (
    LiveProgress,
    PlainProgress,
    configure_library_output,
    library_log_level,
    progress_display,
)
from fedsynth.protocol.features import PromptTemplate
from fedsynth.simulations.cli import app

runner = CliRunner()
ANSI = re.compile(r"\x1b\[")
TEMPLATE = PromptTemplate(
    instruction="A {label} note: ", label_names=(("pos", "positive"), ("neg", "negative"))
)


@pytest.fixture(autouse=True)
def _no_forced_terminal(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """CI may force colours; these tests are about output that is not a terminal."""
    for key in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(key, raising=False)
    # The CLI sets these for its process; keep them from leaking into other tests.
    for key in ("FEDSYNTH_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, os.environ.get(key, ""))
        if not os.environ[key]:
            monkeypatch.delenv(key)
    previous = cli_common._verbose
    flwr_filters = list(logging.getLogger("flwr").filters)
    yield
    cli_common._verbose = previous
    logging.getLogger("flwr").filters = flwr_filters


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _plain(clock: Clock) -> tuple[PlainProgress, io.StringIO]:
    buffer = io.StringIO()
    return PlainProgress(Console(file=buffer, width=200), clock=clock), buffer


# ---------------------------------------------------------------------------------------------
# Progress without a terminal
# ---------------------------------------------------------------------------------------------


def test_plain_progress_prints_a_bounded_number_of_lines_per_phase() -> None:
    clock = Clock()
    progress, buffer = _plain(clock)
    for done in range(401):  # 400 samples, one every 0.5 s: 200 s in all
        progress.update("generation", done=done, total=400)
        clock.now += 0.5
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "generation: 0/400 (0 %)"
    assert lines[-1] == "generation: 400/400 (100 %)"
    # One line per 10 % (never two within min_seconds), and the final one exactly once.
    assert len(lines) == 11
    assert "generation: 120/400 (30 %)" in lines
    assert [line for line in lines if "(100 %)" in line] == [lines[-1]]


def test_plain_progress_is_rate_limited_and_keeps_a_heartbeat() -> None:
    clock = Clock()
    progress, buffer = _plain(clock)
    for done in range(101):  # a fast phase: all of it within one second
        progress.update("fast", done=done, total=100)
        clock.now += 0.01
    assert buffer.getvalue().splitlines() == ["fast: 0/100 (0 %)", "fast: 100/100 (100 %)"]
    slow, slow_buffer = _plain(clock)
    for done in range(5):  # a slow phase: 1 % per 40 s, below the 10 % step
        slow.update("slow", done=done, total=100)
        clock.now += 40.0
    assert len(slow_buffer.getvalue().splitlines()) == 5  # a line every heartbeat, still moving


def test_plain_progress_prints_every_new_stage_and_unknown_totals() -> None:
    progress, buffer = _plain(Clock())
    progress.update("load model", done=0, total=None)
    progress.update("load model", done=0, total=None)  # no news, no line
    progress.update("load model", done=1, total=1)
    for stage, done in (("setup", 0), ("share_keys", 1), ("collect_masked", 2), ("unmask", 3)):
        progress(f"release-eps4: {stage}", done, 3)
    assert buffer.getvalue().splitlines() == [
        "load model ...",
        "load model: 1/1 (100 %)",
        "release-eps4: setup: 0/3 (0 %)",
        "release-eps4: share_keys: 1/3 (33 %)",
        "release-eps4: collect_masked: 2/3 (66 %)",
        "release-eps4: unmask: 3/3 (100 %)",
    ]


def test_progress_display_is_live_on_a_terminal_and_plain_otherwise() -> None:
    with progress_display(Console(file=io.StringIO(), force_terminal=True)) as live:
        assert isinstance(live, LiveProgress)
    with progress_display(Console(file=io.StringIO(), force_terminal=False)) as plain:
        assert isinstance(plain, PlainProgress)


@pytest.fixture(scope="module")
def release_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A release on tiny-llama, made by the coordinator's own manifest and release code."""
    from fedsynth.protocol.contribution import DecodedRelease
    from fedsynth.protocol.models import load_model
    from fedsynth.server.release import make_release, save_release
    from fedsynth.server.secure_round import RoundResult

    loaded = load_model("tiny-llama")
    manifest = _coordinator_manifest(loaded)
    vectors = np.random.default_rng(0).normal(size=(2, 2, loaded.hidden_size))
    decoded = DecodedRelease(vectors=vectors.astype(np.float32), counts=np.array([10.0, 12.0]))
    result = RoundResult(np.zeros(manifest.dim, dtype=np.uint64), survivors=[1, 2, 3], dropped=[])
    release = make_release(manifest, decoded, result, model_name=loaded.name)
    return save_release(release, tmp_path_factory.mktemp("rel") / "r.safetensors")


def _coordinator_manifest(loaded: Any) -> Any:
    """The task manifest the coordinator publishes for ``loaded`` (a zero public reference)."""
    from fedsynth.server.coordinator import PublicReference, TaskConfig, build_manifest

    config = TaskConfig(template=TEMPLATE, layers=(1, 2), epsilon=4.0, prior_per_label=2)
    reference = PublicReference(
        texts={"pos": ["a", "b"], "neg": ["c", "d"]},
        means=np.zeros((2, 2, loaded.hidden_size), dtype=np.float32),
        clip_norms=(2.0, 3.0),
        residual_norms=(5.0, 7.0),
    )
    return build_manifest(config, loaded, reference, (1, 2, 3), task_id="cli-conventions")


def test_generate_into_a_log_prints_plain_progress_lines(
    release_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    args = ["generate", "--release", str(release_file), "--out", str(out), "--n", "3"]
    result = runner.invoke(app, [*args, "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 6
    assert "generate: 0/6 (0 %)" in result.stdout
    assert "generate: 6/6 (100 %)" in result.stdout
    assert not ANSI.search(result.output)
    assert "━" not in result.output  # no bar drawn into the log


# ---------------------------------------------------------------------------------------------
# Errors: one line on stderr, status 2, in every command group
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ("inspect {tmp}/missing.safetensors", "missing.safetensors"),
        ("task validate {tmp}/missing.toml", "missing.toml"),
        ("ledger {tmp}/nothing-here", "nothing-here"),
        ("node status {tmp}/no-node", "no-node"),
        ("node fetch-model gpt-17", "known: gemma3-270m, smollm2-135m, tiny-gpt2"),
        (
            "coordinator add-node {tmp}/no-coord --name a --node-public-key {tmp}/n.pub "
            "--signing-public-key {tmp}/s.pub",
            "n.pub",
        ),
        (
            "pull --release r --n 1 --out {tmp}/o.jsonl --server 127.0.0.1:1 "
            "--token-file {tmp}/no.token --insecure",
            "no.token",
        ),
    ],
)
def test_errors_are_one_line_on_stderr(args: str, words: str, tmp_path: Path) -> None:
    result = runner.invoke(app, args.replace("{tmp}", str(tmp_path)).split())
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert words in lines[0]


# ---------------------------------------------------------------------------------------------
# Third-party output: hidden unless --verbose
# ---------------------------------------------------------------------------------------------

PROBE = """
import logging, os, sys, warnings
from fedsynth.simulations.cli import app
from fedsynth.protocol.cli_common import library_log_level
try:
    app(sys.argv[1:] + ["inspect", "-h"], standalone_mode=False)
except SystemExit:
    pass
from flwr.common.logger import log, warn_deprecated_feature
log(logging.INFO, "flwr-info-probe")
log(logging.ERROR, "flwr-error-probe")
warn_deprecated_feature("probe-feature")
warnings.warn_explicit("ray-future-probe", FutureWarning, "worker.py", 1,
                       module="ray._private.worker")
warnings.warn_explicit("lib-deprecation-probe", DeprecationWarning, "x.py", 1,
                       module="transformers.x")
warnings.warn_explicit("fedsynth-future-probe", FutureWarning, "y.py", 1,
                       module="fedsynth.server.y")
from transformers.utils import logging as hf_logging
hf_logging.get_logger("transformers.probe").warning("transformers-notice-probe")
print("level", library_log_level())
print("bars", os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"))
"""


def _probe(*flags: str) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "TRANSFORMERS_"))}
    for key in ("PYTHONWARNINGS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def test_library_output_is_hidden_without_verbose_and_shown_with_it() -> None:
    out, err = _probe()
    assert f"level {logging.ERROR}" in out
    assert "bars 1" in out  # stderr is a pipe: no tqdm bars from transformers in the log
    for hidden in (
        "flwr-info-probe",
        "probe-feature",
        "DEPRECATED",
        "ray-future-probe",
        "lib-deprecation-probe",
        "transformers-notice-probe",
    ):
        assert hidden not in err, hidden
    assert "flwr-error-probe" in err  # errors always show
    assert "fedsynth-future-probe" in err  # fedsynth's own warnings always show
    out, err = _probe("--verbose")
    assert f"level {logging.DEBUG}" in out
    assert "bars None" in out
    for shown in (
        "flwr-info-probe",
        "probe-feature",
        "ray-future-probe",
        "lib-deprecation-probe",
        "transformers-notice-probe",
        "fedsynth-future-probe",
    ):
        assert shown in err, shown


def test_the_flower_simulation_gets_the_configured_log_levels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flwr.simulation

    from fedsynth.simulations import demo as d

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kw: calls.append(kw))
    config = d.demo_config("quick", out_dir=tmp_path, model="tiny-llama", clients=3)
    data = d.split_data(config)
    d.write_partitions(data)

    def job(*_: object) -> None:
        return None

    with warnings.catch_warnings():
        configure_library_output(verbose=False)
        d.run_job_in_simulation(config, data, job)
        configure_library_output(verbose=True)
        d.run_job_in_simulation(config, data, job)
    quiet, verbose = calls
    assert quiet["backend_config"]["init_args"]["logging_level"] == logging.ERROR
    assert quiet["verbose_logging"] is False
    assert verbose["backend_config"]["init_args"]["logging_level"] == logging.INFO
    assert verbose["verbose_logging"] is True
    cli_common._verbose = None
    assert library_log_level() == logging.WARNING  # a library caller keeps Flower's default


def test_top_level_verbose_option_reaches_the_libraries(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.safetensors")
    with warnings.catch_warnings():
        runner.invoke(app, ["inspect", missing])
        assert library_log_level() == logging.ERROR
        assert cli_common._FLWR_FILTER in logging.getLogger("flwr").filters
        runner.invoke(app, ["--verbose", "inspect", missing])
        assert library_log_level() == logging.DEBUG
        assert cli_common._FLWR_FILTER not in logging.getLogger("flwr").filters


# ---------------------------------------------------------------------------------------------
# fedsynth node fetch-model
# ---------------------------------------------------------------------------------------------


def _fetched_fingerprint(name: str, cache: Path) -> str:
    result = runner.invoke(app, ["node", "fetch-model", name, "--cache", str(cache)])
    assert result.exit_code == 0, result.output
    found = re.findall(r"^fingerprint (sha256:[0-9a-f]{64})$", result.stdout, re.MULTILINE)
    assert len(found) == 1, result.stdout
    return str(found[0])


def test_fetch_model_prints_the_fingerprint_the_client_app_checks(tmp_path: Path) -> None:
    from fedsynth.client.contributor import manifest_model_matches
    from fedsynth.client.policy import ClientPolicy
    from fedsynth.protocol.errors import ModelMismatchError, PolicyViolationError
    from fedsynth.protocol.models import load_model, tokenizer_fingerprint

    printed = _fetched_fingerprint("tiny-llama", tmp_path / "cache")
    assert os.environ["FEDSYNTH_CACHE"] == str(tmp_path / "cache")
    # The coordinator's manifest for the same model carries exactly this fingerprint ...
    manifest = _coordinator_manifest(load_model("tiny-llama"))
    assert printed == manifest.model_fingerprint
    # The tokenizer's part is printed too, to tell which of the two differs.
    shown = runner.invoke(app, ["node", "fetch-model", "tiny-llama"]).stdout
    tokenizer = tokenizer_fingerprint(load_model("tiny-llama").tokenizer)
    assert f"of which the tokenizer's {tokenizer}" in shown
    # ... the node's model check accepts it, and a policy pinning it accepts the task.
    manifest_model_matches(load_model("tiny-llama"), manifest)
    ClientPolicy(allowed_fingerprints=(printed,)).check(manifest, spent=0.0, n_records=None)
    # Another model prints another fingerprint, which the same checks refuse.
    other = _fetched_fingerprint("tiny-gpt2", tmp_path / "cache")
    assert other != printed
    with pytest.raises(PolicyViolationError, match="allowed_fingerprints"):
        ClientPolicy(allowed_fingerprints=(other,)).check(manifest, spent=0.0, n_records=None)
    with pytest.raises(ModelMismatchError, match="model_fingerprint"):
        manifest_model_matches(load_model("tiny-gpt2"), manifest)


def test_fetch_model_never_asks_a_hub_for_an_unknown_name(tmp_path: Path) -> None:
    result = runner.invoke(app, ["node", "fetch-model", "google/gemma-3-270m"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: model='google/gemma-3-270m' is not a model fedsynth can fetch; known: "
        "gemma3-270m, smollm2-135m, tiny-gpt2, tiny-llama (or a local model directory)"
    )
    assert os.environ["HF_HUB_OFFLINE"] == "1"
