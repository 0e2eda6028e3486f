"""Lagrange leap: ``xhat_b = x~_a + base + sum_m w_m u_m``, pinned to ``x_b``, with its residual.

One autograd Function serves every segment of every method (Euler segments are leaps whose weights
are the step widths; cached nodes are folded into ``base``). Forward value of the pinned output is
exactly ``target`` (a custom Function, because ``xhat + sg(target - xhat)`` is not exactly ``target``
in floating point); the gradient is the identity to ``xhat``, so ``grad_anchor = g`` and
``grad_node_m = w_m * scale_m * g``. Math: shared/design/ALGORITHM.md section 3; reference:
``ops.reference.lagrange_leap_ref``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from flowbp_kernels.ops import reference as ref
from flowbp_kernels.ops._dispatch import choose_backend


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


class LagrangeLeap(torch.autograd.Function):
    """Autograd Function: ``(anchor, base, target, weights, scales, *nodes) -> (out, residual)``."""

    @staticmethod
    def forward(ctx, anchor, base, target, weights, scales, *nodes):
        backend = choose_backend("lagrange_leap", anchor)
        out, residual = _FORWARD[backend](anchor, list(nodes), weights, target, base)
        ctx.weights, ctx.scales = weights, scales
        ctx.node_dtypes = [u.dtype for u in nodes]
        ctx.backend = backend
        if residual is None:
            residual = out.new_zeros(0)
        ctx.mark_non_differentiable(residual)
        return out, residual

    @staticmethod
    def backward(ctx, grad_out, _grad_residual):
        g_anchor, g_nodes = _BACKWARD[ctx.backend](grad_out, ctx.weights, ctx.scales, ctx.node_dtypes)
        return (g_anchor, None, None, None, None, *g_nodes)


_FORWARD = {"torch": ref.lagrange_leap_ref}
_BACKWARD = {"torch": ref.lagrange_leap_bwd_ref}


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
