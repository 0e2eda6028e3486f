"""Triton kernel of ``euler_cache_step``: x_next = x + h v, x_cached, and v compressed, in one pass.

One program covers ROWS rows of the last dimension (padded to BLOCK_C, a power of two up to
MAX_BLOCK_C), so the fp8 row absmax is a reduction inside the tile; warps grow with the tile. The fp8
scale is ``RN(amax / 448)`` and each value ``RN(v / scale)``, correctly rounded divisions (``div_rn``: Triton's
``/`` is approximate on a GPU), which is the definition the reference, the CPU and the CUDA kernels share.
``euler_cache_step_fwd_op`` is the launcher as a torch custom op, opaque to torch.compile. Math:
ops/reference.py euler_cache_step_ref. Limits: fp32 working precision; rows longer than MAX_BLOCK_C are
not served.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flowbp_kernels.triton._convert import e4m3fn_bits, kernel_arg, load_f32, store_f32
from flowbp_kernels.triton._launch import LAUNCH_OPTIONS, device_guard, num_warps_for

#: Longest row one tile holds (64 KiB of fp32 per operand); longer rows go to another backend.
MAX_BLOCK_C = 16384
#: Elements per program: enough work per program for a memory-bound kernel, small enough for registers.
TILE_ELEMS = 2048


@triton.jit
def _euler_cache_step_kernel(
    x_ptr, v_ptr, xn_ptr, xc_ptr, vd_ptr, sc_ptr, h, rows, cols,
    X_KIND: tl.constexpr, V_KIND: tl.constexpr, L_KIND: tl.constexpr, FMT: tl.constexpr,
    WRITE_CACHED: tl.constexpr, WRITE_DATA: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, BLOCK_C)
    rmask = r < rows
    mask = rmask[:, None] & (c < cols)[None, :]
    offs = r[:, None] * cols + c[None, :]
    x = load_f32(x_ptr, offs, mask, X_KIND)
    v = load_f32(v_ptr, offs, mask, V_KIND)
    tl.store(xn_ptr + offs, x + h * v, mask=mask)
    if WRITE_CACHED:
        store_f32(xc_ptr, offs, x, mask, L_KIND)
    if FMT == 0:
        if WRITE_DATA:
            tl.store(vd_ptr + offs, v, mask=mask)
    elif FMT == 1:
        store_f32(vd_ptr, offs, v, mask, 2)
    else:
        amax = tl.max(tl.where(mask, tl.abs(v), 0.0), axis=1)
        has_nan = tl.max(tl.where(mask & (v != v), 1, 0), axis=1)
        scale = tl.maximum(tl.math.div_rn(amax, 448.0), 1e-30)
        scale = tl.where(has_nan > 0, float("nan"), scale)
        tl.store(vd_ptr + offs, e4m3fn_bits(tl.math.div_rn(v, scale[:, None])), mask=mask)
        tl.store(sc_ptr + r, scale, mask=rmask)


def unsupported(x: torch.Tensor, v: torch.Tensor, latent_dtype: torch.dtype) -> str | None:
    """Why this launcher cannot serve the call (None when it can)."""
    from flowbp_kernels.triton._convert import TRITON_DTYPES

    for name, dt in (("x", x.dtype), ("v", v.dtype), ("latent_dtype", latent_dtype)):
        if dt not in TRITON_DTYPES:
            return f"{name} is {dt}; the Triton kernels take float32/float16/bfloat16"
    if x.dim() >= 1 and x.shape[-1] > MAX_BLOCK_C:
        return f"rows of {x.shape[-1]} elements exceed the Triton tile ({MAX_BLOCK_C})"
    return None


def euler_cache_step_fwd(
    x: torch.Tensor,
    v: torch.Tensor,
    h: float,
    fmt: int,
    latent_dtype: torch.dtype,
    write_cached: bool = True,
    write_data: bool = True,
):
    """Launcher: checks were done by the caller; allocates the outputs and launches one kernel.
    ``write_cached`` / ``write_data`` False: that output is returned empty (the caller keeps x / v)."""
    x = x.contiguous()
    v = v.contiguous()
    x_next = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    x_cached = torch.empty(x.shape if write_cached else (0,), dtype=latent_dtype, device=x.device)
    data_dtype = (torch.float32, torch.bfloat16, torch.float8_e4m3fn)[fmt]
    v_data = torch.empty(x.shape if write_data else (0,), dtype=data_dtype, device=x.device)
    cols = x.shape[-1] if x.dim() else 1
    scale_shape = (*x.shape[:-1], 1) if fmt == 2 else (0,)
    v_scale = torch.empty(scale_shape, dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return x_next, x_cached, v_data, v_scale
    rows = x.numel() // cols
    block_c = triton.next_power_of_2(cols)
    rows_per = max(1, TILE_ELEMS // block_c)
    xk, xkind = kernel_arg(x)
    vk, vkind = kernel_arg(v)
    ck, ckind = kernel_arg(x_cached) if write_cached else (x_next, 0)
    dk, _ = kernel_arg(v_data) if write_data else (x_next, 0)
    grid = (triton.cdiv(rows, rows_per),)
    with device_guard(x):
        _euler_cache_step_kernel[grid](
            xk, vk, x_next, ck, dk, v_scale if fmt == 2 else x_next, float(h), rows, cols,
            X_KIND=xkind, V_KIND=vkind, L_KIND=ckind, FMT=fmt, WRITE_CACHED=write_cached, WRITE_DATA=write_data,
            ROWS=rows_per, BLOCK_C=block_c, num_warps=num_warps_for(rows_per * block_c), **LAUNCH_OPTIONS,
        )  # fmt: skip
    return x_next, x_cached, v_data, v_scale


@torch.library.custom_op("flowbp_triton::euler_cache_step", mutates_args=())
def euler_cache_step_fwd_op(x: torch.Tensor, v: torch.Tensor, h: float, fmt: int, latent_dtype: torch.dtype,
                            write_cached: bool, write_data: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`euler_cache_step_fwd` for torch.compile (dynamo does not trace a Triton launch with our options)."""
    return euler_cache_step_fwd(x, v, h, fmt, latent_dtype, write_cached, write_data)


@euler_cache_step_fwd_op.register_fake
def _(x, v, h, fmt, latent_dtype, write_cached, write_data):
    data_dtype = (torch.float32, torch.bfloat16, torch.float8_e4m3fn)[fmt]
    scale_shape = (*x.shape[:-1], 1) if fmt == 2 else (0,)
    x_cached = x.new_empty(x.shape if write_cached else (0,), dtype=latent_dtype)
    v_data = x.new_empty(x.shape if write_data else (0,), dtype=data_dtype)
    return x.new_empty(x.shape, dtype=torch.float32), x_cached, v_data, x.new_empty(scale_shape, dtype=torch.float32)
