"""Sigma schedules of the flow ODE, as diffusers' FlowMatchEulerDiscreteScheduler computes them.

Base grid ``linspace(1, 1/N, N)`` (what the FLUX pipelines pass and what the FlowBP reference code uses
for all three backbones), then a shift, then a terminal 0 (shared/design/REFERENCE.md section 1.2):
- static shift ``s`` (SD3.5: 3.0): ``sigma = s t / (1 + (s - 1) t)``;
- dynamic shift ``mu`` (FLUX.1: :func:`flux_mu`; FLUX.2: :func:`flux2_mu`):
  ``sigma = e^mu / (e^mu + 1/t - 1)``.
Note: diffusers' SD3 pipeline, when given no sigmas, starts from a grid ending at the shifted training
sigma_min instead of 1/N; we follow the reference code's grid.
"""

from __future__ import annotations

import math

import torch


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX.1's resolution-dependent shift: linear in the packed sequence length (0.5 at 256 tokens,
    1.15 at 4096). At 512x512 the sequence is 1024 tokens and mu is about 0.63."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return float(image_seq_len * m + base_shift - m * base_seq_len)


def flux2_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's empirical shift, a function of the sequence length and the number of steps (the
    constants of diffusers' FLUX.2 pipelines, fitted by Black Forest Labs)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + m_200 - 200.0 * a)


#: Input checks only: more steps than this is no sampling schedule (the models know 1000 timesteps), and the
#: bound keeps a typo from allocating gigabytes.
MAX_SCHEDULE_STEPS = 1_000_000
#: |mu| beyond this makes e^mu overflow-prone and every sigma 0 or 1 in float64.
MAX_ABS_MU = 50.0


def _number(name: str, val) -> float:
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(val).__name__}")
    return float(val)


def flow_sigmas(num_steps: int, *, shift: float | None = None, mu: float | None = None) -> torch.Tensor:
    """The ``num_steps + 1`` sigmas ``s_0 = 1 > s_1 > ... > s_N = 0`` (float64, CPU).

    Args:
        num_steps: N >= 1.
        shift: static shift (SD3.5 uses 3.0). Mutually exclusive with ``mu``.
        mu: dynamic (exponential) shift, e.g. ``flux_mu(seq_len)`` or ``flux2_mu(seq_len, N)``.
    With neither, the grid is unshifted.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= MAX_SCHEDULE_STEPS:
        raise ValueError(f"num_steps must be an integer in [1, {MAX_SCHEDULE_STEPS}], got {num_steps!r}")
    if shift is not None and mu is not None:
        raise ValueError("pass either shift or mu, not both")
    t = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    if shift is not None:
        shift = _number("shift", shift)
        if not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift must be a finite number > 0, got {shift}")
        sig = shift * t / (1 + (shift - 1) * t)
    elif mu is not None:
        mu = _number("mu", mu)
        if not (math.isfinite(mu) and abs(mu) <= MAX_ABS_MU):
            raise ValueError(f"mu must be a finite number in [-{MAX_ABS_MU:g}, {MAX_ABS_MU:g}], got {mu}")
        sig = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    else:
        sig = t
    return torch.cat([sig, sig.new_zeros(1)])
