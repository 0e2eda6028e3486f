"""Data of the CPU miniature: scikit-learn's handwritten digits as 16x16 images in [-1, 1], with prompts.

The 1,797 8x8 digits (values 0..16, shipped inside scikit-learn, no download) are scaled to [-1, 1] and
resized bilinearly to 16x16. Prompts are "a handwritten digit <word>" plus a few paraphrases; the null
prompt "" is the negative branch of classifier-free guidance. The fixed split puts even dataset indices
in half A (reward classifier, pretraining) and odd ones in half B (judge); sklearn's ordering cycles
through the classes, so both halves are balanced (about 90 images per digit each).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: Templates of the prompts; the first is the canonical one used for evaluation grids and recipes.
TEMPLATES = ("a handwritten digit {}", "the handwritten digit {}", "a drawn number {}", "digit {}")
NULL_PROMPT = ""


def prompt_for(digit: int, template: int = 0) -> str:
    """The prompt of ``digit`` (0-9) with template index ``template`` (0 is canonical)."""
    if not isinstance(digit, int) or not 0 <= digit < NUM_CLASSES:
        raise ValueError(f"digit must be an integer in 0..9, got {digit!r}")
    if not isinstance(template, int) or not 0 <= template < len(TEMPLATES):
        raise ValueError(f"template must be an integer in 0..{len(TEMPLATES) - 1}, got {template!r}")
    return TEMPLATES[template].format(WORDS[digit])


def canonical_prompts() -> list[str]:
    """The ten canonical prompts, digit 0 to 9."""
    return [prompt_for(d) for d in range(NUM_CLASSES)]


def all_prompts() -> list[str]:
    """Every prompt (all templates, all digits)."""
    return [prompt_for(d, t) for t in range(len(TEMPLATES)) for d in range(NUM_CLASSES)]


def digit_of_prompt(prompt: str) -> int:
    """The digit a prompt asks for: its last word must be one of :data:`WORDS`."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    words = prompt.strip().lower().split()
    if not words or words[-1] not in WORDS:
        raise ValueError(f"prompt must end with a digit word ({', '.join(WORDS)}), got {prompt!r}")
    return WORDS.index(words[-1])


def digits_of_prompts(prompts) -> torch.Tensor:
    """``[B]`` long tensor of the digits the prompts ask for."""
    return torch.tensor([digit_of_prompt(p) for p in prompts], dtype=torch.long)


@dataclass
class DigitData:
    """Images ``[M, 1, 16, 16]`` float32 in [-1, 1] and labels ``[M]`` long."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.numel()


def to_16(x8: torch.Tensor) -> torch.Tensor:
    """``[M, 1, 8, 8]`` in [-1, 1] -> ``[M, 1, 16, 16]`` (bilinear, align_corners=False)."""
    return F.interpolate(x8, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)


def load_digits(half: str = "all") -> DigitData:
    """The digits at 16x16 in [-1, 1]; ``half`` is ``"A"`` (even indices), ``"B"`` (odd) or ``"all"``."""
    if half not in ("A", "B", "all"):
        raise ValueError(f"half must be 'A', 'B' or 'all', got {half!r}")
    from sklearn.datasets import load_digits as _sk_digits

    ds = _sk_digits()
    x8 = torch.tensor(ds.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # 0..16 -> [-1, 1]
    y = torch.tensor(ds.target, dtype=torch.long)
    if half != "all":
        idx = torch.arange(y.numel())
        keep = idx % 2 == (0 if half == "A" else 1)
        x8, y = x8[keep], y[keep]
    return DigitData(to_16(x8), y)
