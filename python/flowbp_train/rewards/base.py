"""The reward interface, the reward registry and the weighted sum of rewards.

A reward maps images ``[B, 3, H, W]`` in [0, 1] (possibly requiring grad) and their prompts to one
score per image. Weights are frozen (``requires_grad=False``) and the module stays in eval mode even if
a parent calls ``.train()``. Text features are cached per prompt string. The registry maps names to
factories; a name not registered is looked up as the module ``flowbp_train.rewards.<name>``, which may
register itself on import (how ``mini.py`` plugs in without editing this file).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "Reward",
    "WeightedSum",
    "available_rewards",
    "check_reward_files",
    "check_score_inputs",
    "get_reward",
    "register_reward",
    "resolve_dtype",
]

#: dtype names a reward accepts from a YAML config (``reward_kwargs: {dtype: bf16}``)
DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
               "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype:
    """A floating ``torch.dtype``, or its name from a config (``"bf16"``, ``"fp32"``...); TypeError otherwise."""
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype or one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    return dtype


def check_score_inputs(images: torch.Tensor, prompts: Sequence[str]) -> None:
    """Raise TypeError/ValueError unless ``images`` is a float ``[B, 3, H, W]`` tensor and ``prompts``
    a list of B strings."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images: expected a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"images: expected a floating dtype (values in [0, 1]), got {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected shape [B, 3, H, W], got {tuple(images.shape)}")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"images: expected a non-empty batch, got shape {tuple(images.shape)}")
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts: expected a list of str, got {type(prompts).__name__}")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts: expected every element to be a str")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"prompts: expected {images.shape[0]} prompts (one per image), got {len(prompts)}")


class Reward(torch.nn.Module):
    """Base class of the rewards.

    Subclasses set ``name`` and ``differentiable`` and implement ``_score(images, prompts)`` on checked
    inputs; they call ``self.freeze()`` at the end of ``__init__`` and may use ``self.cached_text``
    to encode each distinct prompt once.

    Attributes:
        name: registry name (``"hpsv2"``, ``"pickscore"``...).
        differentiable: True when ``score`` is differentiable w.r.t. ``images``.
    """

    name: str = "reward"
    differentiable: bool = True

    def __init__(self) -> None:
        super().__init__()
        self._text_cache: dict[str, torch.Tensor] = {}

    # -- public -----------------------------------------------------------------------------------
    @classmethod
    def check_files(cls, *, key_prefix: str = "", **kwargs) -> None:
        """Check, without loading or downloading anything, that the files (and optional packages) the
        constructor needs with ``kwargs`` are there; raise FileNotFoundError / ImportError naming the
        option as ``key_prefix + option`` (``reward_kwargs.checkpoint_path``). Nothing to check by default."""
        return None

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Score a batch: ``images`` float ``[B, 3, H, W]`` in [0, 1], ``prompts`` B strings -> float32
        ``[B]``. Differentiable w.r.t. ``images`` when ``self.differentiable``."""
        check_score_inputs(images, prompts)
        out = self._score(images, list(prompts))
        if out.shape != (images.shape[0],):
            raise RuntimeError(f"{type(self).__name__}._score returned shape {tuple(out.shape)}, "
                               f"expected ({images.shape[0]},)")
        return out.float()

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Same as ``score``."""
        return self.score(images, prompts)

    def freeze(self) -> Reward:
        """Freeze every parameter and switch to eval mode (called by subclasses after loading)."""
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)
        return self

    def train(self, mode: bool = True) -> Reward:
        """Rewards stay in eval mode: ``train(True)`` is ignored (dropout / norm statistics frozen)."""
        return super().train(False)

    def clear_text_cache(self) -> None:
        """Forget the cached text features (e.g. after moving the module to another device)."""
        self._text_cache.clear()

    # -- for subclasses ---------------------------------------------------------------------------
    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def cached_text(self, prompts: Sequence[str], encode: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        """Features of ``prompts`` stacked ``[B, ...]``: each distinct prompt not yet cached is encoded
        once by ``encode(list_of_new_prompts) -> [n, ...]`` without grad, then reused."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if new:
            with torch.no_grad():
                feats = encode(new)
            for p, f in zip(new, feats, strict=True):
                self._text_cache[p] = f.detach()
        return torch.stack([self._text_cache[p] for p in prompts])

    def extra_repr(self) -> str:
        return f"name={self.name!r}, differentiable={self.differentiable}"


class WeightedSum(Reward):
    """``sum_k w_k * (r_k - mean_k) / std_k`` over several rewards.

    Args:
        rewards: the rewards (``Reward`` instances), or a dict name -> reward.
        weights: one weight per reward (default 1.0 each).
        normalization: per reward a ``(mean, std)`` pair of constants (default ``(0.0, 1.0)``), e.g. the
            mean and std of the base model's scores on a prompt set, so rewards on different scales add.
    """

    name = "weighted_sum"

    def __init__(self, rewards: Sequence[Reward] | dict[str, Reward], weights: Sequence[float] | None = None,
                 normalization: Sequence[tuple[float, float]] | None = None) -> None:
        super().__init__()
        items = list(rewards.values()) if isinstance(rewards, dict) else list(rewards)
        if not items:
            raise ValueError("rewards: expected at least one Reward")
        for r in items:
            if not isinstance(r, Reward):
                raise TypeError(f"rewards: expected Reward instances, got {type(r).__name__}")
        n = len(items)
        weights = [1.0] * n if weights is None else [float(w) for w in weights]
        if len(weights) != n:
            raise ValueError(f"weights: expected {n} values (one per reward), got {len(weights)}")
        normalization = [(0.0, 1.0)] * n if normalization is None else [tuple(map(float, m)) for m in normalization]
        if len(normalization) != n or any(len(m) != 2 for m in normalization):
            raise ValueError(f"normalization: expected {n} (mean, std) pairs, got {normalization!r}")
        if any(not (s > 0) for _, s in normalization):
            raise ValueError(f"normalization: every std must be > 0, got {normalization!r}")
        self.rewards = torch.nn.ModuleList(items)
        self.weights = weights
        self.normalization = normalization
        self.differentiable = all(r.differentiable for r in items)
        self.freeze()

    def components(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each reward's raw score ``[B]``, keyed by its name (suffixed ``_k`` on repeats)."""
        out: dict[str, torch.Tensor] = {}
        for k, r in enumerate(self.rewards):
            key = r.name if r.name not in out else f"{r.name}_{k}"
            out[key] = r.score(images, prompts)
        return out

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        total = None
        for r, w, (m, s) in zip(self.rewards, self.weights, self.normalization, strict=True):
            term = w * (r.score(images, prompts) - m) / s
            total = term if total is None else total + term
        return total


# -- registry ---------------------------------------------------------------------------------------
RewardFactory = Callable[..., Reward]
_REGISTRY: dict[str, RewardFactory] = {}


def register_reward(name: str, factory: RewardFactory, *, overwrite: bool = False) -> None:
    """Register ``factory(**kwargs) -> Reward`` under ``name`` (a class works as a factory)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty str, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory: expected a callable returning a Reward, got {type(factory).__name__}")
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not factory:
        raise ValueError(f"name: reward {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = factory


def available_rewards() -> list[str]:
    """Names registered so far (built-ins plus any registered by imported modules)."""
    return sorted(_REGISTRY)


def get_reward(name: str, **kwargs) -> Reward:
    """Build the reward registered as ``name`` with ``kwargs`` (e.g. ``local_path=...``, ``device=...``).

    A name not yet registered is imported as ``flowbp_train.rewards.<name>``, then as the module named by
    its part before the first ``_`` (``mini_judge`` -> ``mini``), which may register it, before giving up.
    """
    reward = _factory(name)(**kwargs)
    if not isinstance(reward, Reward):
        raise TypeError(f"reward factory {name!r} returned {type(reward).__name__}, expected a Reward")
    return reward


def check_reward_files(name: str, *, key_prefix: str = "", **kwargs) -> None:
    """Check that reward ``name`` is known and that the files it would load with ``kwargs`` exist, without
    building it (its ``check_files``; a factory may carry one as ``factory.check_files``)."""
    factory = _factory(name)
    check = getattr(factory, "check_files", None)
    if callable(check):
        check(key_prefix=key_prefix, **kwargs)


def _factory(name: str) -> RewardFactory:
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty reward name, got {name!r}")
    for module in dict.fromkeys([name, name.split("_")[0]]):  # "mini_judge" lives in mini.py
        if name in _REGISTRY or not module.isidentifier():
            break
        try:
            importlib.import_module(f"flowbp_train.rewards.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"flowbp_train.rewards.{module}":
                raise
    if name not in _REGISTRY:
        raise ValueError(f"name: unknown reward {name!r}; available: {available_rewards()}")
    return _REGISTRY[name]
