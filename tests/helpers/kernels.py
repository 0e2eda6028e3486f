"""Shared by the kernel tests: the one tolerance table, backend parametrization, comparison helpers.

Criterion (STYLE.md): a backend's error against a float64 truth may be at most ERR_FACTOR times the
error of the plain torch reference in the same dtype, plus ATOL of the output dtype. The truth is the
reference evaluated in float64 on the very same (already rounded) inputs, so only the arithmetic of the
op is measured. Triton runs under TRITON_INTERPRET=1 when there is no GPU (tests/conftest.py sets it
before any test module, hence any Triton kernel module, is imported; the GPU kit's scripts that import
this module without pytest get it set here too).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from flowbp_kernels import _ext  # noqa: E402

from helpers import tolerance as _tolerance  # noqa: E402

# the one tolerance table of the suite lives in tests/helpers/tolerance.py (its policy is stated there)
ERR_FACTOR, ATOL = _tolerance.ERR_FACTOR, _tolerance.KERNEL_ATOL
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: Elements per row (the last dimension) and batch sizes every op is tried on.
ROW_SIZES = [1, 7, 97, 1025]
BATCHES = [1, 3]
#: Shapes whose size and rows are multiples of the CUDA kernels' 8-element groups: aligned, they take the
#: 128-bit path; at an odd storage offset the same values take the scalar path (test_alignment_*).
ALIGNMENT_SHAPES = [(2, 3, 64), (1, 40, 136)]


def _triton_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no GPU and TRITON_INTERPRET is not 1"
    return None


def _cpu_reason() -> str | None:
    return None if _ext.load() else f"compiled extension unavailable: {_ext.status()['error']}"


def _cuda_reason() -> str | None:
    if not torch.cuda.is_available():
        return "requires CUDA"
    if not _ext.load() or not _ext.status()["cuda"]:
        return f"extension without CUDA kernels: {_ext.status()['cuda_why']}"
    return None


def backend_params() -> list:
    """pytest params of the backends, skipped with the reason where not available."""
    out = []
    for name, why in (("torch", None), ("cpu", _cpu_reason()), ("triton", _triton_reason()), ("cuda", _cuda_reason())):
        marks = [pytest.mark.skip(reason=why)] if why else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def backend_device(name: str) -> str:
    if name == "cuda" or (name == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def force(monkeypatch, name: str) -> str:
    """Force ``FLOWBP_BACKEND=name`` for the test; returns the device its tensors go on."""
    monkeypatch.setenv("FLOWBP_BACKEND", name)
    return backend_device(name)


def max_err(a: torch.Tensor, truth: torch.Tensor) -> float:
    return float((a.double() - truth.double()).abs().max()) if a.numel() else 0.0


def assert_close_to_truth(got: torch.Tensor, torch_ref: torch.Tensor, truth: torch.Tensor, what: str) -> None:
    """``|got - truth| <= ERR_FACTOR |torch_ref - truth| + ATOL[got.dtype]`` (max over elements)."""
    assert got.shape == truth.shape, f"{what}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    assert got.dtype == torch_ref.dtype, f"{what}: dtype {got.dtype} != reference dtype {torch_ref.dtype}"
    e_got, e_ref = max_err(got, truth), max_err(torch_ref, truth)
    bound = ERR_FACTOR * e_ref + ATOL[got.dtype]
    assert e_got <= bound, f"{what}: error {e_got:.3g} > {ERR_FACTOR} x torch error {e_ref:.3g} + {ATOL[got.dtype]:g}"


def make(shape, dtype, device, seed, noncontig=False) -> torch.Tensor:
    """Standard normal data in ``dtype``; ``noncontig`` gives a strided view with the same values layout."""
    g = torch.Generator().manual_seed(seed)
    if noncontig:
        full = torch.randn(*shape[:-1], 2 * shape[-1], generator=g, dtype=torch.float64)
        return full.to(dtype).to(device)[..., ::2]
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def at_offset(t: torch.Tensor | None, offset: int = 1) -> torch.Tensor | None:
    """A contiguous copy of ``t`` starting ``offset`` elements into its storage: not 16-byte aligned."""
    if t is None:
        return None
    out = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)[offset:].view(t.shape)
    out.copy_(t)
    return out


def bits_equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Same dtype, shape and bit pattern (NaNs included)."""
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.detach().cpu().contiguous().view(view), b.detach().cpu().contiguous().view(view))
