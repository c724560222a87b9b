#!/usr/bin/env bash
# Cross-compiles llama-cpp-python (the pinned sdist, llama.cpp inside) into a wheel for an ARM
# board, on an x86_64 (or any) laptop, with zig as the C/C++ compiler. `edgepack wheels` runs it;
# it can also run by hand:
#
#   SDIST=llama_cpp_python-0.3.36.tar.gz ZIG=/path/to/zig TARGET=aarch64-linux-gnu GLIBC=2.31 \
#   MCPU=cortex_a76 OUT=dir native/build-board-wheel.sh
#
# Why zig (PyPI's `ziglang`): one pip-installable toolchain on any laptop (Linux or macOS, no root,
# no apt), and it links against a glibc *version we choose* (TARGET.GLIBC), so the wheel runs on
# every board OS with that glibc or newer; Debian's cross gcc links against the build machine's
# own glibc. zig also links its libc++ statically, so the wheel needs no libstdc++ of the board's.
# Zig takes the CPU as -mcpu (the exact core: its ISA, extensions and tuning), not gcc's
# -march/-mtune, so llama.cpp's GGML_CPU_ARM_ARCH (which adds -march) stays unset.
#
# What is left out and why: OpenMP (zig ships no libgomp; ggml then uses its own thread pool),
# llava/mtmd (edgepack serves no images), GGML_NATIVE (it would probe this machine's CPU).
# The wheel is written to OUT with scikit-build-core's host tag; `edgepack wheels` checks the
# libraries' needed glibc symbols and retags it for the board (manylinux_2_X_aarch64).
set -euo pipefail

: "${SDIST:?path of the llama-cpp-python sdist}" "${ZIG:?path of the zig binary}"
: "${TARGET:?e.g. aarch64-linux-gnu}" "${GLIBC:?e.g. 2.31}" "${MCPU:?e.g. cortex_a76}" "${OUT:?output dir}"
PYTHON="${PYTHON:-python3}"  # its pip builds the wheel
JOBS="${JOBS:-2}"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# cmake takes one path per tool: small wrappers put `zig cc -target ...` behind each.
for tool in cc c++; do
    printf '#!/bin/sh\nexec "%s" %s -target %s.%s -mcpu=%s "$@"\n' "$ZIG" "$tool" "$TARGET" "$GLIBC" "$MCPU" \
        > "$WORK/zig-$tool"
done
for tool in ar ranlib; do
    printf '#!/bin/sh\nexec "%s" %s "$@"\n' "$ZIG" "$tool" > "$WORK/zig-$tool"
done
chmod +x "$WORK"/zig-*

cat > "$WORK/toolchain.cmake" <<EOF
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR ${TARGET%%-*})
set(CMAKE_C_COMPILER "$WORK/zig-cc")
set(CMAKE_CXX_COMPILER "$WORK/zig-c++")
set(CMAKE_AR "$WORK/zig-ar")
set(CMAKE_RANLIB "$WORK/zig-ranlib")
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
EOF

export CMAKE_ARGS="-DCMAKE_TOOLCHAIN_FILE=$WORK/toolchain.cmake -DCMAKE_BUILD_TYPE=Release \
-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL="$JOBS"
echo "cmake args: $CMAKE_ARGS" >&2
mkdir -p "$OUT"
# --no-cache-dir: pip's wheel cache keys on the sdist only and would hand back the x86_64 build.
"$PYTHON" -m pip wheel --no-deps --no-cache-dir -w "$OUT" "$SDIST" >&2
ls "$OUT"/llama_cpp_python-*.whl
