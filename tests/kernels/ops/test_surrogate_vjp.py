"""surrogate_vjp and the gradient scales (GradScale, BridgeCoupling) against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import flowbp_kernels as fb
from flowbp_kernels.ops import GradScale
from flowbp_kernels.ops import reference as ref

from helpers.kernels import (
    ALIGNMENT_SHAPES,
    BATCHES,
    DTYPES,
    ROW_SIZES,
    assert_close_to_truth,
    at_offset,
    backend_params,
    bits_equal,
    force,
    make,
)

torch.set_num_threads(1)
COEFS = [0.7, -1.3, 0.25, 2.0, -0.5, 1.0, 0.9, -0.3, 0.6, 1.7]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
def test_matches_reference(backend, out_dtype, p, monkeypatch):
    device = force(monkeypatch, backend)
    cs = COEFS[:p]
    for c in ROW_SIZES:
        for b in BATCHES:
            for with_adj in (False, True):
                up = make((b, 3, c), torch.float32, device, c + b, noncontig=c > 1)
                adj = make((b, 3, c), torch.float32, device, c + b + 7) if with_adj else None
                got = fb.surrogate_vjp(up, adj, cs, out_dtype=out_dtype)
                r = ref.surrogate_vjp_ref(up, adj, cs, out_dtype)
                truth = ref.surrogate_vjp_ref(up.double().cpu(), None if adj is None else adj.double().cpu(), cs)
                assert got.shape == (p, b, 3, c) and got.dtype == out_dtype
                assert_close_to_truth(got.cpu(), r.cpu(), truth, f"c={c} b={b} adjoint={with_adj}")


@pytest.mark.parametrize("backend", backend_params())
def test_many_nodes_low_precision_adjoint_and_p0(backend, monkeypatch):
    device = force(monkeypatch, backend)
    up = make((2, 5, 33), torch.float32, device, 1)
    adj = make((2, 5, 33), torch.bfloat16, device, 2)
    got = fb.surrogate_vjp(up, adj, COEFS, out_dtype=torch.bfloat16)  # 10 nodes: two launches on GPU backends
    truth = ref.surrogate_vjp_ref(up.double().cpu(), adj.double().cpu(), COEFS)
    assert_close_to_truth(got.cpu(), ref.surrogate_vjp_ref(up, adj, COEFS, torch.bfloat16).cpu(), truth, "P=10")
    with pytest.raises(ValueError, match="coefs"):
        fb.surrogate_vjp(up, None, [])


@pytest.mark.parametrize("backend", backend_params())
def test_bad_inputs(backend, monkeypatch):
    device = force(monkeypatch, backend)
    up = make((2, 3), torch.float32, device, 0)
    with pytest.raises(ValueError, match="adjoint"):
        fb.surrogate_vjp(up, up[:, :2], [1.0])
    with pytest.raises(ValueError, match="coefs"):
        fb.surrogate_vjp(up, None, [float("nan")])
    with pytest.raises(ValueError, match="adjoint"):
        fb.surrogate_vjp(up, torch.ones(2, 3, device="meta"), [1.0])
    with pytest.raises(TypeError, match="upstream"):
        fb.surrogate_vjp(up.long(), None, [1.0])
    with pytest.raises(TypeError, match="out_dtype"):
        fb.surrogate_vjp(up, None, [1.0], out_dtype=torch.int32)


def test_fp64_gradcheck_grad_scale_and_bridge():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    # value is x exactly; the gradient is scale * g: gradcheck of scale * x's Jacobian through a wrapper
    for scale in (0.3, 1.0, 2.5):
        assert torch.equal(fb.grad_scale(x, scale), x)
        assert torch.equal(fb.BridgeCoupling(scale)(x), x)
        (gx,) = torch.autograd.grad(fb.grad_scale(x, scale).sum(), x)
        assert torch.equal(gx, torch.full_like(x, scale))
    # GradScale at scale 1 is the identity function, so the numerical and analytic Jacobians must agree
    assert torch.autograd.gradcheck(lambda t: GradScale.apply(t, 1.0), (x,))
    assert torch.autograd.gradcheck(lambda t: fb.BridgeCoupling(1.0)(t) * t, (x,))


def test_bridge_coupling_rejects_bad_alpha():
    with pytest.raises(ValueError, match="alpha"):
        fb.BridgeCoupling(float("nan"))
    with pytest.raises(ValueError, match="alpha"):
        fb.BridgeCoupling(-1.0)


@pytest.mark.parametrize("backend", backend_params())
def test_alignment_inputs_unchanged_and_run_to_run_bits(backend, monkeypatch):
    """Aligned inputs (the CUDA kernel's 128-bit path) and the same values at an odd storage offset (its
    scalar path) give the same bits, a second call too, and the inputs are not written."""
    device = force(monkeypatch, backend)
    for shape in ALIGNMENT_SHAPES:
        for out_dtype in DTYPES:
            for p in (3, 10):
                up, adj = make(shape, torch.float32, device, 1), make(shape, torch.float32, device, 2)
                before = (up.clone(), adj.clone())
                got = fb.surrogate_vjp(up, adj, COEFS[:p], out_dtype=out_dtype)
                assert bits_equal(got, fb.surrogate_vjp(up, adj, COEFS[:p], out_dtype=out_dtype))
                assert bits_equal(got, fb.surrogate_vjp(at_offset(up), at_offset(adj), COEFS[:p], out_dtype=out_dtype))
                assert bits_equal(before[0], up) and bits_equal(before[1], adj)
                truth = ref.surrogate_vjp_ref(up.double().cpu(), adj.double().cpu(), COEFS[:p])
                r = ref.surrogate_vjp_ref(up, adj, COEFS[:p], out_dtype)
                assert_close_to_truth(got.cpu(), r.cpu(), truth, f"{shape} P={p}")
