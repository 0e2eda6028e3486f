"""pin(xhat, target): the value is the target bit for bit, the gradient the identity to xhat; and the
fused ops reject P = 0 (a segment without active nodes is a pin, which the executors use instead)."""

import pytest
import torch

import flowbp_kernels as fb


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pin_value_is_exact_and_gradient_identity(dtype):
    g = torch.Generator().manual_seed(0)
    xhat = (torch.randn(3, 7, generator=g, dtype=dtype) * 1e3).requires_grad_(True)
    target = torch.randn(3, 7, generator=g, dtype=torch.bfloat16)
    out = fb.pin(xhat, target)
    assert torch.equal(out, target.to(dtype))
    # the arithmetic form is not exact in floating point, which is why pin is a Function
    up = torch.randn(3, 7, generator=g, dtype=dtype)
    (gx,) = torch.autograd.grad(out, xhat, up)
    assert torch.equal(gx, up)


def test_pin_and_p0_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="target"):
        fb.pin(x, torch.zeros(2, 4))
    with pytest.raises(TypeError, match="xhat"):
        fb.pin(x.long(), x)
    with pytest.raises(ValueError, match="P >= 1"):
        fb.lagrange_leap(x, [], [], x)
    with pytest.raises(ValueError, match="coefs"):
        fb.surrogate_vjp(x, None, [])
