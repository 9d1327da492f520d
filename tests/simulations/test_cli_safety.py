"""The command line never shows private text, spends nothing before its checks, keeps releases.

* Errors are one line naming the path: no traceback with local variables (which held private
  records, or the whole model) for a stray file in ``--out`` or an unwritable ``--out``.
* The holders' private files are written owner-only (0600), only after every check passed, and
  removed again when the run fails.
* Every setting and data check runs before anything is charged: no release, no ledger row and
  no holder budget exists after a refused run.
* ``generate`` refuses to overwrite its release, refuses ``--n <= 0`` and checks the model
  before it touches the output file; ``inspect`` and ``generate`` refuse a tampered release.
"""

from __future__ import annotations

import json
import math
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedsynth.protocol.contribution import DecodedRelease
from fedsynth.protocol.features import PromptTemplate
from fedsynth.protocol.manifest import PrivacySpec, TaskManifest, array_sha256
from fedsynth.protocol.models import LoadedModel, tiny_model
from fedsynth.server.ledger import PrivacyLedger, ledger_path
from fedsynth.server.release import make_release, save_release
from fedsynth.server.secure_round import RoundResult
from fedsynth.simulations.cli import app
from fedsynth.simulations.demo import demo_config, prepare_data
from tests.server.releases import make_test_release

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SECRET = "zqx-private-record-sentinel"  # appears in every private record of these tests
runner = CliRunner()
QUICK = ("--quick", "--embedder", "hashing-16")
LAYERS_99 = ("--layers", "1,99", "--quick")


def _said(result: object) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(str(result.output).split())  # type: ignore[attr-defined]


def _data(path: Path, labels: dict[str, int]) -> Path:
    """A user data file with ``labels[label]`` records per label, each holding SECRET."""
    rows = [
        {"text": f"{SECRET} {label} number {i}", "label": label}
        for label, count in labels.items()
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The real console entry point in a fresh process (tracebacks printed as users see them)."""
    return subprocess.run(
        [sys.executable, "-m", "fedsynth.simulations", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _nothing_spent(out: Path) -> None:
    """No release, no ledger row, no holder budget and no holder file in ``out``."""
    if not out.exists():
        return
    assert not list(out.rglob("*.safetensors")), "a release was written"
    ledger = ledger_path(out)
    charged = ledger.exists() and PrivacyLedger(ledger).rows() != []
    assert not charged and not (out / "ledger.jsonl").exists(), (
        "the coordinator's ledger was charged"
    )
    assert not list(out.rglob("budget*")), "a holder's budget was charged"
    assert not list(out.rglob("partition-*.jsonl")), "a private holder file was left behind"


# ---------------------------------------------------------------------------------------------
# Nothing private in errors
# ---------------------------------------------------------------------------------------------


def test_stray_file_in_out_gives_one_line_without_record_text(tmp_path: Path) -> None:
    data = _data(tmp_path / "mine.jsonl", {"a": 30, "b": 30})
    out = tmp_path / "out"
    out.mkdir()
    (out / "clients").write_text("a stray file where the holders' folder goes\n")
    proc = _cli("demo", "--out", str(out), "--data", str(data), "--model", "tiny-llama")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-2000:]
    assert SECRET not in text
    assert "Traceback" not in text
    assert str(out / "clients") in text
    assert len(text.strip().splitlines()) <= 3, text[-2000:]
    _nothing_spent(out)


def test_generate_to_an_unwritable_path_gives_one_line(tmp_path: Path) -> None:
    release = save_release(_release(tiny_model(seed=0)), tmp_path / "r.safetensors")
    target = "/proc/fedsynth-cannot-write-here.jsonl"
    proc = _cli("generate", "--release", str(release), "--n", "1", "--out", target)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-2000:]
    assert target in text
    assert "Traceback" not in text and "LlamaForCausalLM" not in text
    assert len(text) < 500, text[-2000:]


def test_typer_never_shows_locals() -> None:
    assert app.pretty_exceptions_show_locals is False


# ---------------------------------------------------------------------------------------------
# Private copies: 0600, only after the checks, removed on failure
# ---------------------------------------------------------------------------------------------


def test_holder_files_are_owner_only(tmp_path: Path) -> None:
    data = _data(tmp_path / "mine.jsonl", {"a": 20, "b": 20})
    config = demo_config("quick", out_dir=tmp_path / "out", data_path=data, clients=3)
    folder = config.out_dir / "clients"
    folder.mkdir(parents=True)
    stale = folder / "partition-0.jsonl"
    stale.write_text("old\n")
    stale.chmod(0o644)
    prepared = prepare_data(config)
    assert stat.S_IMODE(prepared.partition_dir.stat().st_mode) == 0o700
    for i in range(3):
        path = prepared.partition_dir / f"partition-{i}.jsonl"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_failing_run_removes_the_holder_files(tmp_path: Path) -> None:
    data = _data(tmp_path / "mine.jsonl", {"a": 20, "b": 20})
    out = tmp_path / "out"
    # Layer 99 does not exist in the tiny model: the run fails after the holder files exist.
    result = runner.invoke(
        app,
        ["demo", "--out", str(out), "--data", str(data), "--model", "tiny-llama", *LAYERS_99],
    )
    assert result.exit_code == 2, result.output
    assert "99" in _said(result)
    assert (out / "clients").is_dir()
    _nothing_spent(out)


# ---------------------------------------------------------------------------------------------
# Nothing spent before the checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "labels", "needle"),
    [
        (["--strength", "-1"], {"a": 20, "b": 20}, "strength=-1"),
        (["--samples", "0"], {"a": 20, "b": 20}, "synthetic_per_label"),
        (["--drop", "2", "--clients", "3"], {"a": 20, "b": 20}, "threshold t=2"),
        ([], {"a": 40}, "at least 2"),  # single-label data
        ([], {"a": 20, "b": 1}, "label 'b' has 0 held-out records"),
        (["--method", "pe", "--temperature", "0"], {"a": 20, "b": 20}, "temperature=0"),
        (
            ["--method", "pe", "--init", "steered", "--temperature", "0"],
            {"a": 20, "b": 20},
            "temperature=0",
        ),
        # Longer than the tiny model's 256-position context after the prompt.
        (["--max-text-tokens", "250"], {"a": 20, "b": 20}, "max_text_tokens=250"),
        (["--method", "pe", "--max-text-tokens", "250"], {"a": 20, "b": 20}, "max_text_tokens=250"),
        (["--method", "pe", "--output", "0"], {"a": 20, "b": 20}, "output_per_label=0"),
        # Settings PE would ignore are refused, not dropped.
        (["--method", "pe", "--shots", "0"], {"a": 20, "b": 20}, "--shots: settings of the"),
        (["--method", "pe", "--select", "0.5"], {"a": 20, "b": 20}, "--select: settings of"),
        (
            ["--method", "pe", "--variant", "A {label} one:", "--shots", "1"],
            {"a": 20, "b": 20},
            "--shots, --variant:",
        ),
    ],
)
def test_bad_settings_and_data_are_refused_before_anything_is_spent(
    tmp_path: Path, args: list[str], labels: dict[str, int], needle: str
) -> None:
    data = _data(tmp_path / "mine.jsonl", labels)
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["demo", "--out", str(out), "--data", str(data), "--model", "tiny-llama", *QUICK, *args],
    )
    assert result.exit_code == 2, result.output
    assert needle in _said(result)
    assert SECRET not in result.output
    _nothing_spent(out)


# ---------------------------------------------------------------------------------------------
# generate and inspect
# ---------------------------------------------------------------------------------------------

TEMPLATE = PromptTemplate(
    instruction="A {label} note: ", label_names=(("pos", "positive"), ("neg", "negative"))
)


def _release(loaded: LoadedModel, *, epsilon: float = 2.0):  # type: ignore[no-untyped-def]
    layers = (1, 2)
    reference = np.zeros((2, len(layers), loaded.hidden_size), dtype=np.float32)
    manifest = TaskManifest(
        task_id="cli-release",
        model_name=loaded.name,
        model_fingerprint=loaded.fingerprint,
        hidden_size=loaded.hidden_size,
        template=TEMPLATE,
        layers=layers,
        max_text_tokens=16,
        clip_norms=(2.0, 3.0),
        residual_norms=(5.0, 7.0),
        count_weight=0.5,
        scale=1000.0,
        bits=64,
        node_ids=(1, 2, 3),
        privacy=PrivacySpec(
            epsilon=epsilon,
            delta=1e-5,
            mode="distributed",
            threshold=2,
            total_variance=0.0 if math.isinf(epsilon) else 400.0,
            noise_multiplier=1.0,
            l2_sensitivity=20.0,
            l1_sensitivity=200.0,
            accountant="rdp",
        ),
        reference_sha256=array_sha256(reference),
    )
    vectors = np.random.default_rng(0).normal(size=reference.shape).astype(np.float32)
    decoded = DecodedRelease(vectors=vectors, counts=np.array([10.0, 12.0]))
    result = RoundResult(np.zeros(manifest.dim, dtype=np.uint64), survivors=[1, 2, 3], dropped=[])
    return make_release(manifest, decoded, result, model_name=loaded.name)


@pytest.fixture(scope="module")
def release_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_release(
        _release(tiny_model(seed=0)), tmp_path_factory.mktemp("rel") / "r.safetensors"
    )


def _generate(release: Path, out: Path, *extra: str) -> object:
    args = ["generate", "--release", str(release), "--out", str(out), "--max-new-tokens", "3"]
    return runner.invoke(app, [*args, *extra])


def test_generate_refuses_to_overwrite_its_release(tmp_path: Path, release_file: Path) -> None:
    before = release_file.read_bytes()
    link = tmp_path / "link.safetensors"
    link.symlink_to(release_file)
    for target in (release_file, link, tmp_path / ".." / tmp_path.name / "link.safetensors"):
        result = _generate(release_file, target, "--n", "1")
        assert result.exit_code == 2, result.output  # type: ignore[attr-defined]
        assert "would destroy the release" in _said(result)
        assert release_file.read_bytes() == before


@pytest.mark.parametrize("n", ["0", "-1"])
def test_generate_refuses_n_below_one(tmp_path: Path, release_file: Path, n: str) -> None:
    target = tmp_path / "out.jsonl"
    result = _generate(release_file, target, "--n", n)
    assert result.exit_code == 2, result.output  # type: ignore[attr-defined]
    assert f"n={n}" in _said(result)
    assert not target.exists()


def test_generate_checks_the_model_before_touching_the_output(tmp_path: Path) -> None:
    other = save_release(_release(tiny_model(seed=1)), tmp_path / "other.safetensors")
    target = tmp_path / "out.jsonl"
    # The release names tiny-llama-1 (not loadable by name); tiny-llama has other weights.
    result = _generate(other, target, "--n", "1", "--model", "tiny-llama")
    assert result.exit_code == 2, result.output  # type: ignore[attr-defined]
    assert "model_fingerprint" in _said(result)
    assert not target.exists()


def test_generate_writes_and_counts_what_it_wrote(tmp_path: Path, release_file: Path) -> None:
    target = tmp_path / "out.jsonl"
    result = _generate(release_file, target, "--n", "2")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(rows) == 4 and {r["label"] for r in rows} == {"pos", "neg"}
    assert "wrote 4 samples" in _said(result)


def test_generate_with_shots_writes_and_reports_them(tmp_path: Path, release_file: Path) -> None:
    target = tmp_path / "out.jsonl"
    result = _generate(release_file, target, "--n", "2", "--shots", "1", "--seed", "3")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(rows) == 4 and [r["label"] for r in rows] == ["pos", "pos", "neg", "neg"]
    report = json.loads(target.with_name("out.jsonl.report.json").read_text())
    assert report["generation"]["shots"] == 1 and report["generation"]["shot_pool"] == 2
    assert "shot pool: 4/4" in _said(result)  # both labels' pools, reported as they are made
    bad = tmp_path / "bad.jsonl"
    refused = _generate(release_file, bad, "--n", "2", "--shots", "-1")
    assert refused.exit_code == 2, refused.output  # type: ignore[attr-defined]
    assert "shots=-1" in _said(refused) and not bad.exists()


def test_inspect_and_generate_refuse_a_tampered_release(tmp_path: Path, release_file: Path) -> None:
    ok = runner.invoke(app, ["inspect", str(release_file)])
    assert ok.exit_code == 0 and "release cli-release" in ok.output
    data = bytearray(release_file.read_bytes())
    data[-3] ^= 0x40  # inside the stored tensors
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(bytes(data))
    result = runner.invoke(app, ["inspect", str(tampered)])
    assert result.exit_code == 2
    assert "digest mismatch" in _said(result)
    target = tmp_path / "out.jsonl"
    result = _generate(tampered, target, "--n", "1")
    assert result.exit_code == 2  # type: ignore[attr-defined]
    assert "digest mismatch" in _said(result)
    assert not target.exists()


def test_generate_with_variants_writes_and_reports_them(tmp_path: Path, release_file: Path) -> None:
    target = tmp_path / "out.jsonl"
    variants = ["A {label} text, short:\\n", "A {label} text, long:\\n"]
    extra = [arg for v in variants for arg in ("--variant", v)]
    result = _generate(release_file, target, "--n", "3", *extra)
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    assert len(target.read_text().splitlines()) == 6
    report = json.loads(target.with_name("out.jsonl.report.json").read_text())
    # A typed \\n is a line break, as in --instruction.
    assert report["generation"]["variants"] == [v.replace("\\n", "\n") for v in variants]


@pytest.mark.parametrize(
    ("variant", "said"),
    [
        ("A text:\\n", "lacks a {label} slot"),
        ("A {label} text on {topic}:\\n", "its only slot must be {label}"),
    ],
)
def test_generate_refuses_a_bad_variant_before_loading_the_model(
    tmp_path: Path, release_file: Path, variant: str, said: str
) -> None:
    target = tmp_path / "out.jsonl"
    # The model named does not exist: the variant is refused before it is looked for.
    result = _generate(release_file, target, "--n", "1", "--variant", variant, "--model", "nope")
    assert result.exit_code == 2, result.output  # type: ignore[attr-defined]
    assert said in _said(result)
    assert not target.exists()


def test_inspect_names_a_directory_or_empty_path(tmp_path: Path) -> None:
    for given in (str(tmp_path), ""):  # typer turns an empty path into "."
        result = runner.invoke(app, ["inspect", given])
        assert result.exit_code == 2
        assert "is a directory, not a release file" in _said(result)


def test_generate_samples_as_long_as_the_release_declares(
    tmp_path: Path, release_file: Path
) -> None:
    # Without --max-new-tokens a sample is at most as long as the records the release
    # describes (its manifest's max_text_tokens, 16 here), not a fixed length.
    target = tmp_path / "out.jsonl"
    args = ["generate", "--release", str(release_file), "--out", str(target), "--n", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(target.with_name(target.name + ".report.json").read_text())
    assert report["generation"]["max_new_tokens"] == 16
    result = runner.invoke(app, [*args, "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    report = json.loads(target.with_name(target.name + ".report.json").read_text())
    assert report["generation"]["max_new_tokens"] == 5


@pytest.mark.parametrize(
    ("option", "value"), [("--max-new-tokens", "0"), ("--batch-size", "0"), ("--select", "0")]
)
def test_generate_refuses_bad_sampling_settings_first(
    tmp_path: Path, option: str, value: str
) -> None:
    missing = tmp_path / "no-such-release.safetensors"  # never opened: refused before
    target = tmp_path / "out.jsonl"
    args = ["generate", "--release", str(missing), "--out", str(target), "--n", "1"]
    result = runner.invoke(app, [*args, option, value])
    assert result.exit_code == 2, result.output
    assert f"{option[2:].replace('-', '_')}={value}" in _said(result)
    assert not target.exists()


def test_generate_with_selection_keeps_n_per_label(tmp_path: Path, release_file: Path) -> None:
    target = tmp_path / "out.jsonl"
    result = _generate(release_file, target, "--n", "2", "--select", "0.5", "--shots", "0")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    labels = [r["label"] for r in rows]
    assert len(rows) == 2 * len(set(labels)) and all(labels.count(lb) == 2 for lb in labels)
    report = json.loads(target.with_name(target.name + ".report.json").read_text())
    assert report["generation"]["select"] == 0.5
    assert "warning" not in _said(result)  # two classes: selection was seen to help there


def test_generate_warns_of_selection_on_more_than_two_classes(tmp_path: Path) -> None:
    three = save_release(make_test_release(tiny_model(seed=0)), tmp_path / "three.safetensors")
    target = tmp_path / "out.jsonl"
    result = _generate(three, target, "--n", "1", "--select", "0.5", "--shots", "0")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    assert "warning: select=0.5 with 3 classes" in _said(result)
    assert len(target.read_text().splitlines()) == 3
