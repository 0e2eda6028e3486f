"""Shared fixtures: the test process's thread count (tests/_tolerance.py), and for the engine tests a tiny
float64 model, its rollout and a reward."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels are tested on the CPU in the interpreter; the variable must be set before any module
# decorates a kernel (triton.jit reads it then), so here, before the first test module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _engine import TinyReward, TinyVelocity  # noqa: E402
from _tolerance import TEST_THREADS  # noqa: E402

import flowbp_kernels as fb  # noqa: E402


@pytest.fixture(autouse=True)
def _test_threads():
    # after collection, so modules that call torch.set_num_threads at import do not decide it
    torch.set_num_threads(TEST_THREADS)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    n = 10
    sig = fb.flow_sigmas(n, shift=3.0)
    net = TinyVelocity(sig)
    x0 = torch.randn(3, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ro = fb.rollout(net, x0, sig)
    return net, ro, TinyReward(), sig
