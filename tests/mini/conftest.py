"""Shared fixtures of the miniature tests: the suite's thread count (tests/_tolerance.py), loaded once."""

from __future__ import annotations

import pytest
import torch
from _tolerance import TEST_THREADS

pytest.importorskip("diffusers", reason="the miniature needs diffusers")
pytest.importorskip("sklearn", reason="the miniature's data ships with scikit-learn")
pytest.importorskip("safetensors", reason="the miniature's weights are safetensors")
pytest.importorskip("peft", reason="the miniature's LoRA uses peft")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def reward():
    from flowbp_train.rewards.mini import DigitReward

    return DigitReward()


@pytest.fixture(scope="session")
def judge():
    from flowbp_train.rewards.mini import DigitJudge

    return DigitJudge()
