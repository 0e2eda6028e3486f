"""The streaming executor's cotangents, and the value-preserving gradient scales.

``surrogate_vjp(upstream, adjoint, coefs)`` gives every active node of a segment its cotangent
``c_m = coefs[m] * (upstream + adjoint)`` in one pass (coefs = ``w_m * rho_m``; ALGORITHM.md section 5).
``GradScale`` / ``BridgeCoupling``: value exactly ``x``, gradient times ``scale`` (the bridge coupling
``alpha * x + (1 - alpha) * sg(x)`` and the rescale ``sg(u) + rho * (u - sg(u))`` of ALGORITHM.md
section 3, written so that the forward value is bit-exact). ``surrogate_vjp`` runs on the compiled
CPU/CUDA kernel (csrc/surrogate_vjp/) or Triton (triton/surrogate_vjp.py) when one serves the tensor; it
is also the backward of ``lagrange_leap`` (adjoint None, coefs ``w_m * scale_m``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from flowbp_kernels.ops import reference as ref
from flowbp_kernels.ops._dispatch import choose_backend, compiled_dtypes_check


def _compiled(upstream, adjoint, coefs, out_dtype):
    return torch.ops.flowbp.surrogate_vjp(upstream, adjoint, coefs, out_dtype)


def _triton(upstream, adjoint, coefs, out_dtype):
    from flowbp_kernels.triton import surrogate_vjp as kernels

    if torch.compiler.is_compiling():  # the custom op: dynamo keeps the launch opaque
        return kernels.surrogate_vjp_fwd_op(upstream, adjoint, list(coefs), out_dtype)
    return kernels.surrogate_vjp_fwd(upstream, adjoint, coefs, out_dtype)


_IMPL = {"torch": ref.surrogate_vjp_ref, "cpu": _compiled, "cuda": _compiled, "triton": _triton}


def _dispatch_vjp(upstream, adjoint, coefs, out_dtype):
    """Run the op on the backend that serves it (arguments already checked)."""

    def check(backend: str) -> str | None:
        why = compiled_dtypes_check(upstream.dtype, None if adjoint is None else adjoint.dtype, out_dtype)
        if why is None and backend == "triton":
            from flowbp_kernels.triton.surrogate_vjp import unsupported

            why = unsupported(upstream, adjoint, out_dtype)
        return why

    backend = choose_backend("surrogate_vjp", upstream, check)
    return _IMPL[backend](upstream, adjoint, coefs, out_dtype)


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
    if not isinstance(upstream, torch.Tensor) or not upstream.is_floating_point():
        raise TypeError(f"upstream must be a floating-point tensor, got {getattr(upstream, 'dtype', type(upstream))}")
    if isinstance(coefs, torch.Tensor):
        coefs = coefs.detach().to("cpu", torch.float64).reshape(-1).tolist()
    coefs = [float(c) for c in coefs]
    if not coefs:
        raise ValueError("coefs must hold one coefficient per active node (P >= 1), got none")
    if any(not math.isfinite(c) for c in coefs):
        raise ValueError(f"coefs must be finite, got {coefs}")
    if adjoint is not None:
        if not isinstance(adjoint, torch.Tensor) or not adjoint.is_floating_point():
            raise TypeError(
                f"adjoint must be a floating-point tensor or None, got {getattr(adjoint, 'dtype', adjoint)}"
            )
        if adjoint.shape != upstream.shape:
            raise ValueError(
                f"adjoint must have the upstream's shape {tuple(upstream.shape)}, got {tuple(adjoint.shape)}"
            )
        if adjoint.device != upstream.device:
            raise ValueError(f"adjoint must be on {upstream.device}, got {adjoint.device}")
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise TypeError(f"out_dtype must be a floating-point torch.dtype or None, got {out_dtype!r}")
    return _dispatch_vjp(upstream, adjoint, coefs, out_dtype or upstream.dtype)


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


class Pin(torch.autograd.Function):
    """Value ``target`` (bit-exact, in ``xhat``'s dtype), gradient the identity to ``xhat``."""

    @staticmethod
    def forward(ctx, xhat, target):
        return target.to(xhat.dtype).clone()

    @staticmethod
    def backward(ctx, g):
        return g, None


def pin(xhat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``pin(xhat, target) = xhat + sg(target - xhat)`` with a bit-exact value: the reward scores the
    true latent while the gradient flows to the surrogate (ALGORITHM.md section 3)."""
    if not isinstance(xhat, torch.Tensor) or not xhat.is_floating_point():
        raise TypeError(f"xhat must be a floating-point tensor, got {type(xhat).__name__}")
    if not isinstance(target, torch.Tensor) or target.shape != xhat.shape:
        got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"target must have xhat's shape {tuple(xhat.shape)}, got {got}")
    if target.device != xhat.device:
        raise ValueError(f"target must be on {xhat.device}, got {target.device}")
    return Pin.apply(xhat, target)


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
