#!/usr/bin/env bash
# Set up and run the main job on its built-in default: the CPU miniature (offline, a few minutes on
# 2 cores). Creates .venv with torch 2.13.0 (CPU build, installed first so nothing pulls a CUDA build),
# installs the project with its CPU kernels, aligns the miniature with FlowBP-Lagrange (flowbp-train, the
# trainer of every family) and writes its report (flowbp-mini report): the before/after grids, curves,
# summary and LoRA under flowbp-output/mini-flowbp-lagrange/ (or the output_dir=... given).
# Environment: VENV (default .venv); extra arguments go to flowbp-train (key=value overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[train]"
OUT=flowbp-output/mini-flowbp-lagrange
for arg in "$@"; do
  case "$arg" in output_dir=*) OUT="${arg#output_dir=}" ;; esac
done
"$VENV/bin/flowbp-train" recipes/mini/flowbp-lagrange.yaml "$@"
"$VENV/bin/flowbp-mini" report "$OUT"
