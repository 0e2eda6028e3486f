"""Support nodes and exact Lagrange quadrature weights for the leaps of FlowBP-Lagrange.

Nodes: P positions spread evenly (round(linspace)) over the interval's indices [a, b), the first forced
to a, de-duplicated; all indices when the interval has at most P. Weights: ``w_m = int_{s_a}^{s_b}
l_m(s) ds`` with the Lagrange basis ``l_m`` over the node sigmas, integrated exactly by expanding each
basis polynomial into monomials (float64). Source: shared/design/ALGORITHM.md section 3.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def support_nodes(a: int, b: int, order: int, num_steps: int) -> list[int]:
    """Support node indices inside ``[a, b)`` (forward indices, ``0 <= a < b <= num_steps``).

    Example (N = 25): ``support_nodes(6, 20, 3, 25) == [6, 12, 19]``, ``support_nodes(20, 25, 3, 25)
    == [20, 22, 24]``.
    """
    for name, val in (("a", a), ("b", b), ("order", order), ("num_steps", num_steps)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{name} must be an int, got {type(val).__name__}")
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    if not 0 <= a < b <= num_steps:
        raise ValueError(f"need 0 <= a < b <= num_steps, got a={a}, b={b}, num_steps={num_steps}")
    interval = list(range(a, min(b - 1, num_steps - 1) + 1))
    if len(interval) <= order:
        return interval
    n = len(interval)
    positions = [round(p * (n - 1) / (order - 1)) for p in range(order)] if order > 1 else [0]
    nodes = sorted({interval[p] for p in positions} | {a})
    return nodes


def _poly_mul_linear(coeffs: list[float], root: float, denom: float) -> list[float]:
    # multiply sum_k c_k s^k by (s - root) / denom
    out = [0.0] * (len(coeffs) + 1)
    for k, c in enumerate(coeffs):
        out[k + 1] += c / denom
        out[k] -= c * root / denom
    return out


def lagrange_weights(
    node_sigmas: Sequence[float] | torch.Tensor, sigma_a: float, sigma_b: float
) -> torch.Tensor:
    """Exact ``w_m = int_{sigma_a}^{sigma_b} l_m(s) ds`` for the Lagrange basis over ``node_sigmas``.

    Returns a float64 tensor of length P. ``sum(w) == sigma_b - sigma_a``; polynomials of degree < P
    are integrated exactly; P = 1 gives the Euler leap ``[sigma_b - sigma_a]``.
    """
    if isinstance(node_sigmas, torch.Tensor):
        if node_sigmas.dim() != 1:
            raise ValueError(f"node_sigmas must be 1-d, got shape {tuple(node_sigmas.shape)}")
        nodes = node_sigmas.detach().to("cpu", torch.float64).tolist()
    else:
        nodes = [float(s) for s in node_sigmas]
    if len(nodes) == 0:
        raise ValueError("node_sigmas must hold at least one node")
    sa, sb = float(sigma_a), float(sigma_b)
    if not all(math.isfinite(s) for s in [*nodes, sa, sb]):
        raise ValueError(f"node_sigmas, sigma_a and sigma_b must be finite, got {nodes}, {sa}, {sb}")
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"node_sigmas must be distinct, got {nodes}")
    weights = []
    for m, sm in enumerate(nodes):
        coeffs = [1.0]
        for n, sn in enumerate(nodes):
            if n != m:
                coeffs = _poly_mul_linear(coeffs, sn, sm - sn)
        weights.append(sum(c * (sb ** (k + 1) - sa ** (k + 1)) / (k + 1) for k, c in enumerate(coeffs)))
    return torch.tensor(weights, dtype=torch.float64)
