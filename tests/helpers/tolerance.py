"""The suite's tolerance policy, stated once (every test module takes its bounds from here).

1. Bit-exact (``torch.equal``, ``==``, ``atol=0``) only where the same operations run in the same order
   on any CPU, thread count and SIMD width, with a ``# bit-exact:`` comment at the assertion saying why:
   copies and dtype casts, a pinned value, an identity gradient, a file round trip, single elementwise
   IEEE operations (each correctly rounded; the compiled kernels are built with -ffp-contract=off), and
   the same computation repeated in one process setting (same build, same thread count, same inputs;
   e.g. a resumed run against an uninterrupted one).
2. Everywhere else (reductions, matmuls, convolutions, attention: their summation order follows the
   thread count, the SIMD width and even the memory alignment of the operands), a bound derived from
   the dtype and the depth of the computation, :func:`reorder_tol`. Recomputing a sum of n terms in
   another order changes it by at most ``2 gamma_n sum|x_i|`` with ``gamma_n = n u / (1 - n u)`` and
   ``u = eps / 2`` (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., section 4.2), that is
   about ``n * eps * magnitude``; a chain of such sums adds their lengths (``depth``).
3. Kernels against a float64 truth: at most :data:`ERR_FACTOR` times plain torch's error in the same
   dtype plus :data:`KERNEL_ATOL` of the output dtype (STYLE.md; used by helpers/kernels.py).
"""

from __future__ import annotations

import os

import torch

#: A backend's error may be this many times the torch reference's error in the same dtype ...
ERR_FACTOR = 2.0
#: ... plus this absolute term, by output dtype: a few units of the dtype's resolution at the O(1-10)
#: magnitudes of the kernel tests' data (inputs are standard normal, weights O(1)).
KERNEL_ATOL = {
    torch.float64: 1e-12,
    torch.float32: 4e-6,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of ``dtype`` (2u, the gap between 1 and the next number)."""
    return float(torch.finfo(dtype).eps)


def reorder_tol(dtype: torch.dtype, depth: int, magnitude: float) -> float:
    """The most a result can move when its sums run in another order: ``depth * eps * magnitude``.

    ``depth``: the number of roundings on the longest dependency chain (the summed lengths of the
    reductions a value goes through); ``magnitude``: the size of the terms entering them (e.g. the
    largest absolute value of the output, or of the intermediate activations when they are larger).
    """
    if depth < 1 or not magnitude >= 0:
        raise ValueError(f"depth must be >= 1 and magnitude >= 0, got {depth}, {magnitude}")
    return depth * eps(dtype) * max(magnitude, 1.0)


def assert_reorder_close(got: torch.Tensor, want: torch.Tensor, *, depth: int, what: str = "value") -> None:
    """``max|got - want| <= reorder_tol(dtype, depth, max|want|)``: equal up to summation order."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = float((got.double() - want.double()).abs().max()) if got.numel() else 0.0
    bound = reorder_tol(want.dtype, depth, float(want.double().abs().max()) if want.numel() else 0.0)
    assert err <= bound, f"{what}: differs by {err:.3g} > {bound:.3g} (depth {depth}, {want.dtype})"


def _threads_from_env() -> int:
    raw = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(raw) if raw.isdigit() and int(raw) >= 1 else 1


#: Threads of the test process: ``OMP_NUM_THREADS`` when set (CI runs the suite at 1 and at 2, so that a
#: result depending on the thread count fails there), else 1 (the CI machine is shared). tests/conftest.py
#: applies it before every test, overriding modules that set their own at import.
TEST_THREADS = _threads_from_env()
