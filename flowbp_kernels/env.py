"""``python -m flowbp_kernels.env``: versions of the stack and which kernel backends this machine has.

Prints torch/triton/Python/compiler facts and ``flowbp_kernels.backends()`` (which loads, or JIT-builds,
the compiled extension). Never initialises CUDA unless torch reports a usable GPU.
"""

from __future__ import annotations

import importlib.util
import platform
import sys


def report() -> str:
    """The report as text."""
    import torch

    import flowbp_kernels
    from flowbp_kernels import _ext, backends

    lines = [
        f"flowbp_kernels {flowbp_kernels.__version__}",
        f"python {sys.version.split()[0]} ({platform.platform()})",
        f"torch {torch.__version__} (CUDA build {torch.version.cuda}, OpenMP {torch.backends.openmp.is_available()}, "
        f"threads {torch.get_num_threads()})",
    ]
    if importlib.util.find_spec("triton") is not None:
        import triton

        lines.append(f"triton {triton.__version__}")
    else:
        lines.append("triton not installed")
    if torch.cuda.is_available():
        lines.append(f"gpu {torch.cuda.get_device_name(0)} (capability {torch.cuda.get_device_capability(0)})")
    else:
        lines.append("gpu none visible to torch")
    for name, msg in backends().items():
        lines.append(f"backend {name}: {msg}")
    lines.append(f"jit cache {_ext.cache_dir()}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
