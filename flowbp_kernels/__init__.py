"""flowbp-kernels: direct reward backpropagation for flow-matching models.

A no-grad cached rollout samples the image; a backward surrogate, defined by four choices (reward
input, active set, integration weights, bridge coupling), turns the reward's gradient into parameter
gradients. Every method is a setting of those choices (``get_method``), run by one of two executors
(``reward_backprop``). See shared/design/ALGORITHM.md for the math. A module named like the function it
defines is private (``_rollout``, ``ops._lagrange_leap``), so that ``flowbp_kernels.rollout`` is one thing.
"""

from flowbp_kernels._rollout import Rollout, rollout
from flowbp_kernels.executors import EXECUTORS, NonFiniteLossError, StepOutput, reward_backprop
from flowbp_kernels.methods import DEFAULTS, METHODS, Method, Plan, WindowError, get_method
from flowbp_kernels.ops import (
    BridgeCoupling,
    LagrangeLeap,
    VelocityCache,
    backends,
    euler_cache_step,
    grad_scale,
    lagrange_leap,
    pin,
    surrogate_vjp,
)
from flowbp_kernels.quadrature import lagrange_weights, support_nodes
from flowbp_kernels.schedule import flow_sigmas, flux2_mu, flux_mu
from flowbp_kernels.surrogate import Node, Segment, Surrogate

__version__ = "0.1.0"

__all__ = [
    "DEFAULTS",
    "EXECUTORS",
    "METHODS",
    "BridgeCoupling",
    "LagrangeLeap",
    "Method",
    "Node",
    "NonFiniteLossError",
    "Plan",
    "Rollout",
    "Segment",
    "StepOutput",
    "Surrogate",
    "VelocityCache",
    "WindowError",
    "backends",
    "euler_cache_step",
    "flow_sigmas",
    "flux2_mu",
    "flux_mu",
    "get_method",
    "grad_scale",
    "lagrange_leap",
    "lagrange_weights",
    "pin",
    "reward_backprop",
    "rollout",
    "support_nodes",
    "surrogate_vjp",
]
