#!/usr/bin/env bash
# The wheels the GPU kit (benchmarks/gpu_check.sh) installs where no package registry is reachable: the
# trainer's libraries at the versions this repository's CI tests with, for Python 3.12 on x86-64, pure or
# abi3 wheels only (so that the kit's CPU dry run installs the very same files here, on any Python >= 3.10).
# The kit installs them with --no-deps into a folder put first on PYTHONPATH, so they win over whatever the
# machine has; torch, torchvision, triton, numpy, pytest and the HTTP stack's small deps are the machine's.
# Usage: bash scripts/make_wheels.sh [DIR]   (default .whl, git-ignored); PYTHON picks the pip (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DIR="${1:-.whl}"
# Most bytes the folder may take: the device's working-tree limit is 64 MiB with the repository (about 5 MiB).
MAX_MIB=40
PKGS=(
  diffusers==0.42.1 peft==0.21.2 transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0 accelerate==1.15.0
  huggingface_hub==1.33.0 httpx==0.28.1 httpcore==1.0.9   # the hub release all of the above accept
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4       # the HPSv2 reward tower
  pytest-timeout==2.4.0                                  # the kit's per-test time limit
)
rm -rf "$DIR"
mkdir -p "$DIR"
PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DIR" "${PKGS[@]}"
n=$(ls "$DIR"/*.whl | wc -l)
[ "$n" -eq "${#PKGS[@]}" ] || { echo "make_wheels: expected ${#PKGS[@]} wheels, got $n" >&2; exit 1; }
for w in "$DIR"/*.whl; do  # a cp312-only wheel would not install in the dry run on another Python
  case "$(basename "$w")" in *-py3-none-any.whl|*-abi3-*.whl) ;; *) echo "make_wheels: not pure/abi3: $w" >&2; exit 1;; esac
done
mib=$(( $(du -cb "$DIR"/*.whl | tail -1 | cut -f1) / 1048576 ))
[ "$mib" -le "$MAX_MIB" ] || { echo "make_wheels: $mib MiB > $MAX_MIB MiB" >&2; exit 1; }
echo "make_wheels: $n wheels, $mib MiB in $DIR"
