#!/usr/bin/env bash
# Set up and run the whole test suite on a fresh machine (the README's test command; CI calls it).
#   job (a): a venv with torch 2.13.0 (CPU build, installed first so nothing pulls a CUDA build), the
#            project with its CPU extension (--no-build-isolation), every test (Triton in the interpreter);
#   job (b): a venv with torch 2.14.1 + torchvision (CUDA 13 build, from local disk here) for what needs
#            them: the open_clip-based reward tests and the CUDA extension build (compiled, not run);
#            the GPU kit's dry run (every stage on the CPU, with the wheels scripts/make_wheels.sh fetches).
# Environment: VENV (default .venv), VENV_CUDA (default .venv-cuda), FLOWBP_SKIP_JOB_B=1 skips job (b).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=$(realpath -m "${VENV:-.venv}")
VENV_CUDA=$(realpath -m "${VENV_CUDA:-.venv-cuda}")
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off

echo "== job (a): torch 2.13.0 CPU, all tests"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[dev,train]"
"$VENV/bin/python" -m flowbp_kernels.env 2>/dev/null || true
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests

if [ "${FLOWBP_SKIP_JOB_B:-0}" != "1" ]; then
  echo "== job (b): torch 2.14.1 + torchvision + open_clip: reward tests, CUDA extension build"
  [ -x "$VENV_CUDA/bin/python" ] || "$PY" -m venv "$VENV_CUDA"
  "$VENV_CUDA/bin/python" -m pip install -q --upgrade pip setuptools wheel
  "$VENV_CUDA/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
  "$VENV_CUDA/bin/python" -m pip install -q open_clip_torch pytest pyyaml numpy pillow "transformers>=4.44" \
    "diffusers>=0.32" safetensors tqdm matplotlib
  export KEEP_SO="$(mktemp -d)"  # ci_cuda_build.sh leaves its module there for the GPU kit's dry run below
  if [ -f scripts/ci_cuda_build.sh ]; then
    VENV="$VENV_CUDA" bash scripts/ci_cuda_build.sh
  fi
  echo "== job (b): the GPU kit's dry run (benchmarks/gpu_check.sh --dry-run, with the wheels it carries)"
  PYTHON="$VENV_CUDA/bin/python" bash scripts/make_wheels.sh
  OUT="$(mktemp -d)" PYTHON="$VENV_CUDA/bin/python" FLOWBP_PREBUILT_SO="$(ls "$KEEP_SO"/_C*.so 2>/dev/null | head -1)" \
    bash benchmarks/gpu_check.sh --dry-run
  PYTHONPATH="$PWD:$PWD/python" "$VENV_CUDA/bin/python" -m pytest -q -p no:cacheprovider tests/rewards
fi
echo "== all test jobs passed"
