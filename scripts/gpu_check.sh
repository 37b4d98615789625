#!/usr/bin/env bash
# GPU check: on a machine with a GPU, the CUDA toolkit and a CUDA build of torch, build for sm_90a with all cores,
# run the CUDA tests (EPMOE_REQUIRE_CUDA=1: a skip is a failure), compute-sanitizer memcheck over the CUDA kernel
# tests when the tool works there, and the GPU benchmarks. Logs and JSON go to the folder given as $1.
# Budget: under 8 minutes on an H200.
set -uo pipefail
out="${1:?usage: scripts/gpu_check.sh OUTPUT_DIR}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export EPMOE_CUDA_ARCHS="${EPMOE_CUDA_ARCHS:-90a}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}"
export EPMOE_BUILD_DIR="$PWD/build/gpu"
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME COMMAND...: runs, logs to $out/NAME.log, remembers failures
    local name="$1"; shift
    echo "=== $name"
    local t0=$SECONDS
    if "$@" >"$out/$name.log" 2>&1; then echo "    ok ($((SECONDS - t0)) s)"; else echo "    FAILED ($((SECONDS - t0)) s), see $name.log"; tail -n 30 "$out/$name.log"; status=1; fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
step build "$PY" setup.py build_ext --inplace
[ "$status" = 0 ] || exit 1
step pytest_cuda env EPMOE_REQUIRE_CUDA=1 "$PY" -m pytest -q -m "cuda" tests/python --junitxml="$out/pytest_cuda.xml"
step cpp_tests "$EPMOE_BUILD_DIR/epmoe_cpp_tests"
if command -v compute-sanitizer >/dev/null 2>&1; then
    step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 "$EPMOE_BUILD_DIR/epmoe_cpp_tests" --gtest_filter='*Cuda*'
fi
step bench_route "$PY" benchmarks/bench_route.py --gpu-only --out "$out/bench_route.json"
step bench_experts_gpu "$PY" benchmarks/bench_experts_gpu.py --out "$out/bench_experts_gpu.json"
cat "$out/bench_route.log" "$out/bench_experts_gpu.log"
exit $status
