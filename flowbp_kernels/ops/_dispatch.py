"""Backend selection for the fused ops.

Order (shared/design/ARCHITECTURE.md, "Dispatch"): the CUDA extension for CUDA tensors when built;
else Triton for CUDA tensors (or any tensor under TRITON_INTERPRET=1); else the CPU C++ kernel when
built; else the torch reference. ``FLOWBP_BACKEND=torch|triton|cuda|cpu`` forces one and raises if it
cannot serve the tensor. Backends are imported lazily; nothing here touches CUDA at import.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("torch", "triton", "cuda", "cpu")


def requested_backend() -> str | None:
    """The backend forced by ``FLOWBP_BACKEND``, or None for automatic choice."""
    name = os.environ.get("FLOWBP_BACKEND", "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"FLOWBP_BACKEND must be one of {BACKENDS} or 'auto', got {name!r}")
    return name


def choose_backend(op: str, tensor: torch.Tensor) -> str:
    """The backend that serves ``op`` for ``tensor`` (currently: the torch reference)."""
    forced = requested_backend()
    if forced not in (None, "torch"):
        raise RuntimeError(f"{op}: FLOWBP_BACKEND={forced!r} is not available in this build")
    return "torch"


def backends() -> dict[str, str]:
    """What is available, and why not where it is not."""
    return {"torch": "available (reference)"}
