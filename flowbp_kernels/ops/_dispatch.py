"""Backend selection for the fused ops.

Order (shared/design/ARCHITECTURE.md, "Dispatch"): the CUDA extension for CUDA tensors when built;
else Triton for CUDA tensors; else the CPU C++ kernel (CPU tensors) when built; else the torch reference.
``FLOWBP_BACKEND=torch|triton|cuda|cpu`` forces one and raises if it cannot serve the tensor; Triton
serves CPU tensors only when forced and ``TRITON_INTERPRET=1`` (tests). An automatic fallback to the
reference logs once per reason. Backends are imported lazily; nothing here touches CUDA at import.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable

import torch

Check = Callable[[str], "str | None"]
BACKENDS = ("torch", "triton", "cuda", "cpu")
#: Dtypes every compiled/Triton kernel reads and writes; anything else goes to the reference.
KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

logger = logging.getLogger("flowbp_kernels")
_logged: set[str] = set()


class BackendUnavailableError(RuntimeError):
    """``FLOWBP_BACKEND`` names a backend that cannot serve this call."""


def requested_backend() -> str | None:
    """The backend forced by ``FLOWBP_BACKEND``, or None for automatic choice."""
    name = os.environ.get("FLOWBP_BACKEND", "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"FLOWBP_BACKEND must be one of {BACKENDS} or 'auto', got {name!r}")
    return name


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip() == "1"


@torch.compiler.assume_constant_result  # import machinery: evaluated, not traced, under torch.compile
def _triton_why_not() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - an import failure of an optional backend is a reason, not an error
        return f"triton failed to import: {exc}"
    return None


def _why_not(backend: str, tensor: torch.Tensor, check: Check | None) -> str | None:
    """Why ``backend`` cannot serve the call on ``tensor`` (None when it can)."""
    if backend == "torch":
        return None
    if backend == "triton":
        why = _triton_why_not()
        if why:
            return why
        if tensor.device.type != "cuda" and not triton_interpret():
            return f"triton serves CUDA tensors (or any tensor with TRITON_INTERPRET=1), got {tensor.device}"
        return check(backend) if check is not None else None
    from flowbp_kernels import _ext

    if backend == "cpu":
        if tensor.device.type != "cpu":
            return f"the CPU kernels serve CPU tensors, got {tensor.device}"
        if not _ext.load():
            return f"compiled extension unavailable: {_ext.status()['error']}"
        return check(backend) if check is not None else None
    # cuda
    if tensor.device.type != "cuda":
        return f"the CUDA kernels serve CUDA tensors, got {tensor.device}"
    if not _ext.load():
        return f"compiled extension unavailable: {_ext.status()['error']}"
    if not _ext.status()["cuda"]:
        return "the compiled extension was built without CUDA kernels"
    return check(backend) if check is not None else None


# under torch.compile the call runs as it is at trace time (dynamo cannot trace logging), once per graph
@torch.compiler.assume_constant_result
def _log_once(key: str, msg: str) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.info(msg)


def compiled_dtypes_check(*dtypes: torch.dtype | None) -> str | None:
    """The reason the compiled kernels cannot take these dtypes, or None."""
    for dt in dtypes:
        if dt is not None and dt not in KERNEL_DTYPES:
            return f"dtype {dt} is not one of the kernels' float32/float64/float16/bfloat16"
    return None


def choose_backend(op: str, tensor: torch.Tensor, check: Check | None = None) -> str:
    """The backend that serves ``op`` for ``tensor``.

    ``check(backend)`` returns why an available backend cannot serve this particular call (a dtype, a
    size) or None; it is called only for candidate backends. The automatic choice skips a backend that
    cannot serve, a forced ``FLOWBP_BACKEND`` raises with the reason.
    """
    forced = requested_backend()
    if forced is not None:
        why = _why_not(forced, tensor, check)
        if why is not None:
            raise BackendUnavailableError(f"{op}: FLOWBP_BACKEND={forced!r} cannot serve this call: {why}")
        return forced
    order = ("cuda", "triton") if tensor.device.type == "cuda" else ("cpu",)
    reasons = []
    for backend in order:
        why = _why_not(backend, tensor, check)
        if why is None:
            return backend
        reasons.append(f"{backend}: {why}")
    _log_once(
        f"{op}:{tensor.device.type}:{';'.join(reasons)}", f"{op}: using the torch reference ({'; '.join(reasons)})"
    )
    return "torch"


def backends() -> dict[str, str]:
    """Each backend's availability on this machine, and why not where it is not (loads the extension)."""
    from flowbp_kernels import _ext

    out = {"torch": "available (reference)"}
    st = _ext.status()
    out["cpu"] = f"available: {st['origin']}" if st["ok"] else f"unavailable: {st['error']}"
    if not (st["ok"] and st["cuda"]):
        out["cuda"] = f"unavailable: {st['cuda_why']}"
    elif not torch.cuda.is_available():  # does not initialise CUDA
        out["cuda"] = f"unavailable: kernels built ({st['origin']}), but torch sees no GPU"
    else:
        out["cuda"] = f"available: {st['origin']}"
    why = _triton_why_not()
    if why is not None:
        out["triton"] = f"unavailable: {why}"
    else:
        import triton

        where = "CUDA tensors" + (
            ", and CPU tensors under TRITON_INTERPRET=1 when forced" if triton_interpret() else ""
        )
        out["triton"] = f"available (triton {triton.__version__}) for {where}"
    return out
