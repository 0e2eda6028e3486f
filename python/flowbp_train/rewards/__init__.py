"""Rewards: one interface (``Reward.score(images, prompts) -> Tensor[B]``), a registry and a weighted sum.

Built-in rewards (HPSv2.1, PickScore, ImageReward, LAION aesthetic, CLIPScore) are registered as lazy
factories: their modules, and heavy packages such as open_clip, are imported only when built with
``get_reward(name, ...)``. Other modules register with ``register_reward(name, factory)``; a name not
registered is imported as ``flowbp_train.rewards.<name>`` first (``mini.py`` registers itself so).
"""

from __future__ import annotations

import importlib

from .base import (
    Reward,
    WeightedSum,
    available_rewards,
    check_reward_files,
    check_score_inputs,
    get_reward,
    register_reward,
)

__all__ = [
    "Reward",
    "WeightedSum",
    "available_rewards",
    "check_reward_files",
    "check_score_inputs",
    "get_reward",
    "register_reward",
]

_BUILTINS = {
    "hpsv2": ("hpsv2", "HPSv2Reward"),
    "pickscore": ("pickscore", "PickScoreReward"),
    "imagereward": ("imagereward", "ImageRewardReward"),
    "aesthetic": ("aesthetic", "AestheticReward"),
    "clipscore": ("clipscore", "CLIPScoreReward"),
}


def _lazy_factory(module: str, cls: str):
    def reward_class():
        return getattr(importlib.import_module(f"{__name__}.{module}"), cls)

    def factory(**kwargs) -> Reward:
        return reward_class()(**kwargs)

    factory.check_files = lambda **kwargs: reward_class().check_files(**kwargs)  # the module is light
    factory.__name__ = f"build_{module}"
    factory.lazy_target = (module, cls)  # what it builds, for checking reward_kwargs before any import
    factory.__doc__ = f"Build ``flowbp_train.rewards.{module}.{cls}(**kwargs)`` (imported on first use)."
    return factory


for _name, (_module, _cls) in _BUILTINS.items():
    register_reward(_name, _lazy_factory(_module, _cls))
del _name, _module, _cls
