"""Fixtures of the trainer tests: torch reference ops, the suite's thread count, a tiny differentiable reward."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from _tolerance import TEST_THREADS

sys.path.insert(0, os.path.dirname(__file__))  # tiny.py


@pytest.fixture(autouse=True)
def _quiet_and_reference(monkeypatch):
    # the trainer is under test here, not the kernels: use the torch reference ops (no JIT builds)
    monkeypatch.setenv("FLOWBP_BACKEND", "torch")
    monkeypatch.setenv("FLOWBP_JIT", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(threads)


from tiny import PixelReward  # noqa: E402


@pytest.fixture
def reward():
    return PixelReward()
