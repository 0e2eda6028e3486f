"""Bit-exact conversions shared by the Triton kernels (the roundings of c10 and of csrc/common.h and
csrc/euler_cache_step/euler_cache_step.h).

bf16 <-> fp32 by shifts (round to nearest even, NaN -> 0x7FC0), fp32 -> e4m3fn by the c10 algorithm
(subnormals by adding 2^14, normals by integer rounding of the mantissa; NaN -> NaN, and magnitudes from
464 up, infinity included, saturate to +-448 as torch's cast does since it stopped giving NaN there; the
op's scaled values never exceed 448 anyway). Kinds: 0 fp32, 1 fp16, 2 bf16 (an int16 view of the tensor),
3 e4m3fn (a uint8 view).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

KIND_F32, KIND_F16, KIND_BF16, KIND_FP8 = 0, 1, 2, 3
_KINDS = {torch.float32: KIND_F32, torch.float16: KIND_F16, torch.bfloat16: KIND_BF16, torch.float8_e4m3fn: KIND_FP8}
_VIEWS = {KIND_BF16: torch.int16, KIND_FP8: torch.uint8}
#: dtypes the Triton kernels read and write (working precision fp32).
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_arg(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(tensor as the kernel sees it, kind)``: bf16 and fp8 tensors become integer views."""
    kind = _KINDS[t.dtype]
    return (t.view(_VIEWS[kind]) if kind in _VIEWS else t), kind


@triton.jit
def load_f32(ptr, offs, mask, KIND: tl.constexpr):
    if KIND == 2:
        b = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)
        return ((b & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=mask, other=0).to(tl.float32)


@triton.jit
def bf16_bits(f):
    u = f.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return tl.where(f != f, 0x7FC0, r).to(tl.int16)


@triton.jit
def e4m3fn_bits(f):
    u = f.to(tl.uint32, bitcast=True)
    a = u & 0x7FFFFFFF
    sub = (a.to(tl.float32, bitcast=True) + 16384.0).to(tl.uint32, bitcast=True) - (141 << 23)
    norm = (a - (120 << 23) + 0x7FFFF + ((a >> 20) & 1)) >> 20
    # NaN above the infinity pattern; from 464.0 (0x43E80000) up, infinity included, saturate to 448 (0x7E)
    r = tl.where(a > 0x7F800000, 0x7F, tl.where(a >= 0x43E80000, 0x7E, tl.where(a < (121 << 23), sub, norm)))
    return (r | ((u >> 31) << 7)).to(tl.uint8)


@triton.jit
def store_f32(ptr, offs, val, mask, KIND: tl.constexpr):
    if KIND == 2:
        tl.store(ptr + offs, bf16_bits(val), mask=mask)
    elif KIND == 1:
        tl.store(ptr + offs, val.to(tl.float16), mask=mask)
    else:
        tl.store(ptr + offs, val, mask=mask)
