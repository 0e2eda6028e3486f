"""Lagrange leap: ``xhat_b = x~_a + base + sum_m w_m u_m``, pinned to ``x_b``, with its residual.

One autograd Function serves every segment of every method (Euler segments are leaps whose weights
are the step widths; cached nodes are folded into ``base``). Forward value of the pinned output is
exactly ``target`` (a custom Function, because ``xhat + sg(target - xhat)`` is not exactly ``target``
in floating point); the gradient is the identity to ``xhat``, so ``grad_anchor = g`` and
``grad_node_m = w_m * scale_m * g``. Math: shared/design/ALGORITHM.md section 3; reference:
``ops.reference.lagrange_leap_ref``. Backends: the compiled CPU/CUDA kernel (csrc/lagrange_leap/) or
Triton (triton/lagrange_leap.py) computes xhat, the pinned copy and the residual in one pass; the
backward is one ``surrogate_vjp`` pass per node dtype, and a node whose coefficient is 1 in the
gradient's dtype gets the upstream gradient itself (nothing to compute or store).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from flowbp_kernels.ops import reference as ref
from flowbp_kernels.ops._dispatch import choose_backend, compiled_dtypes_check
from flowbp_kernels.ops._surrogate_vjp import _dispatch_vjp


def _as_floats(name: str, values, n: int | None = None) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).reshape(-1).tolist()
    out = [float(v) for v in values]
    if n is not None and len(out) != n:
        raise ValueError(f"{name} must have one entry per node ({n}), got {len(out)}")
    for v in out:
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {out}")
    return out


def _compiled_fwd(anchor, nodes, weights, target, base):
    out, residual = torch.ops.flowbp.lagrange_leap_fwd(anchor, nodes, [float(w) for w in weights], target, base)
    return out, (residual if target is not None else None)


def _triton_fwd(anchor, nodes, weights, target, base):
    from flowbp_kernels.triton import lagrange_leap as kernels

    if torch.compiler.is_compiling():  # the custom op: dynamo keeps the launch opaque
        out, res = kernels.lagrange_leap_fwd_op(anchor, nodes, [float(w) for w in weights], target, base)
        return out, (res if target is not None else None)
    return kernels.lagrange_leap_fwd(anchor, nodes, weights, target, base)


_FORWARD = {"torch": ref.lagrange_leap_ref, "cpu": _compiled_fwd, "cuda": _compiled_fwd, "triton": _triton_fwd}


def _leap_forward(anchor, nodes, weights, target, base):
    tensors = [anchor, target, base, *nodes]

    def check(backend: str) -> str | None:
        why = compiled_dtypes_check(*[t.dtype for t in tensors if t is not None])
        if why is None and backend == "triton":
            from flowbp_kernels.triton.lagrange_leap import unsupported

            why = unsupported(anchor, nodes, target, base)
        return why

    backend = choose_backend("lagrange_leap", anchor, check)
    return _FORWARD[backend](anchor, nodes, weights, target, base)


def _leap_backward(grad_out, weights, scales, node_dtypes):
    """``grad_node_m = (w_m * scale_m) * g`` in the node's dtype: one pass per distinct node dtype."""
    coefs = [float(w) * float(s) for w, s in zip(weights, scales)]
    grads: list[torch.Tensor | None] = [None] * len(coefs)
    groups: dict[torch.dtype, list[int]] = {}
    for m, (c, dt) in enumerate(zip(coefs, node_dtypes)):
        if c == 1.0 and dt == grad_out.dtype:
            grads[m] = grad_out  # the upstream gradient itself: nothing to materialise
        else:
            groups.setdefault(dt, []).append(m)
    for dt, idx in groups.items():
        stacked = _dispatch_vjp(grad_out, None, [coefs[m] for m in idx], dt)
        for k, m in enumerate(idx):
            grads[m] = stacked[k]
    return grad_out, grads


class LagrangeLeap(torch.autograd.Function):
    """Autograd Function: ``(anchor, base, target, weights, scales, *nodes) -> (out, residual)``."""

    @staticmethod
    def forward(ctx, *args):
        # one *args, unpacked here: named parameters before *nodes get misbound by dynamo (torch.compile)
        # when non-tensors precede two or more nodes
        anchor, base, target, weights, scales, *nodes = args
        out, residual = _leap_forward(anchor, list(nodes), weights, target, base)
        ctx.weights, ctx.scales = weights, scales
        ctx.node_dtypes = [u.dtype for u in nodes]
        if residual is None:
            residual = out.new_zeros(0)
        ctx.mark_non_differentiable(residual)
        return out, residual

    @staticmethod
    def backward(ctx, grad_out, _grad_residual):
        g_anchor, g_nodes = _leap_backward(grad_out, ctx.weights, ctx.scales, ctx.node_dtypes)
        return (g_anchor, None, None, None, None, *g_nodes)


def lagrange_leap(
    anchor: torch.Tensor,
    nodes: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    scales: Sequence[float] | torch.Tensor | None = None,
    base: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Leap from an anchor latent over P velocity nodes, optionally pinned to ``target``.

    Args:
        anchor: ``[B, ...]`` surrogate latent at the segment start (fp32, or float64), may require grad.
        nodes: P tensors shaped like ``anchor`` (any float dtype), the velocities ``u_m``.
        weights: P integration weights ``w_m`` (float64 on the host, e.g. from ``lagrange_weights``).
        target: ``[B, ...]`` the true latent ``x_b``; when given the output is pinned to it.
        scales: P gradient scales ``rho_m`` (default 1): the value is unchanged, the gradient scaled.
        base: ``[B, ...]`` constant added to ``xhat`` (the cached, gradient-free nodes), no grad.

    Returns:
        ``(out, residual)``: ``out`` equals ``target`` exactly when pinned (else ``xhat``), with
        ``d out / d anchor = I`` and ``d out / d nodes[m] = w_m * scales[m] * I``; ``residual`` is
        ``mean |xhat - target|`` per sample (``[B]``, no grad), or None without a target.

    Reference: ``xhat = anchor + base + sum_m w_m * nodes[m]``; ``out = xhat + sg(target - xhat)``.
    """
    nodes = list(nodes)
    p = len(nodes)
    if p == 0:
        raise ValueError("nodes must hold at least one velocity node (P >= 1), got none; a segment without "
                         "active nodes is a pin: flowbp_kernels.ops.pin(anchor + base, target)")
    w = _as_floats("weights", weights, p)
    s = [1.0] * p if scales is None else _as_floats("scales", scales, p)
    if not isinstance(anchor, torch.Tensor) or not anchor.is_floating_point():
        raise TypeError(f"anchor must be a floating-point tensor, got {type(anchor).__name__}")
    if anchor.dim() < 1:
        raise ValueError("anchor must have a batch dimension, got a 0-d tensor")
    for name, t in [("target", target), ("base", base)] + [(f"nodes[{i}]", u) for i, u in enumerate(nodes)]:
        if t is None:
            continue
        if t.shape != anchor.shape:
            raise ValueError(f"{name} must have the anchor's shape {tuple(anchor.shape)}, got {tuple(t.shape)}")
        if t.device != anchor.device:
            raise ValueError(f"{name} must be on {anchor.device}, got {t.device}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    out, residual = LagrangeLeap.apply(anchor, base, target, w, s, *nodes)
    return out, (residual if target is not None else None)
