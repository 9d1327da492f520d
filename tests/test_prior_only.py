"""The prior-alone benchmark: demo options parsed strictly, a whole run on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.prior_only import demo_overrides, main


def test_demo_options_become_config_fields() -> None:
    got = demo_overrides(
        ["--corpus", "bbc_news", "--samples", "80", "--instruction", "A {label}:\\n"]
    )
    assert got == {"corpus": "bbc_news", "synthetic_per_label": 80, "instruction": "A {label}:\n"}
    assert demo_overrides(["--data", "x.jsonl"]) == {"data_path": Path("x.jsonl")}
    with pytest.raises(SystemExit, match="--epsilon: expected one of"):
        demo_overrides(["--epsilon", "4"])
    with pytest.raises(SystemExit, match="in pairs"):
        demo_overrides(["--samples"])


def test_a_tiny_run_scores_the_prior_on_each_seed_and_reuses_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--seeds", "0", "1", "--out", str(tmp_path), "--preset", "quick", "--"]
    main([*argv, "--model", "tiny-llama", "--samples", "4", "--max-text-tokens", "12"])
    rows = [json.loads((tmp_path / f"seed-{s}" / "prior_scores.json").read_text()) for s in (0, 1)]
    assert [r["seed"] for r in rows] == [0, 1]
    assert all(r["n"] == 8 and 0.0 <= r["tstr_accuracy"] <= 1.0 for r in rows)
    assert all(0.0 <= r["real_tstr_accuracy"] <= 1.0 for r in rows)
    printed = capsys.readouterr().out
    assert "tstr_accuracy:" in printed and "real_tstr_accuracy:" in printed
    # A second call reads the seeds back instead of generating again.
    (tmp_path / "seed-0" / "prior_scores.json").write_text(json.dumps({**rows[0], "n": -1}))
    main([*argv, "--model", "tiny-llama"])
    assert json.loads((tmp_path / "seed-0" / "prior_scores.json").read_text())["n"] == -1
