#!/usr/bin/env bash
# Builds llama.cpp's own measuring tools (llama-perplexity, llama-imatrix,
# llama-quantize by default, or the targets named as arguments) in the tree
# that native/build-llama-server.sh configures, so they share its source
# (llama-cpp-python==0.3.36's vendored llama.cpp) and its cmake flags.
# Targets already built are skipped; the binaries' paths go to stdout.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="$ROOT/native/out/llama.cpp-build"
JOBS="${JOBS:-2}"
TARGETS=("$@")
if [[ ${#TARGETS[@]} -eq 0 ]]; then
    TARGETS=(llama-perplexity llama-imatrix llama-quantize)
fi

missing=()
for target in "${TARGETS[@]}"; do
    if [[ -x "$BUILD/bin/$target" ]]; then
        echo "$target already built, skipping (delete $BUILD/bin/$target to rebuild)" >&2
    else
        missing+=("$target")
    fi
done

if [[ ${#missing[@]} -gt 0 ]]; then
    # The server script fetches the sdist and configures (and builds) the
    # tree once; on an existing tree it returns at once. One configuration,
    # kept in one script.
    "$ROOT/native/build-llama-server.sh" >/dev/null
    cmake --build "$BUILD" --target "${missing[@]}" -j "$JOBS"
fi

for target in "${TARGETS[@]}"; do
    echo "$BUILD/bin/$target"
done
