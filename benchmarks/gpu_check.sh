#!/usr/bin/env bash
# One-shot check on a lent GPU (run from the repository root; writes everything under $OUT):
# build the extension with CUDA kernels in place, print the environment, run the CUDA and Triton kernel
# tests (Triton compiled for the GPU, not interpreted), then benchmarks/kernel_speed.py on every shape.
# Each step has its own time limit and the script goes on after a failure; $OUT/summary.txt says what passed.
set -uo pipefail
OUT="${OUT:-/tmp/flowbp-gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
unset TRITON_INTERPRET FLOWBP_BACKEND
export FLOWBP_CUDA_ARCHS="${FLOWBP_CUDA_ARCHS:-$("$PY" -c "import torch; c=torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")}"
export MAX_JOBS="${MAX_JOBS:-16}"
# torch derives CUDA_HOME from `which nvcc`; a /usr/local/bin/nvcc link or wrapper script gives /usr/local,
# where there is no libcudart: take the toolkit folder that has both nvcc and the runtime library
if [ -z "${CUDA_HOME:-}" ]; then
  for c in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent)")")")" /usr/local/cuda; do
    if [ -x "$c/bin/nvcc" ] && ls "$c"/lib64/libcudart.so* >/dev/null 2>&1; then export CUDA_HOME="$c"; break; fi
  done
fi
NV_INC="$("$PY" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'include'))" 2>/dev/null || true)"
[ -n "$NV_INC" ] && [ -d "$NV_INC" ] && export CPATH="$NV_INC${CPATH:+:$CPATH}"
summary() { echo "$1: $2" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

timeout 420 env FLOWBP_FORCE_CUDA_BUILD=1 "$PY" setup.py build_ext --inplace > "$OUT/build.txt" 2>&1
summary build "rc=$?"
timeout 60 "$PY" -m flowbp_kernels.env > "$OUT/env.txt" 2>&1
summary env "rc=$?"
timeout 300 "$PY" -m pytest -q -x tests/ops -k "cuda or triton or dispatch" -p no:cacheprovider > "$OUT/tests.txt" 2>&1
summary tests "rc=$? $(tail -1 "$OUT/tests.txt")"
timeout 400 "$PY" benchmarks/kernel_speed.py --all --out "$OUT/kernel_speed.json" > "$OUT/kernel_speed.txt" 2>&1
summary kernel_speed "rc=$?"
cat "$OUT/summary.txt"
