"""Fixtures of the engine tests: a tiny float64 velocity model, its rollout and a reward."""

from __future__ import annotations

import pytest
import torch

import flowbp_kernels as fb

from helpers.engine import TinyReward, TinyVelocity


@pytest.fixture
def setup():
    torch.manual_seed(0)
    n = 10
    sig = fb.flow_sigmas(n, shift=3.0)
    net = TinyVelocity(sig)
    x0 = torch.randn(3, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ro = fb.rollout(net, x0, sig)
    return net, ro, TinyReward(), sig
