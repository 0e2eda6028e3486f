"""Real-looking test images: smooth colour gradients, filled shapes with hard edges, and sensor-like noise.

Deterministic in ``seed``; returned as uint8 ``[H, W, 3]`` so the tensor path and the PIL path start from
bit-identical pixels.
"""

from __future__ import annotations

import numpy as np


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A uint8 RGB image of shape ``[height, width, 3]``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    img = np.stack([0.2 + 0.6 * xx, 0.3 + 0.5 * yy, 0.5 + 0.4 * np.sin(3 * xx + 2 * yy)], axis=-1)
    for _ in range(6):  # discs and rectangles with hard edges (where resize filters differ most)
        color = rng.uniform(0, 1, 3)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        r = rng.uniform(0.05, 0.3) * min(height, width)
        if rng.uniform() < 0.5:
            mask = (yy * (height - 1) - cy) ** 2 + (xx * (width - 1) - cx) ** 2 < r**2
        else:
            mask = (np.abs(yy * (height - 1) - cy) < r) & (np.abs(xx * (width - 1) - cx) < 0.7 * r)
        img[mask] = color
    img = img + rng.normal(0, 0.03, img.shape)
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def to_tensor(images: list[np.ndarray]):
    """Stack same-size uint8 HWC images into a float tensor [B, 3, H, W] in [0, 1]."""
    import torch

    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).double().div(255).float()
