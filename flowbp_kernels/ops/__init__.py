"""Fused ops of the surrogate: autograd Functions with pure-torch references (``ops.reference``)."""

from flowbp_kernels.ops._dispatch import backends
from flowbp_kernels.ops.euler_cache_step import VelocityCache, euler_cache_step
from flowbp_kernels.ops.lagrange_leap import LagrangeLeap, lagrange_leap
from flowbp_kernels.ops.surrogate_vjp import BridgeCoupling, GradScale, Pin, grad_scale, pin, surrogate_vjp

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
