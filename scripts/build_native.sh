#!/usr/bin/env bash
# Build the project's two native extensions, each only when its source (or this script)
# changed:
#   - the router's data plane: router/native/dataplane.cc -> router/_dataplane*.so, an
#     HTTP/2 proxy on Debian's nghttp2;
#   - the engine's CPU kernels: python_backends/engine/native/cpu_kernels.cc ->
#     python_backends/engine/_cpu_kernels*.so, against the installed torch.
# Without a compiler or headers (and no apt-get to install them) it says so and exits 0:
# the router then carries inference through grpcio (data_plane = "auto") and the engine
# runs its plain PyTorch path.
#
# `build_native.sh cpu-kernels-variant DIR NAME [g++ flags...]` instead compiles the CPU
# kernels once more, as the module NAME in DIR, with the extra flags (no stamp, nothing
# installed): e.g. the AVX2 build on an AVX-512 machine, for the tests of both.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
SUFFIX="$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
PY_INCLUDE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
STAMPS="$ROOT/.cache/setup"

# torch's version (a build's stamp names it), then what the torch extension compiles and
# links with: torch's headers and libraries; -fopenmp for at::parallel_for, whose libgomp is
# torch's own at run time (same soname, loaded first). One interpreter start for both.
mapfile -t TORCH_INFO < <("$PY" - <<'EOF' 2>/dev/null
import torch
from torch.utils.cpp_extension import include_paths, library_paths
print(torch.__version__)
for path in include_paths():  # -isystem: no warnings from torch's own headers
    print(f"-isystem{path}")
for path in library_paths():
    print(f"-L{path}")
    print(f"-Wl,-rpath,{path}")
print(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
EOF
)
TORCH_VERSION="${TORCH_INFO[0]:-}"
TORCH_FLAGS=("${TORCH_INFO[@]:1}")

# Debian packages $@ installed, or an explanation and a non-zero status.
have_packages() {
  local missing=() package
  for package in "$@"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  ((${#missing[@]})) || return 0
  if command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
    echo "installing ${missing[*]} (apt) ..."
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || {
      apt-get update -q >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
    }
    return 0
  fi
  echo "warning: ${missing[*]} missing and cannot be installed here" >&2
  return 1
}

# build WHAT SOURCE MODULE FALLBACK PACKAGES... -- COMPILER ARGS...
# Compiles SOURCE into MODULE's extension file (MODULE: a dotted import name) unless it is up
# to date, then checks that it imports; FALLBACK says what runs without it.
build() {
  local what="$1" source="$2" module="$3" fallback="$4"
  shift 4
  local packages=()
  while [[ "$1" != "--" ]]; do packages+=("$1"); shift; done
  shift
  local target="${module//.//}$SUFFIX" stamp="$STAMPS/native-${module##*.}"
  # Rebuilt when the source (or a header beside it), this script, the Python ABI, torch or
  # the processor (the kernels use -march=native) changed.
  local want
  # shellcheck disable=SC2046  # the headers' paths have no spaces
  want="$({ cat "$source" $(find "$(dirname "$source")" -maxdepth 1 -name '*.h' | sort) "$0"; grep -E '^(model name|flags)' /proc/cpuinfo 2>/dev/null | sort -u; } | sha1sum | cut -d' ' -f1)"
  want+=" $SUFFIX $TORCH_VERSION"
  if [[ -f "$target" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "$what up to date ($target)"
    return 0
  fi
  if ! have_packages "${packages[@]}"; then
    echo "         $fallback" >&2
    return 0
  fi
  echo "compiling $source -> $target ..."
  g++ -std=c++20 -shared -fPIC -Wall -Wextra -Wno-unused-parameter -I"$PY_INCLUDE" \
    "$source" -o "$target.tmp" "$@"
  mv "$target.tmp" "$target"
  "$PY" -c "import torch, $module" || {
    rm -f "$target"; echo "error: $target does not import" >&2; exit 1; }
  mkdir -p "$STAMPS"
  echo "$want" >"$stamp"
  echo "$what built ($target)"
}

# The CPU kernels' flags, but for the module name. -ffp-contract=off keeps elementwise math
# rounding as PyTorch's ops round (see the source).
kernel_flags() {
  echo -O3 -march=native -ffp-contract=off -fopenmp -Wno-missing-field-initializers \
    "-DTORCH_EXTENSION_NAME=$1" -DTORCH_API_INCLUDE_EXTENSION_H
}

if [[ "${1:-}" == "cpu-kernels-variant" ]]; then
  if (($# < 3)) || [[ ! -d "$2" || ! "$3" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
    echo "usage: $0 cpu-kernels-variant DIR NAME [g++ flags...]" >&2
    echo "  DIR: an existing folder; NAME: a Python module name (letters, digits, _)" >&2
    exit 2
  fi
  dir="$2" name="$3"
  shift 3
  # shellcheck disable=SC2046  # kernel_flags prints words
  g++ -std=c++20 -shared -fPIC -I"$PY_INCLUDE" python_backends/engine/native/cpu_kernels.cc \
    -o "$dir/$name$SUFFIX" $(kernel_flags "$name") "${TORCH_FLAGS[@]}" \
    -lc10 -ltorch -ltorch_cpu -ltorch_python "$@"
  exit 0
fi

build "router's native data plane" router/native/dataplane.cc router._dataplane \
  "the router will use its pure-Python data plane" \
  g++ libnghttp2-dev zlib1g-dev python3-dev -- \
  -O2 -Wno-missing-field-initializers -lnghttp2 -lz

# shellcheck disable=SC2046
build "engine's CPU kernels" python_backends/engine/native/cpu_kernels.cc \
  python_backends.engine._cpu_kernels "the engine will run its plain PyTorch path on the CPU" \
  g++ python3-dev -- \
  $(kernel_flags _cpu_kernels) "${TORCH_FLAGS[@]}" -lc10 -ltorch -ltorch_cpu -ltorch_python
