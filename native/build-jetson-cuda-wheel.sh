#!/usr/bin/env bash
# Builds llama-cpp-python with CUDA ON THE JETSON (JetPack 6: nvcc in /usr/local/cuda), into the wheelhouse that
# `edgepack wheels --board jetson-orin-nano` wrote: CUDA cannot be cross-compiled from a laptop. The wheelhouse
# carries this script and the sdist in jetson-cuda/; on the board:
#
#   bash WHEELHOUSE/jetson-cuda/build-jetson-cuda-wheel.sh
#   pip install --no-index --find-links WHEELHOUSE edgepack
#
# The CPU-only llama-cpp-python wheel moves to WHEELHOUSE/cpu-only/ (pip would otherwise prefer its manylinux tag
# over the CUDA build's linux_aarch64). Needs on the board: gcc/g++, cmake >= 3.21, nvcc, python3-pip, and pip
# reaching scikit-build-core (its build backend; or PIP_FIND_LINKS naming a folder with its wheel).
#
# CUDA_ARCHITECTURES: 87 (Orin's Ampere GPU, compute capability 8.7); another value builds for another GPU, e.g. 90
# on an x86_64 H100/H200, where this recipe was exercised (docs/boards.md says what ran where).
# CPU flags: on aarch64 the Cortex-A78AE's ISA (GGML_CPU_ARM_ARCH) and tuning, as boards/jetson-orin-nano.toml says;
# elsewhere ggml's native detection.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HOUSE="${WHEELHOUSE:-$(dirname "$HERE")}"
SDIST="${SDIST:-$(ls "$HERE"/llama_cpp_python-*.tar.gz | head -1)}"
CUDA_ARCHITECTURES="${CUDA_ARCHITECTURES:-87}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc)}"
export PATH="$PATH:/usr/local/cuda/bin"
command -v nvcc >/dev/null || { echo "nvcc not found: install the CUDA toolkit (JetPack's nvidia-jetpack)" >&2; exit 1; }

CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHITECTURES -DCMAKE_BUILD_TYPE=Release \
-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF"
if [[ "$(uname -m)" == aarch64 ]]; then
    CMAKE_ARGS="$CMAKE_ARGS -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16 \
-DCMAKE_C_FLAGS=-mtune=cortex-a78ae -DCMAKE_CXX_FLAGS=-mtune=cortex-a78ae"
fi
export CMAKE_ARGS CMAKE_BUILD_PARALLEL_LEVEL="$JOBS"
echo "cmake args: $CMAKE_ARGS" >&2

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
# PIP_ARGS: e.g. --no-build-isolation on a board without network, with scikit-build-core installed.
"$PYTHON" -m pip wheel --no-deps --no-cache-dir ${PIP_ARGS:-} -w "$OUT" "$SDIST" >&2
mkdir -p "$HOUSE/cpu-only"
for old in "$HOUSE"/llama_cpp_python-*.whl; do
    [[ -e "$old" ]] && mv "$old" "$HOUSE/cpu-only/"
done
mv "$OUT"/llama_cpp_python-*.whl "$HOUSE/"
ls "$HOUSE"/llama_cpp_python-*.whl
