"""Fused ops of the surrogate: autograd Functions with pure-torch references (``ops.reference``).

One private module per op (``_euler_cache_step``, ``_lagrange_leap``, ``_surrogate_vjp``: the op's name, as in
triton/, csrc/ and tests/kernels/ops/), whose public functions and classes this package exports under their own
names. The modules are private so that a name means one thing: ``flowbp_kernels.ops.lagrange_leap`` is the
function, ``flowbp_kernels.ops._lagrange_leap`` its module (with the backend tables benchmarks and tests read).
"""

from flowbp_kernels.ops._dispatch import backends
from flowbp_kernels.ops._euler_cache_step import VelocityCache, euler_cache_step
from flowbp_kernels.ops._lagrange_leap import LagrangeLeap, lagrange_leap
from flowbp_kernels.ops._surrogate_vjp import BridgeCoupling, GradScale, Pin, grad_scale, pin, surrogate_vjp

__all__ = [
    "BridgeCoupling",
    "GradScale",
    "LagrangeLeap",
    "Pin",
    "VelocityCache",
    "backends",
    "euler_cache_step",
    "grad_scale",
    "lagrange_leap",
    "pin",
    "surrogate_vjp",
]
