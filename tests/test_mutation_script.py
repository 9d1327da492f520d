"""scripts/mutation_test.py stages one module's mutmut run with the selection it is given."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from script_modules import load_script

ROOT = Path(__file__).resolve().parent.parent


def _mutmut(text: str) -> dict[str, object]:
    section: dict[str, object] = tomllib.loads(text)["tool"]["mutmut"]
    return section


def test_staging_narrows_only_the_module_by_default() -> None:
    script = load_script("mutation_test")
    project = _mutmut((ROOT / "pyproject.toml").read_text())
    staged = _mutmut(script.staged_pyproject("protocol/accounting.py"))
    assert staged["only_mutate"] == ["src/fedsynth/protocol/accounting.py"]
    selection = "pytest_add_cli_args_test_selection"
    assert staged[selection] == project[selection]
    assert {k: v for k, v in staged.items() if k not in {"only_mutate", "also_copy"}} == {
        k: v for k, v in project.items() if k not in {"only_mutate"}
    }
    assert staged["also_copy"] == [script.STAGED_PYPROJECT]


def test_tests_option_narrows_the_selection() -> None:
    script = load_script("mutation_test")
    tests = ["tests/protocol/test_accounting.py", "tests/protocol/test_accounting_mutants.py"]
    staged = _mutmut(script.staged_pyproject("protocol/secagg", tests))
    assert staged["only_mutate"] == ["src/fedsynth/protocol/secagg*"]
    assert staged["pytest_add_cli_args_test_selection"] == tests


def test_prepare_stages_a_narrowed_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # --tests once failed here: the staging's tests link shadowed the list of tests.
    script = load_script("mutation_test")
    monkeypatch.setattr(script, "WORK", tmp_path)
    tests = ["tests/protocol/test_accounting.py"]
    work = script.prepare("protocol/accounting.py", fresh=True, tests=tests)
    assert (work / "tests").resolve() == ROOT / "tests"
    # The mutated tree gets the project file beside its role dirs, as in a checkout (the app
    # pin finds its source tree by it).
    assert (work / script.STAGED_PYPROJECT).resolve() == ROOT / "pyproject.toml"
    assert (work / script.STAGED_PYPROJECT).parent == work / "src" / "fedsynth"
    staged = _mutmut((work / "pyproject.toml").read_text())
    assert staged["pytest_add_cli_args_test_selection"] == tests
    with pytest.raises(SystemExit, match="no such file"):
        script.prepare("protocol/accounting.py", fresh=False, tests=["tests/nothing_here.py"])
