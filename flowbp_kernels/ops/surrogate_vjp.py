"""The streaming executor's cotangents, and the value-preserving gradient scales.

``surrogate_vjp(upstream, adjoint, coefs)`` gives every active node of a segment its cotangent
``c_m = coefs[m] * (upstream + adjoint)`` in one pass (coefs = ``w_m * rho_m``; ALGORITHM.md section 5).
``GradScale`` / ``BridgeCoupling``: value exactly ``x``, gradient times ``scale`` (the bridge coupling
``alpha * x + (1 - alpha) * sg(x)`` and the rescale ``sg(u) + rho * (u - sg(u))`` of ALGORITHM.md
section 3, written so that the forward value is bit-exact).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from flowbp_kernels.ops import reference as ref
from flowbp_kernels.ops._dispatch import choose_backend


def surrogate_vjp(
    upstream: torch.Tensor,
    adjoint: torch.Tensor | None,
    coefs: Sequence[float] | torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Cotangents ``[P, *upstream.shape]`` of a segment's P active nodes.

    Args:
        upstream: ``[B, ...]`` gradient of the loss w.r.t. the segment's output (fp32/fp64).
        adjoint: ``[B, ...]`` extra adjoint reaching the segment's output through bridge/chained
            inputs of later segments, or None.
        coefs: P scalars ``w_m * rho_m``.
        out_dtype: dtype of the cotangents (the model's output dtype); default ``upstream.dtype``.

    Reference: ``torch.stack([c * (upstream + adjoint) for c in coefs]).to(out_dtype)``.
    """
    if isinstance(coefs, torch.Tensor):
        coefs = coefs.detach().to("cpu", torch.float64).reshape(-1).tolist()
    coefs = [float(c) for c in coefs]
    if any(not math.isfinite(c) for c in coefs):
        raise ValueError(f"coefs must be finite, got {coefs}")
    if adjoint is not None and adjoint.shape != upstream.shape:
        raise ValueError(f"adjoint must have the upstream's shape {tuple(upstream.shape)}, got {tuple(adjoint.shape)}")
    if adjoint is not None and adjoint.device != upstream.device:
        raise ValueError(f"adjoint must be on {upstream.device}, got {adjoint.device}")
    choose_backend("surrogate_vjp", upstream)
    return ref.surrogate_vjp_ref(upstream, adjoint, coefs, out_dtype)


class GradScale(torch.autograd.Function):
    """Value ``x`` (bit-exact), gradient ``scale * g``."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = float(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``sg(x) + scale * (x - sg(x))`` with a bit-exact forward value. ``scale == 1`` returns ``x``."""
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}")
    if float(scale) == 1.0:
        return x
    return GradScale.apply(x, float(scale))


class BridgeCoupling:
    """The bridge input ``alpha * x~_j + (1 - alpha) * sg(x~_j)``: value ``x~_j``, gradient ``alpha``.

    ``BridgeCoupling(alpha)(x)`` or ``BridgeCoupling.apply(x, alpha)``.
    """

    def __init__(self, alpha: float):
        alpha = float(alpha)
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
        self.alpha = alpha

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return GradScale.apply(x, self.alpha)

    @staticmethod
    def apply(x: torch.Tensor, alpha: float) -> torch.Tensor:
        return BridgeCoupling(alpha)(x)
