"""One differentiable image preprocessing for every reward: resize (antialiased), crop or pad, normalise.

Works on float tensors ``[B, 3, H, W]`` in [0, 1] and keeps the graph to the image. Bicubic resizing with
``antialias=True`` is torch's port of PIL's separable filter (Keys cubic a = -0.5, support widened by the
downscale factor), so it reproduces the PIL paths of the reference processors up to PIL's uint8 rounding;
the parity is measured in ``tests/train/rewards/test_preprocess.py``. Output sizes and crop offsets follow each
reference exactly (truncation vs rounding, ``//2`` vs torchvision's round-half-even), see the presets.
Limit: the two 1-D passes run width first (Pillow <= 12); Pillow 13 picks the order itself, which moves
clipped cubic overshoot at hard edges by a few levels of 255.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ImagePreprocess",
    "PreprocessConfig",
    "clip_preprocess",
    "hpsv2_preprocess",
    "imagereward_preprocess",
    "openclip_preprocess",
]

# The normalisation of OpenAI CLIP, reused by OpenCLIP ViT-H-14 (HPSv2, PickScore) and BLIP (ImageReward).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_MODES = ("shortest_crop", "longest_pad", "squash")
_ROUNDINGS = ("floor", "round")
_OFFSETS = ("floor", "round_half_even")


@dataclass(frozen=True)
class PreprocessConfig:
    """What a reference processor does, as data.

    Attributes:
        size: output side (square).
        mode: ``"shortest_crop"`` (shortest side to ``size``, center crop; CLIP), ``"longest_pad"``
            (longest side to ``size``, pad to square with ``fill``; HPSv2) or ``"squash"`` (both sides to
            ``size``).
        resize_rounding: how the other side's length is rounded: ``"floor"`` (``int(...)``, transformers
            and torchvision) or ``"round"`` (Python ``round``, open_clip ``ResizeKeepRatio`` / HPSv2).
        crop_offset: center-crop offset ``diff // 2`` (``"floor"``, transformers) or
            ``round(diff / 2)`` (``"round_half_even"``, torchvision ``CenterCrop``).
        mean, std: per-channel normalisation after rescaling to [0, 1].
        fill: pad value in [0, 1] pixel space (before normalisation).
        clamp: clamp each resize pass to [0, 1] as PIL's uint8 passes do (cubic overshoot at edges).
    """

    size: int = 224
    mode: str = "shortest_crop"
    resize_rounding: str = "floor"
    crop_offset: str = "floor"
    mean: Sequence[float] = OPENAI_CLIP_MEAN
    std: Sequence[float] = OPENAI_CLIP_STD
    fill: float = 0.0
    clamp: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size: expected a positive int, got {self.size!r}")
        if self.mode not in _MODES:
            raise ValueError(f"mode: expected one of {_MODES}, got {self.mode!r}")
        if self.resize_rounding not in _ROUNDINGS:
            raise ValueError(f"resize_rounding: expected one of {_ROUNDINGS}, got {self.resize_rounding!r}")
        if self.crop_offset not in _OFFSETS:
            raise ValueError(f"crop_offset: expected one of {_OFFSETS}, got {self.crop_offset!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"mean/std: expected 3 values each, std > 0, got {self.mean!r}, {self.std!r}")


def _scaled(length: int, ratio: float, rounding: str) -> int:
    return max(1, int(length * ratio) if rounding == "floor" else round(length * ratio))


class ImagePreprocess(torch.nn.Module):
    """Differentiable ``[B, 3, H, W]`` in [0, 1] -> normalised ``[B, 3, size, size]`` float32 (float64 in,
    float64 out).

    Args:
        config: a ``PreprocessConfig`` (or pass its fields as keyword arguments).
    """

    def __init__(self, config: PreprocessConfig | None = None, **kwargs) -> None:
        super().__init__()
        if config is not None and kwargs:
            raise ValueError("config: pass either a PreprocessConfig or its fields as keywords, not both")
        self.config = config if config is not None else PreprocessConfig(**kwargs)
        self.register_buffer("mean", torch.tensor(self.config.mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(self.config.std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) after the resize step, as the reference computes it."""
        c = self.config
        if c.mode == "squash":
            return c.size, c.size
        if c.mode == "shortest_crop":
            if height <= width:
                return c.size, _scaled(width, c.size / height, c.resize_rounding)
            return _scaled(height, c.size / width, c.resize_rounding), c.size
        scale = c.size / max(height, width)
        return min(c.size, _scaled(height, scale, "round")), min(c.size, _scaled(width, scale, "round"))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocess ``images`` (float ``[B, 3, H, W]`` in [0, 1]); differentiable."""
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError("images: expected a floating torch.Tensor [B, 3, H, W] in [0, 1]")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected shape [B, 3, H, W], got {tuple(images.shape)}")
        c = self.config
        x = images if images.dtype == torch.float64 else images.float()  # float64 kept for gradcheck
        h, w = x.shape[-2:]
        nh, nw = self.resized_shape(h, w)
        # Two separable passes, width first, clamped in between: PIL's order and its uint8 clipping of the
        # intermediate image (one joint 2-D pass differs from PIL by up to ~6/255 at hard edges).
        if nw != w:
            x = self._resize(x, h, nw)
        if nh != h:
            x = self._resize(x, nh, nw)
        if c.mode == "shortest_crop":
            top, left = (self._offset(nh - c.size), self._offset(nw - c.size))
            x = x[:, :, top:top + c.size, left:left + c.size]
        elif c.mode == "longest_pad":
            ph, pw = c.size - nh, c.size - nw
            if ph or pw:
                x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=c.fill)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def _resize(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        return x.clamp(0.0, 1.0) if self.config.clamp else x

    def _offset(self, diff: int) -> int:
        return diff // 2 if self.config.crop_offset == "floor" else int(round(diff / 2.0))

    def extra_repr(self) -> str:
        return repr(self.config)


def clip_preprocess(size: int = 224) -> ImagePreprocess:
    """transformers ``CLIPImageProcessor`` (PickScore, CLIPScore, aesthetic): shortest side to ``size``
    (bicubic, other side truncated), center crop (offset ``diff // 2``), OpenAI CLIP statistics."""
    return ImagePreprocess(PreprocessConfig(size=size, mode="shortest_crop", resize_rounding="floor",
                                            crop_offset="floor"))


def openclip_preprocess(size: int = 224) -> ImagePreprocess:
    """open_clip / OpenAI ``clip`` eval transform (torchvision ``Resize(size)`` + ``CenterCrop``)."""
    return ImagePreprocess(PreprocessConfig(size=size, mode="shortest_crop", resize_rounding="floor",
                                            crop_offset="round_half_even"))


def hpsv2_preprocess(size: int = 224) -> ImagePreprocess:
    """HPSv2's eval transform (open_clip ``resize_mode="longest"``): longest side to ``size`` (bicubic,
    rounded), pad to square with black (left/top get ``pad // 2``), OpenAI CLIP statistics."""
    return ImagePreprocess(PreprocessConfig(size=size, mode="longest_pad", resize_rounding="round", fill=0.0))


def imagereward_preprocess(size: int = 224) -> ImagePreprocess:
    """ImageReward's transform (torchvision ``Resize(size)`` bicubic + ``CenterCrop``, CLIP statistics):
    the same as ``openclip_preprocess``."""
    return openclip_preprocess(size)
