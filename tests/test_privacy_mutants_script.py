"""scripts/privacy_mutants.py cannot rot: its patches match the source, its tests exist.

The mutants themselves run in the script (minutes), not here; this only checks, in seconds,
that every named break still applies to the current code and that the copy it tests imports
the copy's code rather than the installed package.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from script_modules import load_script

ROOT = Path(__file__).resolve().parent.parent

pm = load_script("privacy_mutants")


def test_every_patch_matches_the_source_once_and_every_selected_test_exists() -> None:
    assert pm.check_mutants(ROOT) == []


def test_the_required_privacy_breaks_are_all_there() -> None:
    names = {mutant.name for mutant in pm.MUTANTS}
    assert {
        "masks-removed",
        "prg-ignores-key",
        "no-noise-vectors",
        "no-noise-votes",
        "manifest-scale-half",
        "variance-scale-half",
        "holder-skips-verification",
        "round-key-signature-skipped",
        "consistency-signatures-skipped",
        "consistency-set-skipped",
    } <= names
    masks = next(m for m in pm.MUTANTS if m.name == "masks-removed")
    assert {p.path for p in masks.patches} == {
        "protocol/secagg/client.py",
        "protocol/secagg/server.py",
    }


def test_a_snippet_that_does_not_match_once_stops_the_script(tmp_path: Path) -> None:
    patch = pm.Patch("f.py", "x = 1\n", "x = 2\n")
    assert pm.patched_text("a = 0\nx = 1\n", patch) == "a = 0\nx = 2\n"
    with pytest.raises(pm.PatchError, match="found 0 times"):
        pm.patched_text("a = 0\n", patch)
    with pytest.raises(pm.PatchError, match="found 2 times"):
        pm.patched_text("x = 1\nx = 1\n", patch)
    with pytest.raises(pm.PatchError, match="replaced by itself"):
        pm.patched_text("x = 1\n", pm.Patch("f.py", "x = 1\n", "x = 1\n"))
    (tmp_path / "f.py").write_text("y = 3\n")
    with pytest.raises(pm.PatchError, match=r"f\.py"):
        pm.apply_patches(tmp_path, [patch])
    assert (tmp_path / "f.py").read_text() == "y = 3\n"


def test_check_names_a_stale_snippet_and_a_missing_test() -> None:
    stale = pm.Mutant(
        name="stale",
        summary="",
        patches=(pm.Patch("protocol/secagg/crypto.py", "no such line\n", "x\n"),),
        tests=("tests/protocol/test_secagg_active.py::test_that_does_not_exist",),
    )
    problems = pm.check_mutants(ROOT, [stale, stale])
    assert any("used twice" in p for p in problems)
    assert any("found 0 times" in p for p in problems)
    assert any("test_that_does_not_exist" in p for p in problems)


def test_the_copy_imports_its_own_code_not_the_installed_package(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    stage = pm.make_copy(copy)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(stage)
    probe = "; ".join(
        (
            "import fedsynth, fedsynth.protocol.errors as m",
            "print(m.__file__)",
            "print(*fedsynth.__path__)",
        )
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=copy, env=env, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    module_file, package_path = Path(out[0]).resolve(), Path(out[1]).resolve()
    assert module_file == (copy / "protocol" / "errors.py").resolve()
    assert package_path.is_relative_to(copy.resolve())
