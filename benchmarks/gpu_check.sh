#!/usr/bin/env bash
# The GPU kit: one command that builds, tests, checks and measures on a lent GPU within 9 minutes in the worst
# case (each stage under its own time limit, the limits and kill graces add up to 535 s), writing JSON lines to
# $OUT as each stage finishes: summary.jsonl, build.jsonl, tests.xml + tests.jsonl, correctness.jsonl,
# speed.jsonl, train_step.jsonl and log.txt (8 files, no folders). Run from anywhere:
#   bash benchmarks/gpu_check.sh            # on the GPU machine, in the repository copy
#   bash benchmarks/gpu_check.sh --dry-run  # every stage's logic on the CPU, tiny shapes, in a temporary copy
# The dry run (what CI runs) writes the same files, so the GPU run cannot fail on an import, a path or a file.
# Wheels: .whl/ (bash scripts/make_wheels.sh) are installed with --no-deps into a folder first on PYTHONPATH.
# Env: OUT (default /tmp/flowbp-gpu-check), PYTHON (default python3), WHEELS (default .whl), MAX_JOBS,
# FLOWBP_PREBUILT_SO (dry run only: a module built for this torch, e.g. by scripts/ci_cuda_build.sh, to copy
# instead of compiling: CI's dry run then stays far under 5 minutes).
set -uo pipefail
MODE=gpu
case "${1:-}" in
  --dry-run) MODE=dry ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
# Stage limits in seconds (worst case: 110 + 110 + 70 + 70 + 150 + 5 x GRACE = 535 <= 540).
LIMIT_BUILD=110    # install the wheels, nvcc of three .cu files for one architecture on 16 cores, the report
[ "$MODE" = dry ] && [ -z "${FLOWBP_PREBUILT_SO:-}" ] && LIMIT_BUILD=300  # a CPU build on 2 busy cores
LIMIT_TESTS=110    # tests/kernels/ops without -x: Triton compiles each specialization once (xdist spreads them)
LIMIT_CORRECT=70   # model-shape correctness, opcheck, torch.compile, one engine step
LIMIT_SPEED=70     # CUDA events with an L2 flush, medians, against eager, compile and a device copy
LIMIT_STEP=150     # FLUX.1-dev at 1024 and 512 (streaming, retain), then SD3.5-M while time remains
FAIL_TAIL=25       # lines of a failed stage's log printed on stdout
GRACE=5            # SIGTERM at the limit, SIGKILL GRACE seconds later
PER_TEST_S=120     # pytest-timeout: the first test of a worker compiles its Triton kernels
export MODE GRACE

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${OUT:-/tmp/flowbp-gpu-check}" && cd "${OUT:-/tmp/flowbp-gpu-check}" && pwd)"
PY="$(command -v "${PYTHON:-python3}")"
WHEELS="$(cd "$REPO" && realpath -m "${WHEELS:-.whl}")"
LOG="$OUT/log.txt"
T0=$(date +%s)
for f in summary.jsonl build.jsonl tests.xml tests.jsonl correctness.jsonl speed.jsonl train_step.jsonl log.txt; do
  rm -f "$OUT/$f"
done
SITE="$(mktemp -d "${TMPDIR:-/tmp}/flowbp-site.XXXXXX")"
if [ "$MODE" = dry ]; then
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/flowbp-dry.XXXXXX")"
  (cd "$REPO" && tar --exclude=./.git --exclude='./.venv*' --exclude=./build --exclude='*.so' --exclude=./.whl \
    --exclude=./flowbp-output --exclude=./outputs -cf - .) | tar -xf - -C "$WORK"
  trap 'rm -rf "$WORK" "$SITE"' EXIT
else
  WORK="$REPO"
  trap 'rm -rf "$SITE"' EXIT
  unset TRITON_INTERPRET FLOWBP_BACKEND
fi
cd "$WORK" || exit 1
# identifies the code on a machine without the repository's history: `git` there is absent
FLOWBP_TREE_SHA="$(find csrc flowbp_kernels benchmarks python -type f \( -name '*.py' -o -name '*.cu' -o -name '*.cuh' \
  -o -name '*.cpp' -o -name '*.h' -o -name '*.sh' \) | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-12)"
export FLOWBP_TREE_SHA FLOWBP_GIT_REV="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
# the build is stage 1's job: a failed build must not turn into a silent JIT build in a later stage
export PYTHONPATH="$SITE:$WORK:$WORK/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 FLOWBP_JIT=0
export OUT PY WHEELS SITE WORK LOG PER_TEST_S LIMIT_CORRECT LIMIT_SPEED LIMIT_STEP
echo "gpu_check ($MODE) in $WORK, results in $OUT" | tee -a "$LOG"

json_line() {  # json_line FILE key=value ...: one JSON object from simple key=value pairs (numbers stay numbers)
  local file=$1; shift
  "$PY" -c 'import json, sys
row = {}
for kv in sys.argv[2:]:
    k, v = kv.split("=", 1)
    try: row[k] = json.loads(v)
    except ValueError: row[k] = v
open(sys.argv[1], "a").write(json.dumps(row) + "\n")' "$file" "$@"
}
export -f json_line

stage_build() {
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/*.whl || echo "gpu_check: installing the wheels failed"
  else
    echo "gpu_check: no wheels in $WHEELS (bash scripts/make_wheels.sh makes them)"
  fi
  local rc
  if [ "$MODE" = gpu ]; then
    nvidia-smi || true
    # torch derives CUDA_HOME from `which nvcc`; take the toolkit folder that has both nvcc and the runtime
    if [ -z "${CUDA_HOME:-}" ]; then
      for c in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent)")")")" /usr/local/cuda; do
        if [ -x "$c/bin/nvcc" ] && ls "$c"/lib64/libcudart.so* >/dev/null 2>&1; then export CUDA_HOME="$c"; break; fi
      done
    fi
    local nv_inc
    nv_inc="$("$PY" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'include'))" 2>/dev/null)"
    [ -n "$nv_inc" ] && [ -f "$nv_inc/cusparse.h" ] && export CPATH="$nv_inc${CPATH:+:$CPATH}"
    local arch
    arch="$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}+PTX')")"
    echo "gpu_check: building for ${FLOWBP_CUDA_ARCHS:-$arch} with CUDA_HOME=${CUDA_HOME:-?}"
    FLOWBP_FORCE_CUDA_BUILD=1 FLOWBP_CUDA_ARCHS="${FLOWBP_CUDA_ARCHS:-$arch}" MAX_JOBS="${MAX_JOBS:-16}" \
      "$PY" setup.py -q build_ext --inplace
    rc=$?
    [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/cuobjdump" ] && export CUOBJDUMP="${CUDA_HOME:-/usr/local/cuda}/bin/cuobjdump"
  elif [ -n "${FLOWBP_PREBUILT_SO:-}" ]; then  # CI: the module scripts/ci_cuda_build.sh just built (same torch)
    echo "gpu_check: using the prebuilt $FLOWBP_PREBUILT_SO instead of compiling again"
    cp "$FLOWBP_PREBUILT_SO" flowbp_kernels/
    rc=$?
  else
    FLOWBP_SKIP_CUDA_BUILD=1 MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py -q build_ext --inplace
    rc=$?
  fi
  if [ -z "${CUOBJDUMP:-}" ]; then  # Triton carries a cuobjdump where the toolkit has none
    CUOBJDUMP="$("$PY" -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))" 2>/dev/null)"
    export CUOBJDUMP
  fi
  if ! "$PY" benchmarks/gpu_kit.py build-report "$OUT/build.jsonl" && [ "$rc" -eq 0 ]; then rc=1; fi
  return "$rc"
}

stage_tests() {
  local sel=(tests/kernels/ops -k "not aot") extra=()
  [ "$MODE" = dry ] && sel=(tests/kernels/ops/test_surrogate_vjp.py tests/kernels/ops/test_pin.py)
  "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout="$PER_TEST_S")
  [ "$MODE" = gpu ] && "$PY" -c "import xdist" 2>/dev/null && extra+=(-n 8)
  "$PY" -m pytest -q -p no:cacheprovider -rfE "${sel[@]}" "${extra[@]}" --junitxml="$OUT/tests.xml"
  local rc=$?
  "$PY" benchmarks/gpu_kit.py tests-report "$OUT/tests.xml" "$OUT/tests.jsonl" || true
  return "$rc"
}

stage_correctness() {
  local dry=()
  [ "$MODE" = dry ] && dry=(--dry-run)
  "$PY" benchmarks/gpu_correctness.py "${dry[@]}" --jsonl "$OUT/correctness.jsonl" --budget-s $((LIMIT_CORRECT - 15))
}

stage_speed() {
  if [ "$MODE" = gpu ]; then
    "$PY" benchmarks/kernel_speed.py --shapes flux1-1024 flux2klein-1024 sd35m-1024 --batches 1 --p 3 \
      --node-dtypes bf16 --rounds 30 --jsonl "$OUT/speed.jsonl" --out "" --budget-s $((LIMIT_SPEED - 25))
  else  # aot_eager: the compile path without minutes of C++ compilation on a CPU
    "$PY" benchmarks/kernel_speed.py --device cpu --shapes flux1-512 --batches 1 --p 3 --node-dtypes bf16 \
      --rounds 3 --compile-backend aot_eager --jsonl "$OUT/speed.jsonl" --out "" --budget-s 40
  fi
}

stage_train_step() {
  local dry=()
  [ "$MODE" = dry ] && dry=(--dry-run)
  # a row started before the budget runs on: the longest (FLUX.1-dev at 1024, two steps) about 40 s
  "$PY" benchmarks/train_step.py "${dry[@]}" --jsonl "$OUT/train_step.jsonl" --budget-s $((LIMIT_STEP - 45))
}
export -f stage_build stage_tests stage_correctness stage_speed stage_train_step

FAILED=0
run_stage() {  # run_stage NAME LIMIT FILE: the stage under its limit; its file gets a closing line in any case
  local name=$1 limit=$2 file=$3 t rc
  t=$(date +%s)
  echo "== stage $name (limit $limit s)" | tee -a "$LOG"
  local first=$(( $(wc -l <"$LOG") + 1 ))
  timeout -k "$GRACE" "$limit" bash -c "stage_$name" >>"$LOG" 2>&1
  rc=$?
  if [ "$rc" -ne 0 ]; then  # the reason on stdout too (a CI log shows stdout only)
    echo "-- last lines of stage $name:"; tail -n +"$first" "$LOG" | tail -n "$FAIL_TAIL" | sed 's/^/   /'
  fi
  local secs=$(( $(date +%s) - t )) note=ok
  [ "$rc" -ne 0 ] && note=failed && FAILED=$((FAILED + 1))
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && note="killed at its time limit"
  json_line "$OUT/summary.jsonl" stage="$name" rc="$rc" seconds="$secs" limit_s="$limit" mode="$MODE" note="$note"
  json_line "$OUT/$file" stage="$name" rc="$rc" seconds="$secs" limit_s="$limit" end=true note="$note"
  echo "== stage $name: rc $rc in $secs s ($note)" | tee -a "$LOG"
}

run_stage build "$LIMIT_BUILD" build.jsonl
run_stage tests "$LIMIT_TESTS" tests.jsonl
[ -f "$OUT/tests.xml" ] || echo '<testsuites><!-- pytest wrote no report: see log.txt --></testsuites>' >"$OUT/tests.xml"
run_stage correctness "$LIMIT_CORRECT" correctness.jsonl
run_stage speed "$LIMIT_SPEED" speed.jsonl
run_stage train_step "$LIMIT_STEP" train_step.jsonl
TOTAL=$(( $(date +%s) - T0 ))
json_line "$OUT/summary.jsonl" what=total seconds="$TOTAL" mode="$MODE" failed_stages="$FAILED" \
  git="$FLOWBP_GIT_REV" tree_sha="$FLOWBP_TREE_SHA"
# the device returns files up to 16 MiB: keep the end of the log
if [ "$(stat -c %s "$LOG")" -gt 15000000 ]; then tail -c 15000000 "$LOG" >"$LOG.tmp" && mv "$LOG.tmp" "$LOG"; fi
"$PY" benchmarks/gpu_kit.py summary "$OUT"
FILES=$?
echo "gpu_check ($MODE): $FAILED failed stages, $TOTAL s in all"
[ "$FAILED" -eq 0 ] && [ "$FILES" -eq 0 ]
