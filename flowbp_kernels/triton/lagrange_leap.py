"""Triton kernel of ``lagrange_leap`` (forward): xhat = anchor + base + sum_m w_m u_m, the pinned copy of
target and per-block partial sums of |xhat - target|, in one pass over every input.

Up to MAX_NODES nodes per launch (pointer arguments, pruned by the NUM_NODES constexpr); more nodes
chain launches through the fp32 output (the same additions in the same order). Grid: (blocks per
sample, batch); the per-block partial sums are added on the host in float64 (deterministic).
``lagrange_leap_fwd_op`` is the same launcher as a torch custom op, which torch.compile keeps opaque.
Math: ops/reference.py lagrange_leap_ref. Limits: fp32 working precision.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flowbp_kernels.triton._convert import TRITON_DTYPES, kernel_arg, load_f32
from flowbp_kernels.triton._launch import LAUNCH_OPTIONS, device_guard, num_warps_for

MAX_NODES = 8
BLOCK = 1024


@triton.jit
def _lagrange_leap_fwd_kernel(
    a_ptr, b_ptr, t_ptr, o_ptr, part_ptr,
    u0, u1, u2, u3, u4, u5, u6, u7,
    w0, w1, w2, w3, w4, w5, w6, w7,
    per, nblocks,
    A_KIND: tl.constexpr, B_KIND: tl.constexpr, T_KIND: tl.constexpr, HAS_BASE: tl.constexpr,
    HAS_TARGET: tl.constexpr, NUM_NODES: tl.constexpr, U_BF16: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    j = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = j < per
    offs = b * per + j
    x = load_f32(a_ptr, offs, mask, A_KIND)
    if HAS_BASE:
        x = x + load_f32(b_ptr, offs, mask, B_KIND)
    # Kind 2 (bf16 view) where the node's bit in U_BF16 is set, else a plain load.
    if NUM_NODES > 0:
        x = x + w0 * load_f32(u0, offs, mask, 2 * ((U_BF16 >> 0) & 1))
    if NUM_NODES > 1:
        x = x + w1 * load_f32(u1, offs, mask, 2 * ((U_BF16 >> 1) & 1))
    if NUM_NODES > 2:
        x = x + w2 * load_f32(u2, offs, mask, 2 * ((U_BF16 >> 2) & 1))
    if NUM_NODES > 3:
        x = x + w3 * load_f32(u3, offs, mask, 2 * ((U_BF16 >> 3) & 1))
    if NUM_NODES > 4:
        x = x + w4 * load_f32(u4, offs, mask, 2 * ((U_BF16 >> 4) & 1))
    if NUM_NODES > 5:
        x = x + w5 * load_f32(u5, offs, mask, 2 * ((U_BF16 >> 5) & 1))
    if NUM_NODES > 6:
        x = x + w6 * load_f32(u6, offs, mask, 2 * ((U_BF16 >> 6) & 1))
    if NUM_NODES > 7:
        x = x + w7 * load_f32(u7, offs, mask, 2 * ((U_BF16 >> 7) & 1))
    if HAS_TARGET:
        t = load_f32(t_ptr, offs, mask, T_KIND)
        tl.store(o_ptr + offs, t, mask=mask)
        d = tl.sum(tl.where(mask, tl.abs(x - t), 0.0), axis=0)
        tl.store(part_ptr + b * nblocks + pid, d)
    else:
        tl.store(o_ptr + offs, x, mask=mask)


def unsupported(anchor: torch.Tensor, nodes, target, base) -> str | None:
    """Why this launcher cannot serve the call (None when it can)."""
    for name, t in [("anchor", anchor), ("target", target), ("base", base)] + [("nodes", u) for u in nodes]:
        if t is not None and t.dtype not in TRITON_DTYPES:
            return f"{name} is {t.dtype}; the Triton kernels take float32/float16/bfloat16"
    if anchor.shape[0] > 65535:
        return "batch larger than the grid's second dimension (65535)"
    return None


def lagrange_leap_fwd(anchor, nodes, weights, target, base):
    """Launcher: returns ``(out fp32, residual [B] fp32 or None)``; arguments were checked by the caller."""
    batch = anchor.shape[0]
    per = anchor.numel() // batch if batch else 0
    out = torch.empty(anchor.shape, dtype=torch.float32, device=anchor.device)
    if anchor.numel() == 0:
        res = torch.full((batch,), float("nan"), device=anchor.device) if target is not None else None
        return out, res
    nblocks = triton.cdiv(per, BLOCK)
    part = torch.empty((batch, nblocks), dtype=torch.float32, device=anchor.device) if target is not None else out
    nodes = [u.contiguous() for u in nodes]
    chunks = [list(range(i, min(i + MAX_NODES, len(nodes)))) for i in range(0, len(nodes), MAX_NODES)] or [[]]
    cur, cur_kind = kernel_arg(anchor.contiguous())
    for ci, idx in enumerate(chunks):
        last = ci == len(chunks) - 1
        us = [kernel_arg(nodes[m]) for m in idx]
        ptrs = [u for u, _ in us] + [cur] * (MAX_NODES - len(us))
        ws = [float(weights[m]) for m in idx] + [0.0] * (MAX_NODES - len(us))
        mask = sum(1 << k for k, (_, kind) in enumerate(us) if kind == 2)
        bk, bkind = kernel_arg(base.contiguous()) if (ci == 0 and base is not None) else (cur, 0)
        tk, tkind = kernel_arg(target.contiguous()) if (last and target is not None) else (cur, 0)
        with device_guard(anchor):
            _lagrange_leap_fwd_kernel[(nblocks, batch)](
                cur, bk, tk, out, part, *ptrs, *ws, per, nblocks,
                A_KIND=cur_kind, B_KIND=bkind, T_KIND=tkind, HAS_BASE=ci == 0 and base is not None,
                HAS_TARGET=last and target is not None, NUM_NODES=len(us), U_BF16=mask, BLOCK=BLOCK,
                num_warps=num_warps_for(BLOCK), **LAUNCH_OPTIONS,
            )  # fmt: skip
        cur, cur_kind = out, 0
    if target is None:
        return out, None
    return out, (part.double().sum(dim=1) / per).float()


@torch.library.custom_op("flowbp_triton::lagrange_leap_fwd", mutates_args=())
def lagrange_leap_fwd_op(anchor: torch.Tensor, nodes: list[torch.Tensor], weights: list[float],
                         target: torch.Tensor | None, base: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`lagrange_leap_fwd` for torch.compile (dynamo does not trace a Triton launch with our compile
    options); the residual is empty without a target."""
    out, res = lagrange_leap_fwd(anchor, nodes, weights, target, base)
    return out, (res if res is not None else out.new_empty(0))


@lagrange_leap_fwd_op.register_fake
def _(anchor, nodes, weights, target, base):
    res = anchor.new_empty((anchor.shape[0] if target is not None else 0,), dtype=torch.float32)
    return anchor.new_empty(anchor.shape, dtype=torch.float32), res
