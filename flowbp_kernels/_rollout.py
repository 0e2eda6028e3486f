"""The no-grad cached rollout: Euler steps of the flow ODE, keeping every latent and velocity.

``x_{i+1} = x_i + h_i v_i`` with ``h_i = s_{i+1} - s_i``, computed in fp32 whatever the model dtype
(float64 inputs stay float64). The model sees ``x_i`` cast to ``latent_dtype`` and that exact tensor is
cached, so a later re-forward at the cached latent reproduces the cached velocity. Nothing else is
kept (shared/design/ALGORITHM.md section 2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from flowbp_kernels.ops import VelocityCache
from flowbp_kernels.ops.reference import working_dtype

VelocityFn = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class Rollout:
    """Result of :func:`rollout`.

    Attributes:
        sigmas: float64 ``[N + 1]`` schedule.
        cache: the :class:`VelocityCache` with ``x_0 .. x_{N-1}`` and ``v_0 .. v_{N-1}``.
        sample: the exact sample ``x_N`` (working dtype).
    """

    sigmas: torch.Tensor
    cache: VelocityCache
    sample: torch.Tensor

    @property
    def num_steps(self) -> int:
        return len(self.cache)

    @property
    def latents(self) -> list[torch.Tensor]:
        """Cached latents ``x_0 .. x_{N-1}`` (as the model saw them)."""
        return [self.cache.latent(i) for i in range(self.num_steps)]

    @property
    def velocities(self) -> list[torch.Tensor]:
        """Cached velocities ``v_0 .. v_{N-1}`` read back in the working dtype."""
        return [self.cache.velocity(i) for i in range(self.num_steps)]

    @property
    def dtype(self) -> torch.dtype:
        """The working dtype of the surrogate arithmetic."""
        return self.sample.dtype

    def latent(self, i: int) -> torch.Tensor:
        """``x_i`` in the working dtype; ``i == N`` gives the sample."""
        if i == self.num_steps:
            return self.sample
        return self.cache.latent(i).to(self.dtype)

    def velocity(self, i: int) -> torch.Tensor:
        return self.cache.velocity(i, self.dtype)


def rollout(
    velocity_fn: VelocityFn,
    x_init: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cache: VelocityCache | str | None = None,
    latent_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Rollout:
    """Sample by Euler steps under no_grad and cache every latent and velocity.

    Args:
        velocity_fn: ``velocity_fn(x, i) -> v`` evaluates the model (with its guidance) at step i.
        x_init: ``[B, ...]`` initial noise ``x_0``.
        sigmas: ``[N + 1]`` schedule from :func:`flow_sigmas` (1 down to 0).
        cache: a :class:`VelocityCache`, a velocity format (``"fp32"``, ``"bf16"``, ``"fp8"``) or None
            (fp32).
        latent_dtype: dtype in which the model sees (and the cache keeps) the latents; default
            ``x_init.dtype``.
        progress: show a tqdm bar (when tqdm is installed).
    """
    if not callable(velocity_fn):
        raise TypeError(f"velocity_fn must be callable as velocity_fn(x, i), got {type(velocity_fn).__name__}")
    if not isinstance(x_init, torch.Tensor) or not x_init.is_floating_point():
        got = x_init.dtype if isinstance(x_init, torch.Tensor) else type(x_init).__name__
        raise TypeError(f"x_init must be a floating-point tensor, got {got}")
    if x_init.dim() < 2:
        raise ValueError(f"x_init must be [B, ...] with a batch dimension, got shape {tuple(x_init.shape)}")
    if x_init.shape[0] == 0 or x_init.numel() == 0:
        raise ValueError(f"x_init must hold at least one sample, got shape {tuple(x_init.shape)}")
    if not bool(torch.isfinite(x_init).all()):
        raise ValueError("x_init holds non-finite values (NaN or inf); check the noise and its dtype")
    if not isinstance(sigmas, torch.Tensor):
        raise TypeError(f"sigmas must be a tensor (from flow_sigmas), got {type(sigmas).__name__}")
    if latent_dtype is not None and (not isinstance(latent_dtype, torch.dtype) or not latent_dtype.is_floating_point):
        raise TypeError(f"latent_dtype must be a floating torch.dtype or None, got {latent_dtype!r}")
    sigmas = sigmas.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(sigmas).all()):
        raise ValueError("sigmas holds non-finite values")
    if sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be 1-d with N + 1 >= 2 entries, got shape {tuple(sigmas.shape)}")
    if not torch.all(sigmas[1:] < sigmas[:-1]):
        raise ValueError("sigmas must be strictly decreasing (noise at index 0, data at index N)")
    if cache is None or isinstance(cache, str):
        cache = VelocityCache(cache or "fp32", latent_dtype or x_init.dtype)
    elif len(cache):
        raise ValueError("cache must be empty at the start of a rollout")
    if cache.latent_dtype is None:
        cache.latent_dtype = latent_dtype or x_init.dtype
    n = sigmas.numel() - 1
    steps = range(n)
    if progress:
        try:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="rollout", leave=False)
        except ImportError:
            pass
    with torch.no_grad():
        x = x_init.to(working_dtype(x_init.dtype))
        for i in steps:
            v = velocity_fn(x.to(cache.latent_dtype), i)
            if not isinstance(v, torch.Tensor) or v.shape != x.shape:
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"velocity_fn must return a tensor of shape {tuple(x.shape)}, got {got}")
            x = cache.step(x, v.detach(), float(sigmas[i + 1] - sigmas[i]))
        if not torch.isfinite(x).all():
            raise FloatingPointError("rollout produced non-finite latents; check the model and its dtype")
    return Rollout(sigmas=sigmas, cache=cache, sample=x)
