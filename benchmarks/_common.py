"""Shared pieces of the benchmarks: a small random DiT velocity model, a reward, run metadata (device,
versions, git revision), device timing (CUDA events around each call with an L2 flush before it, medians;
host clock on CPU), JSON output and JSON lines written row by row, so a run stopped at its time limit
keeps every row it finished. Every benchmark takes its git revision and metadata from here."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
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


def git_revision() -> str:
    """The short git revision of the checkout. Without git history (the GPU kit's copy), the
    ``FLOWBP_GIT_REV`` that benchmarks/gpu_check.sh sets, else ``unknown``."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        rev = ""
    return rev or os.environ.get("FLOWBP_GIT_REV", "unknown")


def metadata() -> dict:
    """Device, versions and code revision for every result row (``FLOWBP_TREE_SHA``, set by
    benchmarks/gpu_check.sh, identifies the code of a copy without history)."""
    meta = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git": git_revision(),
        "threads": torch.get_num_threads(),
    }
    if os.environ.get("FLOWBP_TREE_SHA"):
        meta["tree_sha"] = os.environ["FLOWBP_TREE_SHA"]
    return meta


def write_json(target: str | Path, payload, *, indent: int = 2) -> Path:
    """Write ``payload`` as JSON to ``results/<target>.json`` (a name, ``str``) or to ``target`` (a
    ``Path``; its folder is created); returns the path."""
    path = RESULTS / f"{target}.json" if isinstance(target, str) else Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=indent, default=str))
    return path


#: Bytes written between two timed GPU calls so that no input is still in L2 (H100/H200: 50-60 MB of L2).
L2_FLUSH_BYTES = 256 << 20


class DeviceTimer:
    """Median time of calls, the same way for every implementation and the copy reference.

    On CUDA: each repetition writes an L2_FLUSH_BYTES buffer, then records an event, runs the call and
    records a second event (the flush also keeps the GPU busy while the host launches the call, so host
    launch latency stays out of the number); the elapsed times are read after one synchronisation. On CPU:
    the host clock around each call (no flush: CPU figures are in-cache by design). Implementations are
    timed in alternation, round by round, so slow drifts of the clock hit all of them alike.
    """

    def __init__(self, device: str):
        self.device = device
        self.cuda = device.startswith("cuda")
        self._flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.float32, device=device) if self.cuda else None

    def time(self, fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 3) -> dict[str, float]:
        """Median microseconds per call of each ``fns`` entry."""
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        if not self.cuda:
            times = {k: [] for k in fns}
            for _ in range(rounds):
                for k, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    times[k].append((time.perf_counter() - t0) * 1e6)
            return {k: statistics.median(v) for k, v in times.items()}
        torch.cuda.synchronize()
        events = {k: [] for k in fns}
        for _ in range(rounds):
            for k, fn in fns.items():
                self._flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                events[k].append((start, end))
        torch.cuda.synchronize()
        return {k: statistics.median(s.elapsed_time(e) * 1e3 for s, e in v) for k, v in events.items()}

    def copy_gbps(self, nbytes: int, rounds: int = 20) -> float:
        """GB/s of a device copy moving ``nbytes`` (half read, half written), timed as the ops are."""
        n = max(1, nbytes // 8)
        src = torch.empty(n, dtype=torch.float32, device=self.device).normal_()
        dst = torch.empty_like(src)
        us = self.time({"copy": lambda: dst.copy_(src)}, rounds)["copy"]
        return 8 * n / us / 1e3


def append_jsonl(path: str | os.PathLike | None, row: dict) -> None:
    """Append one JSON line to ``path`` (created with its folder) and flush it to disk at once."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
