"""Launch settings shared by the Triton launchers: compile options, warps per program, the device guard.

``enable_fp_fusion=False``: the kernels perform the reference's fp32 operations with two roundings (``x + h*v``
must not become one FMA; Triton <= 3.9 fuses by default, 3.10 will not); every launch passes it, so the
result does not depend on the Triton version. Warps grow with the elements one program holds, so a tile
stays near ELEMS_PER_THREAD values per thread and operand instead of spilling to local memory.
"""

from __future__ import annotations

import contextlib

import torch

#: Compile options of every launch (see the module docstring).
LAUNCH_OPTIONS = {"enable_fp_fusion": False}
#: Values per thread and operand a tile may hold: ptxas spilled at 16 (a 2048-element euler_cache_step tile
#: on 4 warps, the leap with 5 nodes on 1024) and fits at 4 with every specialization (tests/kernels/ops/triton_aot.py).
ELEMS_PER_THREAD = 4
MIN_WARPS, MAX_WARPS = 4, 32


def num_warps_for(tile_elems: int) -> int:
    """Warps for a program of ``tile_elems`` elements: a power of two in [MIN_WARPS, MAX_WARPS]."""
    warps = MIN_WARPS
    while warps < MAX_WARPS and warps * 32 * ELEMS_PER_THREAD < tile_elems:
        warps *= 2
    return warps


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device); nothing for CPU tensors (interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
