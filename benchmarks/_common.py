"""Shared pieces of the engine benchmarks: a small random DiT velocity model, a reward, run metadata."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


class TinyDiT(torch.nn.Module):
    """Velocity model: patch tokens, `depth` pre-norm transformer blocks with sigma-conditioned
    adaptive scale/shift, a linear head. Random weights (``gain`` sets the init scale)."""

    def __init__(self, tokens=16, channels=8, width=64, depth=2, heads=4, gain=1.0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.tokens, self.channels = tokens, channels
        self.inp = torch.nn.Linear(channels, width)
        self.pos = torch.nn.Parameter(torch.zeros(tokens, width))
        self.t_emb = torch.nn.Linear(1, 2 * width * depth)
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(depth)
        )
        self.out = torch.nn.Linear(width, channels)
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) * gain / p.shape[-1] ** 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        self.sigmas: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, i: int) -> torch.Tensor:
        b = x.shape[0]
        s = torch.full((b, 1), float(self.sigmas[i]), dtype=x.dtype, device=x.device)
        h = self.inp(x) + self.pos
        mods = self.t_emb(s).chunk(2 * len(self.blocks), dim=-1)
        for q, blk in enumerate(self.blocks):
            h = h * (1 + mods[2 * q].unsqueeze(1)) + mods[2 * q + 1].unsqueeze(1)
            h = blk(h)
        return self.out(h)


class QuadraticReward:
    """R(x) = -|x - target|^2 / D + sum(tanh(x W)) / D per sample: smooth, with a real Hessian."""

    def __init__(self, shape, seed=1, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        self.target = torch.randn(*shape, generator=g).to(dtype)
        d = self.target.numel()
        self.w = torch.randn(d, 8, generator=g).to(dtype) / d**0.5
        self.d = d

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        f = x.reshape(x.shape[0], -1)
        return (-(f - self.target.reshape(1, -1)).pow(2).sum(1) + torch.tanh(f @ self.w).sum(1)) / self.d


class SavedBytes:
    """Live and peak bytes saved for backward, counted with saved_tensors_hooks: a packed tensor
    counts until autograd releases it (deterministic, any device)."""

    def __init__(self):
        self.live = 0
        self.peak = 0

    def __enter__(self):
        meter = self

        class Handle:
            __slots__ = ("t", "nb")

            def __init__(self, t):
                self.t, self.nb = t, t.numel() * t.element_size()
                meter.live += self.nb
                meter.peak = max(meter.peak, meter.live)

            def __del__(self):
                meter.live -= self.nb

        self._ctx = torch.autograd.graph.saved_tensors_hooks(Handle, lambda h: h.t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def median_time(fn, repeats=3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def metadata() -> dict:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        rev = "unknown"
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git": rev,
        "threads": torch.get_num_threads(),
    }


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path
