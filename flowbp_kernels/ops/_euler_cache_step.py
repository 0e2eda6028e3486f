"""Velocity cache with fused compression: one pass per rollout step.

``euler_cache_step(x, v, h)`` reads the state ``x_i`` (fp32, or float64) and the velocity ``v_i`` (the
model's dtype) and returns ``x_{i+1} = x_i + h v_i`` in the working dtype, the cached latent (the model
dtype) and the velocity compressed to the cache format. ``VelocityCache`` owns the stored tensors.

Formats and their error bounds (per element, on read-back in fp32):
- ``fp32``: exact (float64 inputs are kept in float64).
- ``bf16``: round-to-nearest, ``|v - v'| <= 2^-8 |v|`` (8 significant bits).
- ``fp8``: e4m3 (4 significant bits) with one fp32 scale per row of the last dimension,
  ``scale = max|row| / 448``: ``|v - v'| <= 2^-4 |v| + 2^-10 scale`` (the second term covers the
  subnormal range below ``2^-6 scale``, whose spacing is ``2^-9 scale``). Rows run along the last
  (contiguous) dimension: channels of a packed FLUX latent, width of an SD3 latent, so a scale costs
  4 bytes per 64-128 values (3-6%) and one outlier only coarsens its own row.

Backends (ops/_dispatch.py): the compiled CPU/CUDA kernels (csrc/euler_cache_step/) and Triton
(triton/euler_cache_step.py) read x and v once and write all outputs in the same pass; the fp8 rows are
quantized by the same fp32 operations as the reference. The definition is ``scale = RN(amax / 448)`` and
``data = e4m3(RN(v / scale))`` with correctly rounded divisions (torch's, the CPU's, ``__fdiv_rn`` in CUDA,
``div_rn`` in Triton, whose plain ``/`` is approximate on a GPU), so every backend is bit-exact.
"""

from __future__ import annotations

import math

import torch

from flowbp_kernels.ops import reference as ref
from flowbp_kernels.ops._dispatch import choose_backend, compiled_dtypes_check

_FORMAT_CODE = {"fp32": 0, "bf16": 1, "fp8": 2}


def _writes(x, v, velocity_format, latent_dtype) -> tuple[bool, bool]:
    """Which of x_cached / v_data need writing: where the cast is the identity, torch's ``.to()`` returns the
    tensor itself, and so do we (no copy, the same aliasing as the reference)."""
    write_cached = latent_dtype != x.dtype
    write_data = not (velocity_format == "fp32" and v.dtype == ref.working_dtype(v.dtype))
    return write_cached, write_data


def _finish(x, v, velocity_format, outs, writes):
    x_next, x_cached, v_data, v_scale = outs
    return (
        x_next,
        x_cached if writes[0] else x,
        v_data if writes[1] else v,
        v_scale if velocity_format == "fp8" else None,
    )


def _compiled(x, v, h, velocity_format, latent_dtype):
    writes = _writes(x, v, velocity_format, latent_dtype)
    outs = torch.ops.flowbp.euler_cache_step(x, v, float(h), _FORMAT_CODE[velocity_format], latent_dtype, *writes)
    return _finish(x, v, velocity_format, outs, writes)


def _triton(x, v, h, velocity_format, latent_dtype):
    from flowbp_kernels.triton import euler_cache_step as kernels

    writes = _writes(x, v, velocity_format, latent_dtype)
    # under torch.compile, the custom op: dynamo keeps the launch opaque
    launch = kernels.euler_cache_step_fwd_op if torch.compiler.is_compiling() else kernels.euler_cache_step_fwd
    outs = launch(x, v, h, _FORMAT_CODE[velocity_format], latent_dtype, *writes)
    return _finish(x, v, velocity_format, outs, writes)


def _torch(x, v, h, velocity_format, latent_dtype):
    return ref.euler_cache_step_ref(x, v, h, velocity_format=velocity_format, latent_dtype=latent_dtype)


_IMPL = {"torch": _torch, "cpu": _compiled, "cuda": _compiled, "triton": _triton}


def euler_cache_step(
    x: torch.Tensor,
    v: torch.Tensor,
    h: float,
    *,
    velocity_format: str = "fp32",
    latent_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One fused Euler + cache step. Returns ``(x_next, x_cached, v_data, v_scale)``.

    Reference: ``x_next = x + h * v`` (working dtype), ``x_cached = x.to(latent_dtype)``,
    ``(v_data, v_scale) = quantize(v, velocity_format)``; see ``ops.reference.euler_cache_step_ref``.
    """
    if velocity_format not in ref.VELOCITY_FORMATS:
        raise ValueError(f"velocity_format must be one of {ref.VELOCITY_FORMATS}, got {velocity_format!r}")
    if v.shape != x.shape:
        raise ValueError(f"v must have the shape of x {tuple(x.shape)}, got {tuple(v.shape)}")
    if v.device != x.device:
        raise ValueError(f"v must be on {x.device}, got {v.device}")
    if not isinstance(x, torch.Tensor) or not isinstance(v, torch.Tensor):
        raise TypeError(f"x and v must be tensors, got {type(x).__name__} and {type(v).__name__}")
    if not (x.is_floating_point() and v.is_floating_point()):
        raise TypeError(f"x and v must be floating point, got {x.dtype} and {v.dtype}")
    if isinstance(h, torch.Tensor):
        h = float(h)
    if not isinstance(h, (int, float)) or not math.isfinite(float(h)):
        raise ValueError(f"h must be a finite number, got {h!r}")
    if latent_dtype is not None and (not isinstance(latent_dtype, torch.dtype) or not latent_dtype.is_floating_point):
        raise TypeError(f"latent_dtype must be a floating-point torch.dtype or None, got {latent_dtype!r}")
    if velocity_format == "fp8" and x.dim() < 1:
        raise ValueError("x must have at least one dimension for the fp8 format (one scale per row)")
    ld = latent_dtype or x.dtype

    def check(backend: str) -> str | None:
        why = compiled_dtypes_check(x.dtype, v.dtype, ld)
        if why is None and backend == "triton":
            from flowbp_kernels.triton.euler_cache_step import unsupported

            why = unsupported(x, v, ld)
        return why

    backend = choose_backend("euler_cache_step", x, check)
    return _IMPL[backend](x, v, float(h), velocity_format, ld)


class VelocityCache:
    """The cached rollout's storage: latents ``x_i`` (model dtype) and velocities ``v_i`` (compressed).

    Args:
        velocity_format: ``"fp32"`` (default; float64 inputs stay float64), ``"bf16"`` or ``"fp8"``.
        latent_dtype: dtype of the cached latents; default the dtype the rollout hands the model.
    """

    def __init__(self, velocity_format: str = "fp32", latent_dtype: torch.dtype | None = None):
        if velocity_format not in ref.VELOCITY_FORMATS:
            raise ValueError(f"velocity_format must be one of {ref.VELOCITY_FORMATS}, got {velocity_format!r}")
        self.velocity_format = velocity_format
        self.latent_dtype = latent_dtype
        self._latents: list[torch.Tensor] = []
        self._vdata: list[torch.Tensor] = []
        self._vscale: list[torch.Tensor | None] = []
        self._work_dtype: torch.dtype = torch.float32

    def step(self, x: torch.Tensor, v: torch.Tensor, h: float) -> torch.Tensor:
        """Cache ``x_i`` and ``v_i``; return ``x_{i+1} = x_i + h v_i`` in the working dtype."""
        x_next, x_cached, v_data, v_scale = euler_cache_step(
            x, v, h, velocity_format=self.velocity_format, latent_dtype=self.latent_dtype
        )
        self._work_dtype = x_next.dtype
        self._latents.append(x_cached)
        self._vdata.append(v_data)
        self._vscale.append(v_scale)
        return x_next

    def __len__(self) -> int:
        return len(self._latents)

    def latent(self, i: int) -> torch.Tensor:
        """The cached latent ``x_i`` in the dtype the model saw."""
        return self._latents[i]

    def velocity(self, i: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The cached velocity ``v_i`` read back (dequantized) in ``dtype`` (default: working dtype)."""
        return ref.dequantize_velocity_ref(self._vdata[i], self._vscale[i], dtype or self._work_dtype)

    def nbytes(self) -> int:
        """Bytes held by the cache (latents, velocities, scales)."""
        tensors = self._latents + self._vdata + [s for s in self._vscale if s is not None]
        return sum(t.numel() * t.element_size() for t in tensors)
