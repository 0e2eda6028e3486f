"""Fixtures of the trainer tests (the backend and thread policy is tests/conftest.py's): the miniature's
reward CNN and held-out judge, loaded once (``digit_reward``, ``digit_judge``; the rewards' and the
miniature's tests use them)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def digit_reward():
    pytest.importorskip("safetensors", reason="the miniature's weights are safetensors")
    from flowbp_train.rewards.mini import DigitReward

    return DigitReward()


@pytest.fixture(scope="session")
def digit_judge():
    pytest.importorskip("sklearn", reason="the miniature's judge is checked against scikit-learn")
    from flowbp_train.rewards.mini import DigitJudge

    return DigitJudge()
