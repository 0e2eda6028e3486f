"""Data of the CPU miniature: scikit-learn's handwritten digits as 16x16 images in [-1, 1].

The 1,797 8x8 digits (values 0..16, shipped inside scikit-learn, no download) are scaled to [-1, 1] and
resized bilinearly to 16x16. The fixed split puts even dataset indices in half A (reward classifier,
pretraining) and odd ones in half B (judge); sklearn's ordering cycles through the classes, so both
halves are balanced (about 90 images per digit each). The prompts are ``flowbp_train.digits``'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flowbp_train.digits import IMAGE_SIZE


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
