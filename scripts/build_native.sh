#!/usr/bin/env bash
# Build the router's native data plane (router/native/dataplane.cc -> router/_dataplane*.so)
# against Debian's nghttp2 (HTTP/2). Idempotent: rebuilds only when the source changed.
# Without a compiler or the nghttp2 headers (and no apt-get to install them) it says so and
# exits 0: the router then carries inference through grpcio (data_plane = "auto").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
SOURCE=router/native/dataplane.cc
SUFFIX="$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
TARGET="router/_dataplane$SUFFIX"
STAMP="$ROOT/.cache/setup/native-dataplane"
PACKAGES=(g++ libnghttp2-dev zlib1g-dev python3-dev)

want="$(cat "$SOURCE" "$0" | sha1sum | cut -d' ' -f1) $SUFFIX"
if [[ -f "$TARGET" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  echo "native data plane up to date ($TARGET)"
  exit 0
fi

missing=()
for package in "${PACKAGES[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if ((${#missing[@]})); then
  if command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
    echo "installing ${missing[*]} (apt) ..."
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || {
      apt-get update -q >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
    }
  else
    echo "warning: ${missing[*]} missing and cannot be installed here; the router will use" >&2
    echo "         its pure-Python data plane" >&2
    exit 0
  fi
fi

INCLUDES="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
echo "compiling $SOURCE -> $TARGET ..."
g++ -O2 -std=c++17 -shared -fPIC -Wall -Wextra -Wno-unused-parameter \
  -Wno-missing-field-initializers -I"$INCLUDES" "$SOURCE" -o "$TARGET.tmp" \
  -lnghttp2 -lz
mv "$TARGET.tmp" "$TARGET"
"$PY" -c "import router._dataplane" || { rm -f "$TARGET"; echo "error: $TARGET does not import" >&2; exit 1; }
mkdir -p "$(dirname "$STAMP")"
echo "$want" >"$STAMP"
echo "native data plane built ($TARGET)"
