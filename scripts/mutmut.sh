#!/usr/bin/env bash
# Mutation testing (mutmut) of the privacy-critical modules against the fast tests.
# Usage: scripts/mutmut.sh [--jobs N] [--fresh] [--report] [MODULE ...]
#   MODULE: a repository path such as protocol/mechanisms.py or protocol/secagg (default: all of
#   [tool.mutmut] only_mutate). Each module runs and resumes in build/mutmut/<module>/; see
#   scripts/mutation_test.py and docs/mutation-testing.md.
# Named semantic privacy mutants (masks removed, PRG key ignored, no noise, scale/2, skipped
# holder checks) are not mutmut's: run .venv/bin/python scripts/privacy_mutants.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python scripts/mutation_test.py "$@"
