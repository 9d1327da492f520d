"""scripts/mutation_test.py stages one module's mutmut run with the selection it is given."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "mutation_test", ROOT / "scripts" / "mutation_test.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def _mutmut(text: str) -> dict[str, object]:
    section: dict[str, object] = tomllib.loads(text)["tool"]["mutmut"]
    return section


def test_staging_narrows_only_the_module_by_default() -> None:
    script = _load()
    project = _mutmut((ROOT / "pyproject.toml").read_text())
    staged = _mutmut(script.staged_pyproject("protocol/accounting.py"))
    assert staged["only_mutate"] == ["src/fedsynth/protocol/accounting.py"]
    selection = "pytest_add_cli_args_test_selection"
    assert staged[selection] == project[selection]
    assert {k: v for k, v in staged.items() if k not in {"only_mutate"}} == {
        k: v for k, v in project.items() if k not in {"only_mutate"}
    }


def test_tests_option_narrows_the_selection() -> None:
    script = _load()
    tests = ["tests/protocol/test_accounting.py", "tests/protocol/test_accounting_mutants.py"]
    staged = _mutmut(script.staged_pyproject("protocol/secagg", tests))
    assert staged["only_mutate"] == ["src/fedsynth/protocol/secagg*"]
    assert staged["pytest_add_cli_args_test_selection"] == tests
