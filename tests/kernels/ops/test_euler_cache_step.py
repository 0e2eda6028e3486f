"""euler_cache_step / VelocityCache on every backend: Euler value, cached latent, the three velocity formats
(bit-exact where the arithmetic is the reference's, and within the error bounds stated in
ops/_euler_cache_step.py), and the fp8-cache gradient property of pinned methods on a tiny model."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import flowbp_kernels as fb
from flowbp_kernels.ops import reference as ref

from helpers.engine import TinyReward, TinyVelocity, flat_grad
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
H = -0.0731


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.cpu().contiguous().view(view), b.cpu().contiguous().view(view))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("vdtype", DTYPES)
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8"])
def test_matches_reference(backend, vdtype, fmt, monkeypatch):
    device = force(monkeypatch, backend)
    # bit for bit on every backend, fp8 included: all divide with correct rounding, RN(amax / 448), RN(v / scale)
    for c in ROW_SIZES:
        for b in BATCHES:
            x = make((b, 3, c), torch.float32, device, c + b, noncontig=c > 1)
            v = make((b, 3, c), vdtype, device, c + b + 1, noncontig=c > 1) * 3
            for ld in (torch.float32, torch.bfloat16):
                x_next, x_cached, data, scale = fb.euler_cache_step(x, v, H, velocity_format=fmt, latent_dtype=ld)
                r_next, r_cached, r_data, r_scale = ref.euler_cache_step_ref(
                    x, v, H, velocity_format=fmt, latent_dtype=ld
                )
                truth = x.double().cpu() + H * v.double().cpu()
                assert_close_to_truth(x_next.cpu(), r_next.cpu(), truth, f"x_next c={c}")
                assert _bits_equal(x_cached, r_cached), "x_cached is a plain cast and must match bit for bit"
                assert _bits_equal(data, r_data), f"{fmt} data differs from the reference"
                assert (scale is None) == (r_scale is None)
                if scale is not None:
                    assert _bits_equal(scale, r_scale)
                _assert_within_bound(v, data, scale, fmt)


def _bound(v: torch.Tensor, scale: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """The per-element bound stated in ops/_euler_cache_step.py (plus fp32 round-off of the scaling)."""
    a = v.double().abs()
    if fmt == "fp32":
        return torch.zeros_like(a)
    if fmt == "bf16":
        return a * 2.0**-8
    s = scale.double()
    return (a * 2.0**-4 + s * 2.0**-10) * (1 + 2.0**-20)


def _assert_within_bound(v, data, scale, fmt):
    back = ref.dequantize_velocity_ref(data, scale, torch.float64).cpu()
    err = (back - v.double().cpu()).abs()
    bound = _bound(v.cpu(), None if scale is None else scale.cpu(), fmt)
    assert bool((err <= bound).all()), f"{fmt}: worst error/bound {float((err / bound.clamp_min(1e-300)).max()):.3g}"


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8"])
def test_stated_error_bounds(backend, fmt, monkeypatch):
    """Values over many binades, a zero row, subnormal-range entries: every element within the bound."""
    device = force(monkeypatch, backend)
    g = torch.Generator().manual_seed(3)
    v = torch.randn(4, 6, 129, generator=g) * torch.exp2(torch.randint(-12, 12, (4, 6, 129), generator=g).float())
    v[0, 0] = 0.0  # an all-zero row: the minimum scale keeps it exactly zero
    v[1, 1, :5] = torch.tensor([1e-9, -3e-7, 448.0, 5.0, -0.0])
    v = v.to(device)
    x = torch.zeros_like(v)
    _, _, data, scale = fb.euler_cache_step(x, v, H, velocity_format=fmt)
    _assert_within_bound(v, data, scale, fmt)
    back = ref.dequantize_velocity_ref(data, scale, torch.float32)
    assert torch.equal(back[0, 0].cpu(), torch.zeros(129))


@pytest.mark.parametrize("backend", backend_params())
def test_float64_state_and_cache_roundtrip(backend, monkeypatch):
    """VelocityCache through the dispatch: float64 stays float64 in fp32 format (where the backend serves it)."""
    device = force(monkeypatch, backend)
    if backend == "triton":
        monkeypatch.setenv("FLOWBP_BACKEND", "auto")  # Triton does not take float64; the automatic choice must
    x = make((2, 4, 8), torch.float64, device, 0)
    v = make((2, 4, 8), torch.float64, device, 1)
    cache = fb.VelocityCache("fp32", torch.float64)
    x1 = cache.step(x, v, H)
    assert x1.dtype == torch.float64 and torch.equal(x1.cpu(), (x + H * v).cpu())
    assert torch.equal(cache.velocity(0).cpu(), v.cpu()) and torch.equal(cache.latent(0).cpu(), x.cpu())
    assert cache.nbytes() == 2 * x.numel() * 8


@pytest.mark.parametrize("backend", backend_params())
def test_bad_inputs(backend, monkeypatch):
    device = force(monkeypatch, backend)
    x = make((2, 3), torch.float32, device, 0)
    with pytest.raises(ValueError, match="velocity_format"):
        fb.euler_cache_step(x, x, H, velocity_format="fp4")
    with pytest.raises(ValueError, match="v must have the shape"):
        fb.euler_cache_step(x, x[:, :2], H)
    with pytest.raises(ValueError, match="h must be"):
        fb.euler_cache_step(x, x, float("nan"))
    with pytest.raises(ValueError, match="v must be on"):
        fb.euler_cache_step(x, torch.ones(2, 3, device="meta"), H)
    with pytest.raises(TypeError, match="latent_dtype"):
        fb.euler_cache_step(x, x, H, latent_dtype=torch.int8)
    with pytest.raises(TypeError, match="floating point"):
        fb.euler_cache_step(x, x.long(), H)


def _grad(net, ro, method, plan, reward):
    net.zero_grad()
    out = fb.reward_backprop(method, net, ro, reward, plan=plan, executor="streaming")
    return flat_grad(net).clone(), out.weight.detach().clone()


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.id in ("torch", "cpu")])
def test_fp8_cache_changes_pinned_gradients_only_through_the_weight(backend, monkeypatch):
    """Pinned methods use the cached velocities' values only in xhat, which the pin replaces by the true
    latent; what remains is the residual inside the similarity weight. So with an fp8 cache:
    flowbp-sparse (weight 1) gives the identical gradient, and flowbp-lagrange's gradient is the fp32-cache
    gradient times w_fp8 / w_fp32 (one sample per rollout, so the ratio is one number)."""
    force(monkeypatch, backend)
    n = 8
    sig = fb.flow_sigmas(n, shift=3.0)
    net = TinyVelocity(sig)
    reward = TinyReward()
    for seed in (5, 6):
        x0 = torch.randn(1, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        ro32 = fb.rollout(net, x0, sig, cache="fp32")
        ro8 = fb.rollout(net, x0, sig, cache="fp8")
        assert torch.equal(ro32.sample, ro8.sample)
        assert not torch.equal(ro32.velocity(3), ro8.velocity(3)), "the fp8 cache must actually be lossy"
        sparse = fb.get_method("flowbp-sparse")
        plan = sparse.plan(n, torch.Generator().manual_seed(seed))
        g32, _ = _grad(net, ro32, sparse, plan, reward)
        g8, _ = _grad(net, ro8, sparse, plan, reward)
        assert torch.equal(g32, g8)
        lag = fb.get_method("flowbp-lagrange", tau=1e-9)  # tau below the residuals: the weight sees them
        plan = lag.plan(n, torch.Generator().manual_seed(seed))
        g32, w32 = _grad(net, ro32, lag, plan, reward)
        g8, w8 = _grad(net, ro8, lag, plan, reward)
        assert not torch.equal(w32, w8), "the residual-based weight should see the fp8 error"
        ratio = float(w8 / w32)
        torch.testing.assert_close(g8, g32 * ratio, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8"])
def test_alignment_inputs_unchanged_and_run_to_run_bits(backend, fmt, monkeypatch):
    """Aligned inputs (the CUDA kernels' 128-bit path) and the same values at an odd storage offset (the
    scalar path) give the same bits, a second call too, and x and v are not written."""
    device = force(monkeypatch, backend)
    for shape in ALIGNMENT_SHAPES:
        for vdtype in DTYPES:
            x, v = make(shape, torch.float32, device, 3), make(shape, vdtype, device, 4) * 3
            before = (x.clone(), v.clone())
            outs = fb.euler_cache_step(x, v, H, velocity_format=fmt, latent_dtype=torch.bfloat16)
            again = fb.euler_cache_step(x, v, H, velocity_format=fmt, latent_dtype=torch.bfloat16)
            shifted = fb.euler_cache_step(at_offset(x), at_offset(v), H, velocity_format=fmt,
                                          latent_dtype=torch.bfloat16)
            for a, b, c in zip(outs, again, shifted):
                assert bits_equal(a, b) and bits_equal(a, c), f"{fmt} {shape} {vdtype}: other bits"
            assert bits_equal(before[0], x) and bits_equal(before[1], v)
            r = ref.euler_cache_step_ref(x, v, H, velocity_format=fmt, latent_dtype=torch.bfloat16)
            truth = x.double().cpu() + H * v.double().cpu()
            assert_close_to_truth(outs[0].cpu(), r[0].cpu(), truth, f"x_next {shape}")
            assert bits_equal(outs[1], r[1])
            assert bits_equal(outs[2], r[2])  # fp8 too: the divisions are correctly rounded everywhere


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_e4m3_rounding_matches_torch_cast():
    """The Triton e4m3fn rounding against torch's own cast over every binade, the subnormals, the
    saturation range (464 and up, infinity) and NaN; where this torch still gives NaN above 464 (older
    releases), only the range below is compared (the op never quantizes anything above 448)."""
    from flowbp_kernels.triton import _convert

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(11)
    bits = torch.randint(-(2**31), 2**31 - 1, (4096,), generator=g, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([0.0, -0.0, 2.0**-10, 2.0**-9, 1.5 * 2.0**-9, 2.0**-6, 447.9, 448.0, 463.99, 464.0, 479.0,
                            480.0, 1e6, float("inf"), -float("inf"), float("nan"), -float("nan"), -464.0])
    x = torch.cat([bits.view(torch.float32), special]).to(device)
    got = torch.empty(x.shape, dtype=torch.uint8, device=device)
    _e4m3_kernel[(triton.cdiv(x.numel(), 1024),)](x, got, x.numel(), BLOCK=1024)
    want = x.to(torch.float8_e4m3fn).view(torch.uint8)
    if torch.tensor(500.0, device=device).to(torch.float8_e4m3fn).float().isnan():  # older torch: NaN above 464
        keep = x.abs() < 464
        got, want = got[keep], want[keep]
    assert torch.equal(got.cpu(), want.cpu()), f"{int((got != want).sum())} values round differently"
    assert _convert.e4m3fn_bits is not None


if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    from flowbp_kernels.triton._convert import e4m3fn_bits

    @triton.jit
    def _e4m3_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(out_ptr + offs, e4m3fn_bits(tl.load(x_ptr + offs, mask=mask, other=0.0)), mask=mask)
