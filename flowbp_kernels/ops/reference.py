"""Pure-torch references of every fused op: the oracle of all kernel tests and the CPU fallback.

Each function here is the mathematical definition of one op, written as plainly as possible in the
working precision (fp32, or float64 when the inputs are float64). The autograd Functions in
``flowbp_kernels.ops`` call these when no compiled or Triton backend serves the tensor; kernels are
tested against them. Notation follows shared/design/ALGORITHM.md (sections 2, 3 and 5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Largest finite value of float8 e4m3fn; a row's absmax maps to it.
FP8_E4M3_MAX = 448.0
#: Smallest scale, so an all-zero row dequantizes to exact zeros instead of 0/0.
FP8_MIN_SCALE = 1e-30

VELOCITY_FORMATS = ("fp32", "bf16", "fp8")


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The surrogate arithmetic dtype for inputs of ``dtype``: float64 stays, everything else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def quantize_velocity_ref(v: torch.Tensor, velocity_format: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Compress a velocity for the cache. Returns ``(data, scale)``; ``scale`` only for ``fp8``.

    ``fp32`` keeps the working precision (float64 stays float64), ``bf16`` rounds to bfloat16,
    ``fp8`` stores e4m3 with one fp32 scale per row of the last (channel/width) dimension:
    ``scale = max(|row|) / 448`` and ``data = round_e4m3(v / scale)``.
    """
    if velocity_format == "fp32":
        return v.to(working_dtype(v.dtype)), None
    if velocity_format == "bf16":
        return v.to(torch.bfloat16), None
    if velocity_format == "fp8":
        vf = v.float()
        scale = (vf.abs().amax(dim=-1, keepdim=True) / FP8_E4M3_MAX).clamp_min(FP8_MIN_SCALE)
        return (vf / scale).to(torch.float8_e4m3fn), scale
    raise ValueError(f"velocity_format must be one of {VELOCITY_FORMATS}, got {velocity_format!r}")


def dequantize_velocity_ref(data: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_velocity_ref`, to ``dtype``."""
    if scale is None:
        return data.to(dtype)
    return (data.float() * scale).to(dtype)


def euler_cache_step_ref(
    x: torch.Tensor,
    v: torch.Tensor,
    h: float,
    *,
    velocity_format: str = "fp32",
    latent_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One Euler step of the cached rollout.

    Returns ``(x_next, x_cached, v_data, v_scale)`` with ``x_next = x + h * v`` in the working dtype
    of ``x``, ``x_cached = x.to(latent_dtype)`` (the latent the model saw) and the velocity compressed
    by :func:`quantize_velocity_ref`.
    """
    wd = working_dtype(x.dtype)
    x_next = x.to(wd) + h * v.to(wd)
    x_cached = x.to(latent_dtype or x.dtype)
    v_data, v_scale = quantize_velocity_ref(v, velocity_format)
    return x_next, x_cached, v_data, v_scale


def lagrange_leap_ref(
    anchor: torch.Tensor,
    nodes: Sequence[torch.Tensor],
    weights: Sequence[float],
    target: torch.Tensor | None,
    base: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward of the leap: ``xhat = anchor + base + sum_m w_m * nodes[m]`` in the working dtype.

    Returns ``(out, residual)``: with a ``target`` the pinned value ``out = target`` (exactly) and the
    per-sample residual ``mean |xhat - target|`` over the non-batch dimensions; without one,
    ``out = xhat`` and no residual.
    """
    wd = working_dtype(anchor.dtype)
    xhat = anchor.to(wd)
    if base is not None:
        xhat = xhat + base.to(wd)
    for w, u in zip(weights, nodes):
        xhat = xhat + float(w) * u.to(wd)
    if target is None:
        return xhat, None
    t = target.to(wd)
    residual = (xhat - t).abs().flatten(1).mean(dim=1)
    return t.clone(), residual


def lagrange_leap_bwd_ref(
    grad_out: torch.Tensor,
    weights: Sequence[float],
    scales: Sequence[float],
    node_dtypes: Sequence[torch.dtype],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Backward of the leap: ``grad_anchor = g`` and ``grad_node_m = w_m * scale_m * g`` (cast to the
    node's dtype). The pin is the identity for the gradient."""
    g = grad_out
    return g, [(float(w) * float(s) * g).to(dt) for w, s, dt in zip(weights, scales, node_dtypes)]


def surrogate_vjp_ref(
    upstream: torch.Tensor,
    adjoint: torch.Tensor | None,
    coefs: Sequence[float],
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Cotangents of a segment's active nodes: ``c_m = coefs[m] * (upstream + adjoint)``.

    Returns a tensor ``[P, *upstream.shape]`` in ``out_dtype`` (default: the upstream dtype).
    """
    total = upstream if adjoint is None else upstream + adjoint
    out = torch.stack([float(c) * total for c in coefs]) if len(coefs) else total.new_empty((0, *total.shape))
    return out.to(out_dtype or upstream.dtype)

