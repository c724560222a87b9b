#!/usr/bin/env bash
# Exercises the CUDA path on a machine with an NVIDIA GPU and no network (an x86_64 H100/H200 here; a Jetson is
# the real target): builds llama-cpp-python with the Jetson's recipe for this GPU, installs it and the runtime,
# installs a tiny bundle built for jetson-orin-nano (whose profile offloads all layers), then compares greedy
# output and speed with all layers on the GPU and none, and serves one chat request with the board's default.
# Inputs (prepared on the laptop, carried in CHECK): the llama-cpp-python sdist, wheels of the runtime's
# dependencies for this Python, tiny-jetson.edgepack. CUDA_ARCHITECTURES: this GPU's (90 for Hopper).
set -euo pipefail
CHECK="${CHECK:-native/out/cuda-check}"
PY="${PYTHON:-python3}"
export CUDA_ARCHITECTURES="${CUDA_ARCHITECTURES:-90}" JOBS="${JOBS:-$(nproc)}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nvcc --version | tail -1 || /usr/local/cuda/bin/nvcc --version | tail -1

start=$(date +%s)
WHEELHOUSE="$CHECK/house" SDIST="$CHECK/llama_cpp_python-0.3.36.tar.gz" PIP_ARGS=--no-build-isolation \
    bash native/build-jetson-cuda-wheel.sh > "$CHECK/build.log" 2>&1 || { tail -40 "$CHECK/build.log"; exit 1; }
echo "CUDA wheel built in $(( $(date +%s) - start )) s: $(ls "$CHECK"/house/*.whl)"

"$PY" -m pip install -q --no-deps "$CHECK"/house/llama_cpp_python-*.whl
"$PY" -m pip install -q --no-index --find-links "$CHECK/wheels" msgspec zstandard starlette uvicorn prometheus-client diskcache
"$PY" -m pip install -q --no-deps "$CHECK"/wheels/edgepack-*.whl
"$PY" -c "import llama_cpp; print('gpu offload:', llama_cpp.llama_supports_gpu_offload()); print(llama_cpp.llama_print_system_info().decode())"

STORE="$(mktemp -d)/store"
"$PY" -m edgepack.runtime.cli install "$CHECK/tiny-jetson.edgepack" --store "$STORE"
for layers in -1 0; do
    echo "== run --gpu-layers $layers"
    for i in 1 2 3; do
        EDGEPACK_LLAMA_LOG=1 "$PY" -m edgepack.runtime.cli run --store "$STORE" --gpu-layers "$layers" --max-tokens 64 "hello there" \
            > "$CHECK/run$layers.txt" 2> "$CHECK/run$layers.err"
        grep -o '\[.*tok/s.*\]' "$CHECK/run$layers.err"
    done
    grep -iE "offloaded|CUDA0 model buffer|CPU_Mapped model buffer" "$CHECK/run$layers.err" | head -3 || true
done
cmp "$CHECK/run-1.txt" "$CHECK/run0.txt" && echo "greedy output identical on GPU and CPU" \
    || { echo "greedy output differs:"; head -c 300 "$CHECK/run-1.txt"; echo; head -c 300 "$CHECK/run0.txt"; echo; }

echo "== serve (the board's default: all layers on the GPU)"
EDGEPACK_LLAMA_LOG=1 "$PY" -m edgepack.runtime.cli serve --store "$STORE" --port 18080 --preload > "$CHECK/serve.log" 2>&1 &
pid=$!
for _ in $(seq 120); do curl -sf localhost:18080/health >/dev/null && break; sleep 0.5; done
curl -s localhost:18080/v1/chat/completions -H 'content-type: application/json' \
    -d '{"messages":[{"role":"user","content":"hi"}],"max_tokens":16,"temperature":0}'; echo
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader
curl -s localhost:18080/metrics | grep -E "^edgepack_(memory|model_memory|budget)" | head -8
kill "$pid"; wait "$pid" || true
grep -iE "offloaded|CUDA0 model buffer" "$CHECK/serve.log" | head -5 || true
