"""The one loader of the compiled extension (``torch.ops.flowbp.*``: CPU and, when built, CUDA kernels).

Order: the module built ahead of time by ``pip install --no-build-isolation .`` (``flowbp_kernels/_C*.so``);
else a just-in-time build with ``torch.utils.cpp_extension.load`` and ninja, cached under the user's cache
folder (``$XDG_CACHE_HOME`` or ``~/.cache``)/flowbp_kernels, disabled by ``FLOWBP_JIT=0``. Loading happens
on first use, never at import, and never initialises CUDA; the reason of a failure is remembered and
reported by ``flowbp_kernels.backends()``. This module also registers the fake (meta) implementations
that let torch.compile trace the ops. Limits: Linux/macOS toolchains (the JIT needs a C++ compiler).
"""

from __future__ import annotations

import glob
import importlib.machinery
import os
import platform
import sys
import threading
from pathlib import Path

import torch

OPS = ("euler_cache_step", "lagrange_leap_fwd", "surrogate_vjp")
_PKG = Path(__file__).resolve().parent
_lock = threading.Lock()
_state: dict = {"tried": False, "ok": False, "origin": None, "error": None, "cuda": False, "cuda_why": None}


def _sources_root() -> Path | None:
    """Where the C++/CUDA sources are: the source checkout, or the copy installed under share/."""
    for root in (_PKG.parent / "csrc", Path(sys.prefix) / "share" / "flowbp_kernels" / "csrc"):
        if (root / "registration.cpp").is_file():
            return root
    return None


def _registered() -> bool:
    return all(hasattr(torch.ops.flowbp, op) for op in OPS) if hasattr(torch.ops, "flowbp") else False


def _has_cuda_kernels() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("flowbp::lagrange_leap_fwd", "CUDA")
    except Exception:  # noqa: BLE001 - private API; absence only means "unknown", reported as False
        return False


def _prebuilt() -> str | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        hits = glob.glob(str(_PKG / f"_C{suffix}"))
        if hits:
            return hits[0]
    return None


def cache_dir() -> Path:
    """Folder of the JIT builds, one subfolder per (torch version, Python, CUDA) combination."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
    return root / "flowbp_kernels" / "jit" / tag


def _jit_build() -> str:
    from torch.utils import cpp_extension

    root = _sources_root()
    if root is None:
        raise RuntimeError("the C++ sources (csrc/) are not installed with this copy of flowbp_kernels")
    sources = [str(root / "registration.cpp"), *sorted(glob.glob(str(root / "*" / "*_cpu.cpp")))]
    cflags = ["-O3", "-ffp-contract=off"] + (["-fopenmp"] if sys.platform != "darwin" else [])
    if os.environ.get("FLOWBP_CPU_NATIVE", "1").strip() != "0" and platform.machine().lower() in ("x86_64", "amd64"):
        cflags.append("-march=native")  # built where it runs (as setup.py does)
    want_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("FLOWBP_SKIP_CUDA_BUILD", "") not in ("1", "true")
        and torch.cuda.is_available()
    )
    name = "flowbp_kernels_jit"
    if want_cuda:
        sources += sorted(glob.glob(str(root / "*" / "*_cuda.cu")))
        cflags.append("-DFLOWBP_WITH_CUDA")
        name += "_cuda"
    build = cache_dir() / name
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=cflags,
        extra_cuda_cflags=["-O3", "--fmad=false", "-DFLOWBP_WITH_CUDA"],  # as setup.py: no FMA contraction
        extra_ldflags=["-fopenmp"] if sys.platform != "darwin" else [],
        build_directory=str(build),
        with_cuda=want_cuda,
        is_python_module=False,
        verbose=os.environ.get("FLOWBP_JIT_VERBOSE", "") == "1",
    )
    return f"jit ({build})"


# torch.compile: dynamo cannot trace the lock (nor the loading), so it runs this function as it is and takes
# the result as a constant of the graph; the first op call of a process may then happen under tracing.
@torch.compiler.assume_constant_result
def load() -> bool:
    """Load the extension once (prebuilt, else JIT unless ``FLOWBP_JIT=0``). True when the ops are registered."""
    if _state["tried"]:
        return _state["ok"]
    with _lock:
        if _state["tried"]:
            return _state["ok"]
        errors = []
        if _registered():
            _state.update(ok=True, origin="already registered")
        path = _prebuilt()
        if not _state["ok"] and path is not None:
            try:
                torch.ops.load_library(path)
                _state.update(ok=_registered(), origin=f"prebuilt ({path})")
            except (OSError, RuntimeError) as exc:
                errors.append(f"prebuilt {path} failed to load: {exc}")
        elif path is None:
            errors.append("no prebuilt module (install with `pip install --no-build-isolation .` to build one)")
        if not _state["ok"]:
            if os.environ.get("FLOWBP_JIT", "1").strip() == "0":
                errors.append("JIT build disabled by FLOWBP_JIT=0")
            else:
                try:
                    origin = _jit_build()
                    _state.update(ok=_registered(), origin=origin)
                except Exception as exc:  # noqa: BLE001 - any build failure means "not available": keep why
                    lines = str(exc).strip().splitlines()
                    errors.append(f"JIT build failed: {lines[-1] if lines else repr(exc)}")
        if _state["ok"]:
            _register_fakes()
            _state["cuda"] = _has_cuda_kernels()
            _state["cuda_why"] = None if _state["cuda"] else "the extension was built without CUDA kernels"
        else:
            _state["error"] = "; ".join(errors)
            _state["cuda_why"] = _state["error"]
        _state["tried"] = True
        return _state["ok"]


def status() -> dict:
    """``{"ok", "origin", "error", "cuda", "cuda_why"}`` after an attempt to load."""
    load()
    return dict(_state)


def _working(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_fakes_done = False


def _register_fakes() -> None:
    global _fakes_done
    if _fakes_done:
        return
    _fakes_done = True

    @torch.library.register_fake("flowbp::euler_cache_step")
    def _(x, v, h, velocity_format, latent_dtype, write_cached=True, write_data=True):
        x_next = x.new_empty(x.shape, dtype=_working(x.dtype))
        x_cached = x.new_empty(x.shape if write_cached else (0,), dtype=latent_dtype)
        if velocity_format == 2:
            data, scale = x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty((*x.shape[:-1], 1))
            return x_next, x_cached, data, scale.float()
        vd = _working(v.dtype) if velocity_format == 0 else torch.bfloat16
        data = x.new_empty(x.shape if write_data else (0,), dtype=vd)
        return x_next, x_cached, data, x.new_empty((0,), dtype=torch.float32)

    @torch.library.register_fake("flowbp::lagrange_leap_fwd")
    def _(anchor, nodes, weights, target, base):
        wd = _working(anchor.dtype)
        res = anchor.new_empty((anchor.shape[0] if target is not None else 0,), dtype=wd)
        return anchor.new_empty(anchor.shape, dtype=wd), res

    @torch.library.register_fake("flowbp::surrogate_vjp")
    def _(upstream, adjoint, coefs, out_dtype):
        return upstream.new_empty((len(coefs), *upstream.shape), dtype=out_dtype)
