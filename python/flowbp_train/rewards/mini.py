"""The miniature's rewards: the digit reward (differentiable) and the held-out judge (not).

``mini`` (also ``mini_digit``): ``log p(prompt's digit | image)`` under the reward CNN trained on half A
of the digits. ``mini_judge`` (or ``get_reward("mini", kind="judge")``): 1.0 when the RBF SVC trained on
half B, looking at the image average-pooled to 8x8, recognises the prompt's digit, else 0.0 (its mean
over a batch is the judge accuracy). Both take images ``[B, 3, H, W]`` in [0, 1] (the miniature's
``decode``), average the channels and map to [-1, 1]; other sizes are resized to 16x16 (bilinear).
Weights are the committed, hash-checked files of ``flowbp_train/mini/weights``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flowbp_train.digits import IMAGE_SIZE, digits_of_prompts
from flowbp_train.rewards.base import Reward, register_reward
from flowbp_train.rewards.mini_nets import load_judge, load_reward_cnn


def to_digit_space(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> ``[B, 1, 16, 16]`` in [-1, 1] (channel mean; bilinear resize if needed)."""
    x = images.mean(1, keepdim=True) * 2 - 1
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x


class DigitReward(Reward):
    """``log p(digit | image)`` of the reward CNN; differentiable w.r.t. the images."""

    name = "mini"
    differentiable = True

    def __init__(self, weights_dir: str | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        self.net = load_reward_cnn(weights_dir).to(device)
        self.freeze()

    def log_probs(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 10]`` log-probabilities of the digits."""
        x = to_digit_space(images)
        return torch.log_softmax(self.net(x.to(next(self.net.parameters()).dtype)), dim=1)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        digits = digits_of_prompts(prompts).to(images.device)
        return self.log_probs(images).gather(1, digits[:, None]).squeeze(1)


class DigitJudge(Reward):
    """1.0 where the held-out SVC judge recognises the prompt's digit, else 0.0 (no gradient)."""

    name = "mini_judge"
    differentiable = False

    def __init__(self, weights_dir: str | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        self.judge = load_judge(weights_dir)
        self.freeze()

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """``[B]`` digits the judge sees."""
        return self.judge.predict(to_digit_space(images.detach().float().cpu()))

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        digits = digits_of_prompts(prompts)
        return (self.predict(images) == digits).float().to(images.device)


def build_mini(kind: str = "reward", weights_dir: str | None = None, device: str | torch.device = "cpu") -> Reward:
    """Factory of ``get_reward("mini", kind=...)``: ``"reward"`` (the CNN) or ``"judge"`` (the SVC)."""
    if kind == "reward":
        return DigitReward(weights_dir=weights_dir, device=device)
    if kind == "judge":
        return DigitJudge(weights_dir=weights_dir, device=device)
    raise ValueError(f"kind must be 'reward' or 'judge', got {kind!r}")


register_reward("mini", build_mini)
register_reward("mini_digit", DigitReward)
register_reward("mini_judge", DigitJudge)
