#!/usr/bin/env bash
# CI job (b): build the CUDA kernels against a CUDA torch (2.14.1, CUDA 13.0) on a machine without a GPU,
# then load the extension and check that every op has CPU and CUDA kernels registered. Nothing CUDA runs.
# The build happens in a temporary copy of the tree, so the repository's own (CPU) build is untouched.
# Env: VENV (default /tmp/flowbp-cuda-venv), PYTHON (default python3), FLOWBP_CUDA_ARCHS (default 9.0+PTX here:
# one architecture keeps the job within its budget; the package default is "8.0;9.0+PTX"), MAX_JOBS (default 2),
# FLOWBP_CUDA_BUILD_DIR (build in this folder and keep it, e.g. to run the tests there; default: a
# temporary folder, removed at the end). The built module is checked to hold sm_90 machine code and PTX
# (cuobjdump, from the toolkit or Triton's copy). KEEP_SO=DIR copies the built module there.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-/tmp/flowbp-cuda-venv}"
PYTHON="${PYTHON:-python3}"
export FLOWBP_CUDA_ARCHS="${FLOWBP_CUDA_ARCHS:-9.0+PTX}"
export MAX_JOBS="${MAX_JOBS:-2}"
# torch derives CUDA_HOME from `which nvcc`; a /usr/local/bin/nvcc link or wrapper script gives /usr/local,
# where there is no libcudart: take the toolkit folder that has both nvcc and the runtime library
if [ -z "${CUDA_HOME:-}" ]; then
  for c in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent)")")")" /usr/local/cuda; do
    if [ -x "$c/bin/nvcc" ] && ls "$c"/lib64/libcudart.so* >/dev/null 2>&1; then export CUDA_HOME="$c"; break; fi
  done
fi
t0=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  # --system-site-packages: reuse an identical system torch when there is one (no 5.5 GB copy)
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install -q "torch==2.14.1" setuptools wheel ninja
PY="$VENV/bin/python"
"$PY" -c "import torch; assert torch.version.cuda, 'torch has no CUDA'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

# the system toolkit lacks some headers torch includes (cusparse.h): use the pip CUDA 13 headers
NV_INC="$("$PY" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'include'))")"
[ -f "$NV_INC/cusparse.h" ] || { echo "missing $NV_INC/cusparse.h"; exit 1; }
export CPATH="$NV_INC${CPATH:+:$CPATH}"

if [ -n "${FLOWBP_CUDA_BUILD_DIR:-}" ]; then
  WORK="$FLOWBP_CUDA_BUILD_DIR"
  mkdir -p "$WORK"
else
  WORK="$(mktemp -d /tmp/flowbp-cuda-build.XXXXXX)"
  trap 'rm -rf "$WORK"' EXIT
fi
(cd "$REPO" && tar --exclude=./build --exclude='*.so' --exclude=./.git --exclude='./.venv*' --exclude=./flowbp-output --exclude=__pycache__ -cf - .) | tar -xf - -C "$WORK"
cd "$WORK"
FLOWBP_FORCE_CUDA_BUILD=1 "$PY" setup.py -q build_ext --inplace
ls flowbp_kernels/_C*.so
CUOBJDUMP="$(command -v cuobjdump || ls "$CUDA_HOME"/bin/cuobjdump 2>/dev/null || \
  "$PY" -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))")"
if [ -x "$CUOBJDUMP" ]; then
  ELF="$("$CUOBJDUMP" --list-elf flowbp_kernels/_C*.so)"
  PTX="$("$CUOBJDUMP" --list-ptx flowbp_kernels/_C*.so)"
  echo "module holds machine code for: $(grep -o 'sm_[0-9a-z]*' <<<"$ELF" | sort -u | tr '\n' ' ')" \
    "and PTX for: $(grep -o 'sm_[0-9a-z]*' <<<"$PTX" | sort -u | tr '\n' ' ')"
  grep -q "sm_90" <<<"$ELF" || { echo "no sm_90 machine code in the module"; exit 1; }
  if [[ "$FLOWBP_CUDA_ARCHS" == *PTX* ]]; then
    grep -q "sm_90" <<<"$PTX" || { echo "no sm_90 PTX in the module"; exit 1; }
  fi
else
  echo "cuobjdump not found: architectures of the module not checked"
fi

FLOWBP_JIT=0 PYTHONPATH="$WORK" "$PY" - <<'PYEOF'
import torch
from flowbp_kernels import _ext
assert _ext.load(), _ext.status()
st = _ext.status()
assert st["origin"].startswith("prebuilt"), st
for op in _ext.OPS:
    name = f"flowbp::{op}"
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), f"{name} has no {key} kernel"
assert st["cuda"], st
assert not torch.cuda.is_initialized()
print("ops registered with CPU and CUDA kernels:", ", ".join(_ext.OPS))
PYEOF
if [ -n "${KEEP_SO:-}" ]; then mkdir -p "$KEEP_SO" && cp flowbp_kernels/_C*.so "$KEEP_SO"/; fi
echo "ci_cuda_build: ok in $(( $(date +%s) - t0 )) s"
