"""Triton kernel of ``surrogate_vjp``: c_m = coefs[m] * (upstream + adjoint) for P nodes in one pass.

Up to MAX_NODES cotangents per launch (more: further launches over the same inputs). Also the
backward of ``lagrange_leap`` (adjoint None, coefs w_m * scale_m). Math: ops/reference.py
surrogate_vjp_ref. ``surrogate_vjp_fwd_op``: the launcher as a torch custom op, opaque to torch.compile.
Limits: fp32 working precision; outputs float32/float16/bfloat16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flowbp_kernels.triton._convert import TRITON_DTYPES, kernel_arg, load_f32, store_f32
from flowbp_kernels.triton._launch import LAUNCH_OPTIONS, device_guard, num_warps_for

MAX_NODES = 8
BLOCK = 1024


@triton.jit
def _surrogate_vjp_kernel(
    g_ptr, a_ptr, o_ptr, n,
    c0, c1, c2, c3, c4, c5, c6, c7,
    G_KIND: tl.constexpr, A_KIND: tl.constexpr, HAS_ADJ: tl.constexpr, O_KIND: tl.constexpr,
    NUM_NODES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    n = tl.cast(n, tl.int64)  # m * n: the offset of cotangent m passes 2^31 well before n does
    g = load_f32(g_ptr, offs, mask, G_KIND)
    if HAS_ADJ:
        g = g + load_f32(a_ptr, offs, mask, A_KIND)
    if NUM_NODES > 0:
        store_f32(o_ptr, offs, c0 * g, mask, O_KIND)
    if NUM_NODES > 1:
        store_f32(o_ptr, n + offs, c1 * g, mask, O_KIND)
    if NUM_NODES > 2:
        store_f32(o_ptr, 2 * n + offs, c2 * g, mask, O_KIND)
    if NUM_NODES > 3:
        store_f32(o_ptr, 3 * n + offs, c3 * g, mask, O_KIND)
    if NUM_NODES > 4:
        store_f32(o_ptr, 4 * n + offs, c4 * g, mask, O_KIND)
    if NUM_NODES > 5:
        store_f32(o_ptr, 5 * n + offs, c5 * g, mask, O_KIND)
    if NUM_NODES > 6:
        store_f32(o_ptr, 6 * n + offs, c6 * g, mask, O_KIND)
    if NUM_NODES > 7:
        store_f32(o_ptr, 7 * n + offs, c7 * g, mask, O_KIND)


def unsupported(upstream: torch.Tensor, adjoint, out_dtype: torch.dtype) -> str | None:
    """Why this launcher cannot serve the call (None when it can)."""
    for name, dt in (("upstream", upstream.dtype), ("adjoint", adjoint.dtype if adjoint is not None else None),
                     ("out_dtype", out_dtype)):  # fmt: skip
        if dt is not None and dt not in TRITON_DTYPES:
            return f"{name} is {dt}; the Triton kernels take float32/float16/bfloat16"
    return None


def surrogate_vjp_fwd(upstream, adjoint, coefs, out_dtype):
    """Launcher: returns ``[P, *upstream.shape]`` in ``out_dtype``; arguments were checked by the caller."""
    p = len(coefs)
    out = torch.empty((p, *upstream.shape), dtype=out_dtype, device=upstream.device)
    n = upstream.numel()
    if p == 0 or n == 0:
        return out
    gk, gkind = kernel_arg(upstream.contiguous())
    ak, akind = kernel_arg(adjoint.contiguous()) if adjoint is not None else (gk, 0)
    ok, okind = kernel_arg(out)
    grid = (triton.cdiv(n, BLOCK),)
    for m0 in range(0, p, MAX_NODES):
        cs = [float(c) for c in coefs[m0 : m0 + MAX_NODES]]
        with device_guard(upstream):
            _surrogate_vjp_kernel[grid](
                gk, ak, ok[m0:], n, *(cs + [0.0] * (MAX_NODES - len(cs))),
                G_KIND=gkind, A_KIND=akind, HAS_ADJ=adjoint is not None, O_KIND=okind,
                NUM_NODES=len(cs), BLOCK=BLOCK, num_warps=num_warps_for(BLOCK), **LAUNCH_OPTIONS,
            )  # fmt: skip
    return out


@torch.library.custom_op("flowbp_triton::surrogate_vjp", mutates_args=())
def surrogate_vjp_fwd_op(upstream: torch.Tensor, adjoint: torch.Tensor | None, coefs: list[float],
                         out_dtype: torch.dtype) -> torch.Tensor:
    """:func:`surrogate_vjp_fwd` for torch.compile (dynamo does not trace a Triton launch with our options)."""
    return surrogate_vjp_fwd(upstream, adjoint, coefs, out_dtype)


@surrogate_vjp_fwd_op.register_fake
def _(upstream, adjoint, coefs, out_dtype):
    return upstream.new_empty((len(coefs), *upstream.shape), dtype=out_dtype)
