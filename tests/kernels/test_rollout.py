"""The cached rollout against a plain Euler loop."""

import pytest
import torch

import flowbp_kernels as fb

from helpers.engine import TinyVelocity


def test_rollout_matches_plain_euler_and_caches_everything():
    sig = fb.flow_sigmas(7, shift=3.0)
    net = TinyVelocity(sig)
    x0 = torch.randn(2, 2, 3, dtype=torch.float64)
    ro = fb.rollout(net, x0, sig)
    x = x0.clone()
    with torch.no_grad():
        for i in range(7):
            v = net(x, i)
            # bit-exact: the cache keeps copies; the Euler update is one multiply and one add per
            # element (no contraction), and net(x, i) repeats the rollout's call in this process
            assert torch.equal(ro.latents[i], x)
            assert torch.equal(ro.velocities[i], v)
            x = x + float(sig[i + 1] - sig[i]) * v
    assert torch.equal(ro.sample, x)
    assert ro.sample.dtype == torch.float64 and ro.num_steps == 7
    assert not ro.sample.requires_grad


def test_low_precision_model_gets_fp32_state():
    sig = fb.flow_sigmas(4)
    net = torch.nn.Linear(3, 3).to(torch.bfloat16)
    x0 = torch.randn(2, 3)
    ro = fb.rollout(lambda x, i: net(x), x0, sig, latent_dtype=torch.bfloat16)
    assert ro.sample.dtype == torch.float32
    assert ro.latents[1].dtype == torch.bfloat16
    assert ro.velocities[1].dtype == torch.float32
    ref = x0 + float(sig[1] - sig[0]) * ro.velocity(0)  # the state stays fp32; only the cache is bf16
    torch.testing.assert_close(ro.latent(1), ref.to(torch.bfloat16).float())


def test_rollout_errors():
    sig = fb.flow_sigmas(3)
    with pytest.raises(ValueError, match="velocity_fn must return a tensor of shape"):
        fb.rollout(lambda x, i: x[:, :1], torch.randn(2, 3), sig)
    with pytest.raises(ValueError, match="strictly decreasing"):
        fb.rollout(lambda x, i: x, torch.randn(2, 3), sig.flip(0))
    with pytest.raises(ValueError, match="batch dimension"):
        fb.rollout(lambda x, i: x, torch.randn(3), sig)
    with pytest.raises(FloatingPointError):
        fb.rollout(lambda x, i: x * float("inf"), torch.randn(2, 3), sig)
