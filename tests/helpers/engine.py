"""Tiny float64 velocity model and reward shared by the engine tests (exact and fast)."""

from __future__ import annotations

import torch


class TinyVelocity(torch.nn.Module):
    """v(x, s): an MLP on the flattened latent and sigma; latents are [B, 2, 3] to exercise the
    non-batch dimensions."""

    def __init__(self, sigmas: torch.Tensor, shape=(2, 3), hidden: int = 12, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = shape[0] * shape[1]
        self.shape = shape
        self.sigmas = sigmas
        self.l1 = torch.nn.Linear(d + 1, hidden).double()
        self.l2 = torch.nn.Linear(hidden, d).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.6)

    def forward(self, x: torch.Tensor, i: int) -> torch.Tensor:
        b = x.shape[0]
        s = torch.full((b, 1), float(self.sigmas[i]), dtype=x.dtype)
        h = torch.tanh(self.l1(torch.cat([x.reshape(b, -1), s], 1)))
        return self.l2(h).reshape(b, *self.shape)


class TinyReward:
    """R(x) = sum(tanh(x W)) + 0.1 |x|^2 per sample: nonlinear, with a non-trivial Hessian."""

    def __init__(self, shape=(2, 3), seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(shape[0] * shape[1], 4, generator=g, dtype=torch.float64)
        self.calls: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.detach().clone())
        f = x.reshape(x.shape[0], -1)
        return torch.tanh(f @ self.w).sum(1) + 0.1 * (f * f).sum(1)


def flat_grad(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in module.parameters()])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
