#!/usr/bin/env bash
# Set up and run the whole test suite on a fresh machine (the README's test command; CI calls it).
#   job (a): a venv with torch 2.13.0 (CPU build, installed first so nothing pulls a CUDA build), the
#            project with its CPU extension (--no-build-isolation), every test (Triton in the interpreter)
#            at OMP_NUM_THREADS=2;
#   job (b): a venv with torch 2.14.1 + torchvision (CUDA 13 build, from local disk here): the CUDA
#            extension is built (compiled, not run) in a copy of the tree, then every test runs again there
#            at OMP_NUM_THREADS=1 (two pytest-xdist workers), on that build's CPU path (other ATen kernels
#            and SIMD dispatch, the extension compiled against it), the open_clip reward tests included;
#            then the GPU kit's dry run (every stage on the CPU, with the wheels scripts/make_wheels.sh fetches).
# So the suite runs at 1 and at 2 threads and on two torch builds: a result that depends on the thread
# count or the build fails here. Job (b)'s venv and CUDA build run in the background during job (a)'s
# tests (they are mostly installs and nvcc), so both jobs together stay within the CI budget (20 minutes).
# Environment: VENV (default .venv), VENV_CUDA (default .venv-cuda), FLOWBP_SKIP_JOB_B=1 skips job (b).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=$(realpath -m "${VENV:-.venv}")
VENV_CUDA=$(realpath -m "${VENV_CUDA:-.venv-cuda}")
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off

setup_b() {  # job (b)'s venv and CUDA build; runs in the background while job (a)'s tests run
  [ -x "$VENV_CUDA/bin/python" ] || "$PY" -m venv "$VENV_CUDA"
  "$VENV_CUDA/bin/python" -m pip install -q --upgrade pip setuptools wheel
  "$VENV_CUDA/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
  # the train and dev extras of pyproject.toml, not the project: job (b) tests the copy it builds below
  "$VENV_CUDA/bin/python" -m pip install -q open_clip_torch pytest pytest-xdist pyyaml numpy pillow "transformers>=4.44" \
    "diffusers>=0.32" "peft>=0.12" "accelerate>=0.33" safetensors tqdm matplotlib scikit-learn tensorboard \
    scipy ninja
  # from a snapshot of the tree taken before job (a) starts (its tests write caches into the tree)
  FLOWBP_CUDA_BUILD_DIR="$BUILD_B" VENV="$VENV_CUDA" bash "$SRC_B/scripts/ci_cuda_build.sh"
}

echo "== job (a): torch 2.13.0 CPU, all tests at OMP_NUM_THREADS=2"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[dev,train]"
"$VENV/bin/python" -m flowbp_kernels.env 2>/dev/null || true
RUN_B=0
[ "${FLOWBP_SKIP_JOB_B:-0}" != "1" ] && RUN_B=1
if [ "$RUN_B" = 1 ]; then
  BUILD_B="$(mktemp -d /tmp/flowbp-job-b.XXXXXX)"
  LOG_B="$BUILD_B.setup.log"
  SRC_B="$BUILD_B.src"
  trap '[ -n "${PID_B:-}" ] && { kill "$PID_B" 2>/dev/null || true; }; rm -rf "$BUILD_B" "$LOG_B" "$SRC_B"' EXIT
  mkdir -p "$SRC_B"
  tar --exclude=./build --exclude='*.so' --exclude=./.git --exclude='./.venv*' --exclude=./flowbp-output \
    --exclude=__pycache__ -cf - . | tar -xf - -C "$SRC_B"
  echo "== job (b): venv and CUDA build start in the background (log printed after job (a))"
  setup_b >"$LOG_B" 2>&1 &
  PID_B=$!
fi
OMP_NUM_THREADS=2 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests

if [ "$RUN_B" = 1 ]; then
  echo "== job (b): torch 2.14.1 (CUDA build) + torchvision + open_clip: CUDA extension build, all tests at OMP_NUM_THREADS=1"
  rc_b=0
  wait "$PID_B" || rc_b=$?
  cat "$LOG_B"
  [ "$rc_b" -eq 0 ] || { echo "job (b) setup failed (exit $rc_b)"; exit "$rc_b"; }
  # two workers of one thread each (every test still runs at OMP_NUM_THREADS=1); a module's tests stay
  # on one worker, so its fixtures are built once
  (cd "$BUILD_B" && OMP_NUM_THREADS=1 PYTHONPATH="$BUILD_B:$BUILD_B/python" \
    "$VENV_CUDA/bin/python" -m pytest -q -p no:cacheprovider -n 2 --dist loadscope tests)
  echo "== job (b): the GPU kit's dry run (benchmarks/gpu_check.sh --dry-run, with the wheels it carries)"
  PYTHON="$VENV_CUDA/bin/python" bash scripts/make_wheels.sh
  OUT="$(mktemp -d)" PYTHON="$VENV_CUDA/bin/python" FLOWBP_PREBUILT_SO="$(ls "$BUILD_B"/flowbp_kernels/_C*.so | head -1)" \
    bash benchmarks/gpu_check.sh --dry-run
fi
echo "== all test jobs passed"
