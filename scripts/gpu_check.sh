#!/usr/bin/env bash
# The GPU check: a checklist that cannot pass by skipping. See docs/gpu.md.
#
#   scripts/gpu_check.sh OUT              on a GPU machine: every step below, results in OUT (at most 8 files)
#   scripts/gpu_check.sh --dry-run OUT    here, without a GPU: every part that needs none (the same functions and
#                                         steps; the GPU steps are reported "skipped (dry run)")
#   scripts/gpu_check.sh --prepare DIR    copy a GoogleTest source tree (e.g. /usr/src/googletest) to
#                                         third_party/googletest-src: git ignores it, so a remote run must carry it
#                                         explicitly (the device tool: carry=["third_party/googletest-src"])
#   --only STEP,STEP  (before OUT)        run only these steps (a rerun on a machine that kept build/gpu); the
#                                         others are "skipped" and count as met dependencies
#
# Every step runs under `timeout` with its own budget (all budgets sum to <= 9 minutes on 16 cores); a step whose
# dependency failed is reported "not run". OUT gets env.txt, summary.txt (the one-screen summary, also printed),
# summary.json (per step: status, seconds, budget, key figures), steps.log (the tail of every step's output),
# nccl.json, capture.json, bench_route.json, bench_experts_gpu.json (the last four from the GPU steps). Exit status
# 0 only when every step passed (a dry run: every step it runs).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

prepare() {
    local src="${1:?usage: scripts/gpu_check.sh --prepare GOOGLETEST_SOURCE_DIR}"
    local dst="$ROOT/third_party/googletest-src"
    if ! [ -f "$src/googletest/src/gtest-all.cc" ] && ! [ -f "$src/src/gtest-all.cc" ]; then
        echo "gpu_check: $src is not a GoogleTest source tree (no googletest/src/gtest-all.cc)" >&2
        exit 2
    fi
    rm -rf "$dst"
    mkdir -p "$dst"
    cp -r "$src/." "$dst/"
    git -C "$ROOT" check-ignore -q "$dst" || { echo "gpu_check: $dst is not ignored by git" >&2; exit 2; }
    echo "copied $src to $dst ($(du -sh "$dst" | cut -f1)); it is git-ignored: a device run must carry it," \
        "carry=[\"third_party/googletest-src\"]"
}

DRY_RUN=0
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --prepare) prepare "${2:-}"; exit 0 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --only) ONLY=",${2:?--only needs a comma-separated list of steps},"; shift 2 ;;
        *) break ;;
    esac
done
OUT="${1:?usage: scripts/gpu_check.sh [--dry-run] [--only STEPS] OUTPUT_DIR | --prepare GOOGLETEST_SOURCE_DIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT"

# ---- environment: the interpreter that holds torch, its tools first on PATH, the in-place build on PYTHONPATH
if [ -z "${PYTHON:-}" ]; then
    for cand in /opt/torch/.venv/bin/python3 "$ROOT/.venv/bin/python" python3; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then
            PYTHON="$cand"
            break
        fi
    done
fi
PY="${PYTHON:-python3}"
PY="$(command -v "$PY" || echo "$PY")"
export PATH="$(dirname "$PY"):$PATH"
# CUDA_HOME is the toolkit (not the folder of an nvcc wrapper on PATH): $CUDA_HOME, /usr/local/cuda, then PATH.
NVCC=""
for cand in "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" /usr/local/cuda/bin/nvcc "$(command -v nvcc || true)"; do
    if [ -n "$cand" ] && [ -x "$cand" ]; then NVCC="$cand"; break; fi
done
if [ -z "${CUDA_HOME:-}" ] && [ -n "$NVCC" ]; then
    export CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$NVCC")")")"
fi
# The toolkit's tools (compute-sanitizer, cuobjdump) last on PATH: a machine's PATH may lack $CUDA_HOME/bin.
[ -n "${CUDA_HOME:-}" ] && export PATH="$PATH:$CUDA_HOME/bin:$CUDA_HOME/compute-sanitizer"
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export EPMOE_CUDA_ARCHS="${EPMOE_CUDA_ARCHS:-90a}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export EPMOE_BUILD_DIR="$ROOT/build/gpu"
if [ -z "${EPMOE_GTEST_SOURCE_DIR:-}" ]; then
    for cand in "$ROOT/third_party/googletest-src" /usr/src/googletest; do
        [ -d "$cand" ] && { export EPMOE_GTEST_SOURCE_DIR="$cand"; break; }
    done
fi
CPP_TESTS="$EPMOE_BUILD_DIR/epmoe_cpp_tests"
SANITIZER="$(command -v compute-sanitizer || true)"
STEPS="$WORK/steps.tsv"
: > "$STEPS"

# ---- the checklist machinery
declare -A STATUS
record() {  # record NAME STATUS SECONDS BUDGET REASON
    STATUS[$1]="$2"
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$STEPS"
}
# step NAME BUDGET_S DEPENDENCIES(comma-separated, or -) NEEDS_GPU(0/1) COMMAND...: COMMAND may be a function of
# this script (they are exported) and runs under `timeout`, its output in $WORK/NAME.log.
step() {
    local name="$1" budget="$2" deps="$3" gpu="$4"
    shift 4
    if [ -n "$ONLY" ] && [[ "$ONLY" != *",$name,"* ]]; then
        record "$name" skipped 0 "$budget" "not selected (--only)"
        STATUS[$name]="not selected"
        return
    fi
    if [ "$gpu" = 1 ] && [ "$DRY_RUN" = 1 ]; then
        record "$name" skipped 0 "$budget" "dry run: needs the GPU"
        echo "=== $name: skipped (dry run)"
        return
    fi
    local dep
    for dep in ${deps//,/ }; do
        [ "$dep" = "-" ] && continue
        if [ "${STATUS[$dep]:-}" != "passed" ] && [ "${STATUS[$dep]:-}" != "not selected" ]; then
            record "$name" "not run" 0 "$budget" "needs $dep (${STATUS[$dep]:-not run})"
            echo "=== $name: not run (needs $dep)"
            return
        fi
    done
    echo "=== $name (budget ${budget} s)"
    local t0=$SECONDS rc
    timeout --kill-after=5 "$budget" bash -c '"$@"' "$name" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    local took=$((SECONDS - t0))
    if [ $rc = 0 ]; then
        record "$name" passed "$took" "$budget" ""
        echo "    passed (${took} s)"
    else
        local why="exit $rc"
        if [ $rc = 124 ] || [ $rc = 137 ]; then why="timed out after ${budget} s"; fi
        record "$name" failed "$took" "$budget" "$why"
        echo "    FAILED (${took} s, $why); last lines:"
        tail -n 25 "$WORK/$name.log" | sed 's/^/    | /'
    fi
}

# ---- steps that run on both machines
DRY_FLAG=""
[ "$DRY_RUN" = 1 ] && DRY_FLAG="--dry-run"
preflight() { "$PY" scripts/gpu_check_steps.py preflight "$OUT/env.txt" $DRY_FLAG; }

# GoogleTest fallback: configure a scratch build with the system package hidden (configure only).
gtest_fallback() {
    local dir="$WORK/gtest-fallback"
    if [ -z "${EPMOE_GTEST_SOURCE_DIR:-}" ]; then
        echo "no GoogleTest source tree: run scripts/gpu_check.sh --prepare DIR"
        return 1
    fi
    cmake -S "$ROOT" -B "$dir" -G Ninja -DPython_EXECUTABLE="$PY" -DCMAKE_DISABLE_FIND_PACKAGE_GTest=ON \
        -DEPMOE_GTEST_SOURCE_DIR="$EPMOE_GTEST_SOURCE_DIR" -DEPMOE_OUTPUT_DIR="$dir/out" 2>&1 | tee "$dir.log"
    grep -q "C++ tests      ON: GoogleTest built from source" "$dir.log" || {
        echo "the fallback configure did not enable the C++ tests"
        return 1
    }
}

# The test files that hold CUDA-marked tests: only these are collected, so that a CPU test module that does not
# import with the GPU machine's own package versions (torch, transformers) cannot abort the CUDA run.
CUDA_TEST_FILES="$(grep -lE 'mark\.(cuda|multigpu)' tests/python/test_*.py | tr '\n' ' ')"

# Collection of the CUDA tests with the GPU requirement on (collection never runs them).
collect_cuda() {
    EPMOE_REQUIRE_CUDA=1 "$PY" -m pytest -q -p no:cacheprovider --collect-only -m cuda $CUDA_TEST_FILES
}

# The GPU benchmark commands (their --out is added per use): the same strings run on the GPU and in the dry run.
BENCH_ROUTE="benchmarks/bench_route.py --gpu-only --quick"
BENCH_EXPERTS="benchmarks/bench_experts_gpu.py --quick"

# Argument parsing and imports of every GPU-step script: each benchmark with its GPU step's arguments, PYTHONPATH
# unset and no GPU visible (so it measures nothing), then the NCCL and capture steps in dry-run mode.
scripts_args() {
    "$PY" scripts/gpu_check_steps.py bench-args "$BENCH_ROUTE --out $WORK/bench_route.json" \
        "$BENCH_EXPERTS --out $WORK/bench_experts_gpu.json" &&
        "$PY" scripts/gpu_check_steps.py nccl "$WORK/nccl.json" --dry-run &&
        "$PY" scripts/gpu_check_steps.py capture "$WORK/capture.json" --dry-run
}

# ---- GPU steps
build() {
    "$PY" setup.py build_ext --inplace || return 1
    "$PY" -c "import epmoe; from epmoe._loader import build_info; info = build_info(); print(info); assert epmoe.has_cuda_kernels(), info"
}
cpp_tests() {  # cpp_tests [ARGS...]: the GoogleTest binary, which exists only where GoogleTest was found
    if ! [ -x "$CPP_TESTS" ]; then
        echo "$CPP_TESTS was not built: no GoogleTest (see env.txt; scripts/gpu_check.sh --prepare DIR)"
        return 1
    fi
    EPMOE_REQUIRE_CUDA=1 "$CPP_TESTS" "$@"  # a CUDA gtest without a device fails instead of skipping
}
sanitize() {  # sanitize TOOL COMMAND...: a CUDA test that cannot see the GPU under the sanitizer fails, never skips
    local tool="$1"
    shift
    if [ -z "$SANITIZER" ]; then
        echo "compute-sanitizer not found"
        return 1
    fi
    EPMOE_REQUIRE_CUDA=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 1 --print-limit 20 \
        --target-processes all "$@"
}
sanitize_cpp() {  # sanitize_cpp TOOL: the CUDA gtests under compute-sanitizer
    cpp_tests --gtest_list_tests > /dev/null || return 1
    EPMOE_REQUIRE_CUDA=1 sanitize "$1" "$CPP_TESTS" --gtest_filter='*Cuda*'
}
export ROOT OUT WORK PY DRY_RUN DRY_FLAG SANITIZER CPP_TESTS BENCH_ROUTE BENCH_EXPERTS CUDA_TEST_FILES
export -f preflight gtest_fallback collect_cuda scripts_args build cpp_tests sanitize sanitize_cpp

# The CUDA pytest file under the sanitizers, without its two largest cases (budget) and its CUDA-graph test: a
# capture needs the caching allocator, which PYTORCH_NO_CUDA_MEMORY_CACHING=1 turns off (every free is a cudaFree,
# which a capture refuses, and a freed address may be handed out again inside the same graph).
SANITIZED_PYTEST=(-m pytest -q -x -p no:cacheprovider tests/python/test_experts_cuda.py
                  -k "not moe_layout_large and not grouped_gemms_match_cpu and not cuda_graph")

echo "epmoe GPU check ($([ "$DRY_RUN" = 1 ] && echo dry run || echo GPU)): python $PY, output $OUT"
step preflight      20  -          0 preflight
if [ "$DRY_RUN" = 1 ]; then
    step gtest_fallback 45  preflight  0 gtest_fallback
    step collect_cuda   90  preflight  0 collect_cuda
    step scripts_args   60  preflight  0 scripts_args
fi
step build          150 preflight  1 build
step pytest_cuda    55  build      1 env EPMOE_REQUIRE_CUDA=1 "$PY" -m pytest -q -p no:cacheprovider -m cuda \
    $CUDA_TEST_FILES
step cpp_tests      15  build      1 cpp_tests
step memcheck_cpp   40  build      1 sanitize_cpp memcheck
step racecheck_cpp  40  build      1 sanitize_cpp racecheck
step memcheck_py    55  build      1 sanitize memcheck "$PY" "${SANITIZED_PYTEST[@]}"
step racecheck_py   45  build      1 sanitize racecheck "$PY" "${SANITIZED_PYTEST[@]}"
step nccl           40  build      1 "$PY" scripts/gpu_check_steps.py nccl "$OUT/nccl.json"
step capture        25  build      1 "$PY" scripts/gpu_check_steps.py capture "$OUT/capture.json"
step bench_route    15  build      1 "$PY" $BENCH_ROUTE --out "$OUT/bench_route.json"
step bench_experts  40  build      1 "$PY" $BENCH_EXPERTS --out "$OUT/bench_experts_gpu.json"

"$PY" scripts/gpu_check_steps.py summary "$WORK" "$OUT" $DRY_FLAG
