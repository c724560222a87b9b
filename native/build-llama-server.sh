#!/usr/bin/env bash
# Builds llama.cpp's own `llama-server` from the exact llama.cpp source that
# llama-cpp-python==0.3.36 vendors, so bench/bench_serve.py compares edgepack
# against the same kernels. Everything lands in native/out/ (git-ignored).
#
# Flags mirror llama-cpp-python's wheel build: Release, shared libs, and
# GGML_NATIVE left at its vendor default (ON when not cross-compiling), which
# is what the installed wheel got (its system info reports AVX512 = 1).
# Network dependencies are off: LLAMA_CURL no longer exists in this llama.cpp
# (it is deprecated and ignored), so HTTPS is disabled with LLAMA_OPENSSL=OFF
# and the web UI download/npm build with LLAMA_USE_PREBUILT_UI/LLAMA_BUILD_UI.
set -euo pipefail

VERSION=0.3.36
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/native/out"
PIP="${PIP:-$ROOT/.venv/bin/pip}"
SRC="$OUT/llama_cpp_python-$VERSION/vendor/llama.cpp"
BUILD="$OUT/llama.cpp-build"
BIN="$BUILD/bin/llama-server"
JOBS="${JOBS:-2}"

if [[ -x "$BIN" ]]; then
    echo "llama-server already built, skipping (delete $BUILD to rebuild)" >&2
    echo "$BIN"
    exit 0
fi

mkdir -p "$OUT"
SDIST="$OUT/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    "$PIP" download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$OUT/"
fi
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    tar -xzf "$SDIST" -C "$OUT"
fi

# SOURCE_DATE_EPOCH would silently flip GGML_NATIVE's default to OFF.
unset SOURCE_DATE_EPOCH

CMAKE_FLAGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=ON
    -DGGML_NATIVE=ON
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_SERVER=ON
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_BUILD_UI=OFF
)
echo "cmake flags: ${CMAKE_FLAGS[*]}" >&2
cmake -S "$SRC" -B "$BUILD" "${CMAKE_FLAGS[@]}"
cmake --build "$BUILD" --target llama-server -j "$JOBS"

echo "$BIN"
