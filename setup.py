"""Build of flowbp-kernels' optional compiled extension ``flowbp_kernels._C`` (ops under ``torch.ops.flowbp``).

The package metadata lives in pyproject.toml; this file only adds the extension. CPU kernels (OpenMP) are
built whenever torch is importable in the build environment and a C++ compiler is found; CUDA kernels
when torch has CUDA and nvcc is found. With no torch in the build environment (a plain, isolated
``pip install .``) the install is pure Python and the kernels are compiled on first use (flowbp_kernels/_ext.py).
Environment: FLOWBP_SKIP_CUDA_BUILD=1 (CPU only), FLOWBP_FORCE_CUDA_BUILD=1 (CUDA even with no visible GPU;
fails without nvcc), FLOWBP_BUILD_CUDA=0/1 (same two, as ARCHITECTURE.md names them), FLOWBP_CUDA_ARCHS
(default DEFAULT_CUDA_ARCHS: sm_80 and sm_90 code plus sm_90 PTX), FLOWBP_SKIP_CPU_BUILD=1 (no extension
at all), FLOWBP_CPU_NATIVE=0 (a portable build without -march=native; the default builds for the machine
that compiles, as the kernels are built where used).
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
#: Machine code for A100 and H100/H200, and PTX of the highest one, which the driver compiles at load time on
#: a newer GPU (without it, a GPU newer than the list gets "no kernel image is available").
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
#: nvcc flags of the CUDA kernels: no contraction of a*b+c into an FMA (the kernels round as the reference does).
NVCC_FLAGS = ["-O3", "--fmad=false", "-DFLOWBP_WITH_CUDA"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(msg: str) -> None:
    print(f"flowbp-kernels setup: {msg}", file=sys.stderr)


def cpu_sources() -> list[str]:
    return [f"{CSRC}/registration.cpp", *sorted(glob.glob(f"{CSRC}/*/*_cpu.cpp", root_dir=HERE))]


def cuda_sources() -> list[str]:
    return sorted(glob.glob(f"{CSRC}/*/*_cuda.cu", root_dir=HERE))


def op_headers() -> list[str]:
    """Each op's host code shared by its CPU and CUDA launchers (csrc/<op>/<op>.h)."""
    return sorted(glob.glob(f"{CSRC}/*/*.h", root_dir=HERE))


def cxx_flags(native: bool = False) -> list[str]:
    # -ffp-contract=off: keep a*b+c as two roundings, so the kernels match torch's eager results bit for bit.
    flags = ["-O3", "-ffp-contract=off"]
    if sys.platform != "darwin":
        flags.append("-fopenmp")
    if native and platform.machine().lower() in ("x86_64", "amd64"):
        # in-cache sizes are instruction-bound: AVX2/AVX-512 instead of the SSE2 baseline
        flags.append("-march=native")
    return flags


def _want_cuda(torch_mod, cuda_home) -> tuple[bool, str]:
    force = _flag("FLOWBP_FORCE_CUDA_BUILD") or os.environ.get("FLOWBP_BUILD_CUDA", "").strip() == "1"
    skip = _flag("FLOWBP_SKIP_CUDA_BUILD") or os.environ.get("FLOWBP_BUILD_CUDA", "").strip() == "0"
    if skip:
        return False, "FLOWBP_SKIP_CUDA_BUILD set"
    has_nvcc = cuda_home is not None and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    if torch_mod.version.cuda is None:
        if force:
            raise RuntimeError("FLOWBP_FORCE_CUDA_BUILD=1 but the installed torch has no CUDA")
        return False, "torch has no CUDA"
    if not has_nvcc:
        if force:
            raise RuntimeError("FLOWBP_FORCE_CUDA_BUILD=1 but nvcc was not found (set CUDA_HOME)")
        return False, "nvcc not found"
    return True, "torch has CUDA and nvcc is present"


def extensions():
    if _flag("FLOWBP_SKIP_CPU_BUILD"):
        _say("FLOWBP_SKIP_CPU_BUILD set: pure-Python install")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _say(
            "torch is not importable in the build environment: pure-Python install "
            "(use `pip install --no-build-isolation .` to build the kernels; else they compile on first use)"
        )
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        _say(f"no C++ compiler ({cxx}): pure-Python install")
        return [], {}
    use_cuda, why = _want_cuda(torch, CUDA_HOME)
    _say(f"building the CPU kernels; CUDA kernels: {'yes' if use_cuda else 'no'} ({why})"
         + (f"; archs {os.environ.get('FLOWBP_CUDA_ARCHS', DEFAULT_CUDA_ARCHS)}" if use_cuda else ""))
    cflags = cxx_flags(os.environ.get("FLOWBP_CPU_NATIVE", "1").strip() != "0")
    ldflags = ["-fopenmp"] if sys.platform != "darwin" else []
    if use_cuda:
        archs = os.environ.get("FLOWBP_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        ext = CUDAExtension(
            "flowbp_kernels._C",
            cpu_sources() + cuda_sources(),
            extra_compile_args={
                "cxx": cflags + ["-DFLOWBP_WITH_CUDA"],
                "nvcc": NVCC_FLAGS,
            },
            extra_link_args=ldflags,
        )
    else:
        ext = CppExtension("flowbp_kernels._C", cpu_sources(), extra_compile_args=cflags, extra_link_args=ldflags)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


def data_files() -> list[tuple[str, list[str]]]:
    # The kernel sources travel with the install so that a pure-Python install can compile them on first use.
    files = [f"{CSRC}/common.h", f"{CSRC}/cuda_common.cuh", *op_headers(), *cpu_sources(), *cuda_sources()]
    groups: dict[str, list[str]] = {}
    for f in files:
        groups.setdefault(os.path.join("share", "flowbp_kernels", os.path.dirname(f)), []).append(f)
    return sorted(groups.items())


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass, data_files=data_files())
