#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (CPU only, Release) from the llama.cpp sources that the
# llama-cpp-python sdist on PyPI ships under vendor/llama.cpp, so only a PyPI mirror is needed.
#
# Usage: scripts/build_llama_server.sh [DIR]     (or LLAMA_BUILD_DIR=DIR; default ~/.cache/tgq/llama.cpp)
# Layout: DIR/sdist/ (downloaded tarball), DIR/src/ (unpacked), DIR/build/bin/llama-server.
# Safe to rerun: each step is skipped when its output is already there. The last line printed
# is the absolute path of the binary.
set -euo pipefail

LLAMA_CPP_PY_VERSION=${LLAMA_CPP_PY_VERSION:-0.3.36}
ROOT=${1:-${LLAMA_BUILD_DIR:-$HOME/.cache/tgq/llama.cpp}}
JOBS=${JOBS:-$(nproc)}
REPO=$(cd "$(dirname "$0")/.." && pwd)

SDIST_DIR=$ROOT/sdist
SRC_PARENT=$ROOT/src
BUILD=$ROOT/build
BIN=$BUILD/bin/llama-server
log() { echo "build_llama_server: $*" >&2; }

if [ -x "$BIN" ]; then
  log "already built"
  echo "$BIN"
  exit 0
fi

# Toolchain (Debian). libssl is not needed: HTTPS support is switched off below.
if ! command -v cmake >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1 || ! command -v make >/dev/null 2>&1; then
  log "installing cmake and build-essential"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq cmake build-essential >/dev/null
fi

# 1. Sources: the sdist tarball from PyPI (pip reuses its cache when it can).
mkdir -p "$SDIST_DIR" "$SRC_PARENT"
TARBALL=$SDIST_DIR/llama_cpp_python-$LLAMA_CPP_PY_VERSION.tar.gz
if [ ! -f "$TARBALL" ]; then
  if [ -x "$REPO/.venv/bin/pip" ]; then PIP=("$REPO/.venv/bin/pip"); else PIP=(python3 -m pip); fi
  log "downloading llama-cpp-python==$LLAMA_CPP_PY_VERSION sdist"
  "${PIP[@]}" download -q "llama-cpp-python==$LLAMA_CPP_PY_VERSION" \
    --no-deps --no-binary :all: -d "$SDIST_DIR" >&2
fi
SRC=$SRC_PARENT/llama_cpp_python-$LLAMA_CPP_PY_VERSION/vendor/llama.cpp
if [ ! -f "$SRC/CMakeLists.txt" ]; then
  log "unpacking $TARBALL"
  tar -xzf "$TARBALL" -C "$SRC_PARENT"
fi
if [ ! -d "$SRC/tools/server" ] && [ ! -d "$SRC/examples/server" ]; then
  log "no server sources in $SRC"; exit 1
fi

# 2. Configure and build just the server target. The embedded web UI is left out: it would be
# fetched from Hugging Face at build time, which an offline machine cannot do, and the API does
# not need it. nice keeps the build from disturbing other work on the machine.
log "configuring in $BUILD"
nice -n 10 cmake -S "$SRC" -B "$BUILD" -Wno-dev \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=ON \
  -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_OPENSSL=OFF >&2
log "building llama-server with $JOBS jobs"
start=$(date +%s)
nice -n 10 cmake --build "$BUILD" --target llama-server -j "$JOBS" >&2
log "build took $(( $(date +%s) - start ))s"

[ -x "$BIN" ] || { log "build finished but $BIN is missing"; exit 1; }
echo "$BIN"
