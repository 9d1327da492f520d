"""Mutation testing of the privacy-critical modules with mutmut, one module at a time.

Usage (from anywhere; scripts/mutmut.sh calls this with the project's virtual environment)::

    scripts/mutmut.sh                          # every module in [tool.mutmut] only_mutate
    scripts/mutmut.sh protocol/mechanisms.py   # one module (or several)
    scripts/mutmut.sh --jobs 2 protocol/secagg # a package: every file under it
    scripts/mutmut.sh --fresh client/policy.py # forget earlier results of that module
    scripts/mutmut.sh --report protocol/mechanisms.py  # print the score of a finished run
    scripts/mutmut.sh --retest-survivors protocol/mechanisms.py  # after adding tests
    scripts/mutmut.sh --tests tests/protocol/test_accounting.py protocol/accounting.py

Why the staging directory: the role dirs (protocol/, client/, ...) are mapped onto the import
names fedsynth.* by the build backend, while mutmut names a mutant after its file path and only
activates it when that name equals the function's ``__module__``. Each module therefore runs in
build/mutmut/<module>/, where src/fedsynth/<role> links to the role dir (mutmut strips the
"src." prefix, so protocol/mechanisms.py becomes fedsynth.protocol.mechanisms) and mutmut puts
its mutated copy, mutants/src, ahead of the editable install on sys.path. A separate directory
per module lets several modules run in parallel and each resume where it stopped.

The score is (killed + timeout) / (killed + timeout + survived + no tests + suspicious); the
surviving mutants are listed with their diffs in build/mutmut/<module>/survivors.txt.
``--tests`` narrows the test selection of that module's run (fewer tests can only let more
mutants survive, so a score measured that way is a lower bound).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("protocol", "client", "server", "simulations")
WORK = ROOT / "build" / "mutmut"

# mutmut's exit codes (mutmut.stats.status_by_exit_code) grouped for the score.
KILLED = {1: "killed", 3: "killed", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout"}
LIVE = {0: "survived", 5: "no tests", 33: "no tests", 35: "suspicious"}


@dataclass(frozen=True)
class Score:
    """Counts of one module's mutants by outcome."""

    module: str
    counts: Counter[str]
    survivors: tuple[str, ...]

    @property
    def killed(self) -> int:
        """Mutants some test caught (a timeout counts: the mutant changed behaviour)."""
        return self.counts["killed"] + self.counts["timeout"]

    @property
    def scored(self) -> int:
        """Mutants that count towards the score (not skipped, not left unchecked)."""
        return self.killed + sum(self.counts[s] for s in ("survived", "no tests", "suspicious"))

    @property
    def score(self) -> float:
        """Fraction of scored mutants that were killed."""
        return self.killed / self.scored if self.scored else 0.0


def mutmut_config() -> dict[str, object]:
    """The [tool.mutmut] section of the project's pyproject.toml."""
    with (ROOT / "pyproject.toml").open("rb") as handle:
        config: dict[str, object] = tomllib.load(handle)["tool"]["mutmut"]
    return config


def module_glob(module: str) -> str:
    """The only_mutate pattern (staging-relative) of a repository path such as protocol/secagg."""
    path = module.strip("/")
    if path.endswith(".py"):
        return f"src/fedsynth/{path}"
    return f"src/fedsynth/{path}*"


def default_modules() -> list[str]:
    """Every module named in [tool.mutmut] only_mutate, as repository paths."""
    patterns = mutmut_config()["only_mutate"]
    assert isinstance(patterns, list)
    return [str(p).removeprefix("src/fedsynth/").rstrip("*") for p in patterns]


def slug(module: str) -> str:
    """A directory name for one module."""
    return module.strip("/").removesuffix(".py").replace("/", ".")


STAGED_PYPROJECT = "src/fedsynth/pyproject.toml"
"""Where the staging tree links the project file (copied into mutmut's mutated tree)."""


def _replace_list(lines: list[str], key: str, values: list[str]) -> None:
    """Replace the multi-line TOML list ``key = [...]`` of [tool.mutmut] by ``values``."""
    start = lines.index("[tool.mutmut]")
    first = next(i for i in range(start, len(lines)) if lines[i].startswith(f"{key} = ["))
    last = next(i for i in range(first, len(lines)) if lines[i].rstrip() == "]")
    lines[first : last + 1] = [f"{key} = {json.dumps(values)}"]


def staged_pyproject(module: str, tests: list[str] | None = None) -> str:
    """The project's pyproject.toml with only_mutate narrowed to one module.

    Given ``tests``, the test selection is narrowed to them too.
    """
    lines = (ROOT / "pyproject.toml").read_text(encoding="utf-8").splitlines()
    _replace_list(lines, "only_mutate", [module_glob(module)])
    if tests:
        _replace_list(lines, "pytest_add_cli_args_test_selection", tests)
    # The mutated copy gets the project file beside its role dirs, as a checkout has it, so
    # code that finds its source tree (client/app_pin.py) finds the copy the tests import.
    lines.insert(lines.index("[tool.mutmut]") + 1, f'also_copy = ["{STAGED_PYPROJECT}"]')
    staged = "\n".join(lines) + "\n"
    tomllib.loads(staged)  # still valid TOML
    return staged


def prepare(module: str, *, fresh: bool, tests: list[str] | None = None) -> Path:
    """Create (or reuse) the staging directory of one module."""
    target = ROOT / module
    if not target.exists() and not Path(f"{target}.py").exists():
        sys.exit(f"module {module!r}: no such file or package under {ROOT}")
    work = WORK / slug(module)
    if fresh and work.exists():
        shutil.rmtree(work)
    (work / "src" / "fedsynth").mkdir(parents=True, exist_ok=True)
    for role in ROLES:
        link = work / "src" / "fedsynth" / role
        if not link.is_symlink():
            link.symlink_to(ROOT / role, target_is_directory=True)
    project_link = work / STAGED_PYPROJECT
    if not project_link.is_symlink():
        project_link.symlink_to(ROOT / "pyproject.toml")
    test_link = work / "tests"
    if not test_link.is_symlink():
        test_link.symlink_to(ROOT / "tests", target_is_directory=True)
    for test in tests or []:
        if not (ROOT / test.split("::", 1)[0]).exists():
            sys.exit(f"--tests {test!r}: no such file under {ROOT}")
    (work / "pyproject.toml").write_text(staged_pyproject(module, tests), encoding="utf-8")
    return work


def run_mutmut(work: Path, *, jobs: int, names: tuple[str, ...] = ()) -> int:
    """Run (or resume) mutmut in a staging directory; return its exit status.

    With ``names`` only those mutants run, even if they have a result already (mutmut keeps
    earlier results otherwise, so a test added later needs this to count).
    """
    mutmut = Path(sys.executable).with_name("mutmut")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    command = [str(mutmut), "run", "--max-children", str(jobs), *names]
    return subprocess.run(command, cwd=work, env=env, check=False).returncode


def score(module: str, work: Path) -> Score:
    """Read the outcome of every mutant of one module from mutmut's result files."""
    counts: Counter[str] = Counter()
    survivors: list[str] = []
    stem = module.strip("/").removesuffix(".py")
    root = work / "mutants" / "src" / "fedsynth"
    metas = sorted(root.glob(f"{stem}.py.meta")) + sorted(root.glob(f"{stem}/**/*.py.meta"))
    for meta in metas:
        results = json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"]
        for name, code in results.items():
            status = (
                KILLED.get(code)
                or LIVE.get(code)
                or ("not checked" if code is None else "skipped" if code == 34 else "suspicious")
            )
            counts[status] += 1
            if status in LIVE.values():
                survivors.append(f"{name}: {status}")
    return Score(module=module, counts=counts, survivors=tuple(sorted(survivors)))


def write_survivors(work: Path, result: Score) -> Path:
    """List every live mutant with its diff (``mutmut show``) in survivors.txt."""
    mutmut = Path(sys.executable).with_name("mutmut")
    parts = []
    for entry in result.survivors:
        name = entry.split(":", 1)[0]
        shown = subprocess.run(
            [str(mutmut), "show", name], cwd=work, capture_output=True, text=True, check=False
        )
        parts.append(shown.stdout.strip() or f"# {entry}")
    path = work / "survivors.txt"
    path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return path


def main() -> int:
    """Run mutmut per module and print each score and the total."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="repository paths, e.g. protocol/mechanisms.py")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="mutants at once")
    parser.add_argument("--fresh", action="store_true", help="discard earlier results first")
    parser.add_argument("--report", action="store_true", help="only print the stored results")
    parser.add_argument(
        "--retest-survivors",
        action="store_true",
        help="run the surviving mutants again (after adding tests)",
    )
    parser.add_argument(
        "--tests",
        action="append",
        metavar="PATH",
        help="narrow the test selection to this test file (repeat it; a lower-bound score)",
    )
    args = parser.parse_args()
    modules = args.modules or default_modules()
    results = []
    for module in modules:
        work = prepare(module, fresh=args.fresh and not args.report, tests=args.tests)
        if not args.report:
            print(f"== mutmut: {module} (in {work.relative_to(ROOT)})", flush=True)
            status = run_mutmut(work, jobs=args.jobs)
            live = tuple(entry.split(":", 1)[0] for entry in score(module, work).survivors)
            if status == 0 and args.retest_survivors and live:
                print(f"== retesting {len(live)} surviving mutants of {module}", flush=True)
                status = run_mutmut(work, jobs=args.jobs, names=live)
            if status != 0:
                print(f"mutmut stopped with status {status} on {module}", file=sys.stderr)
                return status
        result = score(module, work)
        survivors = write_survivors(work, result)
        results.append(result)
        detail = ", ".join(f"{k} {v}" for k, v in sorted(result.counts.items()))
        print(
            f"{module}: score {result.score:.1%} ({result.killed}/{result.scored}; {detail}); "
            f"survivors in {survivors.relative_to(ROOT)}"
        )
    killed = sum(r.killed for r in results)
    scored = sum(r.scored for r in results)
    if scored:
        print(f"mutation score: {killed / scored:.1%} ({killed}/{scored} mutants killed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
