"""Support nodes and exact Lagrange weights (ALGORITHM.md section 3, item 6 of section 6)."""

import math

import pytest
import torch

from flowbp_kernels import flow_sigmas, lagrange_weights, support_nodes


def test_support_nodes_examples():
    assert support_nodes(6, 20, 3, 25) == [6, 12, 19]
    assert support_nodes(20, 25, 3, 25) == [20, 22, 24]
    assert support_nodes(3, 5, 3, 25) == [3, 4]  # interval shorter than the order: all of it
    assert support_nodes(0, 25, 1, 25) == [0]
    nodes = support_nodes(0, 25, 5, 25)
    assert nodes[0] == 0 and nodes == sorted(set(nodes)) and max(nodes) == 24 and len(nodes) == 5


def test_support_nodes_errors():
    with pytest.raises(ValueError, match="a < b"):
        support_nodes(5, 5, 3, 25)
    with pytest.raises(ValueError, match="order"):
        support_nodes(0, 5, 0, 25)
    with pytest.raises(TypeError, match="a must be an int"):
        support_nodes(0.5, 5, 3, 25)


def test_worked_example_sd35():
    s = flow_sigmas(25, shift=3.0)
    w = lagrange_weights(s[[6, 12, 19]], s[6], s[20])
    assert w.dtype == torch.float64
    assert w.tolist() == pytest.approx([-0.010, -0.293, -0.173], abs=6e-4)
    assert float(w.sum()) == pytest.approx(float(s[20] - s[6]), abs=1e-14)


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
def test_polynomials_below_order_are_exact(p):
    g = torch.Generator().manual_seed(p)
    # spread nodes (spacing >= 0.1) so the check measures exactness, not the conditioning of close nodes
    base = torch.linspace(0.95, 0.05, p, dtype=torch.float64)
    nodes = (base + 0.04 * (torch.rand(p, generator=g, dtype=torch.float64) - 0.5)).tolist()
    a, b = 0.93, 0.07
    w = lagrange_weights(nodes, a, b)
    assert float(w.sum()) == pytest.approx(b - a, abs=1e-12)
    for deg in range(p):
        coef = torch.randn(deg + 1, generator=g, dtype=torch.float64).tolist()
        f = lambda s: sum(c * s**k for k, c in enumerate(coef))  # noqa: B023
        exact = sum(c * (b ** (k + 1) - a ** (k + 1)) / (k + 1) for k, c in enumerate(coef))
        quad = sum(float(wm) * f(sm) for wm, sm in zip(w, nodes))
        assert quad == pytest.approx(exact, rel=1e-9, abs=1e-11)


def test_order_one_is_the_euler_leap():
    w = lagrange_weights([0.7], 0.7, 0.2)
    assert w.tolist() == [pytest.approx(-0.5, abs=1e-15)]


def test_accepts_sequences_and_tensors():
    nodes = [0.9, 0.5, 0.3]
    a = lagrange_weights(nodes, 0.9, 0.1)
    b = lagrange_weights(torch.tensor(nodes), torch.tensor(0.9), 0.1)
    c = lagrange_weights(tuple(nodes), 0.9, 0.1)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_weights_errors():
    with pytest.raises(ValueError, match="distinct"):
        lagrange_weights([0.5, 0.5], 1.0, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        lagrange_weights([], 1.0, 0.0)
    with pytest.raises(ValueError, match="finite"):
        lagrange_weights([math.nan], 1.0, 0.0)
