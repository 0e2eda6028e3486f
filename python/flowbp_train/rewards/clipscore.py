"""CLIPScore (Hessel et al., 2021): ``w * max(cos(image, text), 0)`` with ``w = 2.5``.

Weights: ``openai/clip-vit-large-patch14`` (transformers ``CLIPModel``; the paper used ViT-B/32, text-to-image
evaluations since use ViT-L/14). The prompt is scored as given: the paper's caption prefix
"A photo depicts" is available as ``prefix`` but off by default (prompts are not captions; torchmetrics does
the same). ``max(., 0)`` has zero gradient for the rare negative cosine.
"""

from __future__ import annotations

import os

import torch

from ._hfclip import HFCLIPReward, check_clip, load_clip
from .preprocess import clip_preprocess

CLIP_L14 = "openai/clip-vit-large-patch14"
CLIPSCORE_W = 2.5  # the CLIPScore paper's rescaling constant


class CLIPScoreReward(HFCLIPReward):
    """CLIPScore.

    Args:
        model_path: directory or hub id of the CLIP model (default ``openai/clip-vit-large-patch14``).
        w: the rescaling constant (2.5 in the paper).
        prefix: text prepended to every prompt (``"A photo depicts "`` reproduces the paper's captions).
        model, tokenizer: an already-built ``CLIPModel`` and tokenizer instead of loading (tests).
        device, dtype, allow_download: as in ``PickScoreReward``.
    """

    name = "clipscore"
    differentiable = True

    @classmethod
    def check_files(cls, *, key_prefix: str = "", model_path: str | os.PathLike = CLIP_L14,
                    model: torch.nn.Module | None = None, allow_download: bool = False, **_other) -> None:
        """The CLIP folder with its tokenizer (or its HF cache copy); see ``Reward.check_files``."""
        if model is None:
            check_clip(model_path, None, what="CLIPScore", model_option=f"{key_prefix}model_path",
                       tokenizer_option=f"{key_prefix}model_path", allow_download=allow_download)

    def __init__(self, model_path: str | os.PathLike = CLIP_L14, *, w: float = CLIPSCORE_W, prefix: str = "",
                 model: torch.nn.Module | None = None, tokenizer=None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, allow_download: bool = False) -> None:
        if (model is None) != (tokenizer is None):
            raise ValueError("model, tokenizer: pass both (prebuilt) or neither (load from model_path)")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix: expected a str, got {type(prefix).__name__}")
        if model is None:
            model, tokenizer = load_clip(model_path, None, what="CLIPScore", model_option="model_path",
                                         tokenizer_option="model_path", allow_download=allow_download)
        super().__init__(model, tokenizer, clip_preprocess(model.config.vision_config.image_size),
                         device=device, dtype=dtype)
        self.w = float(w)
        self.prefix = prefix

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        text = self.text_embeds([self.prefix + p for p in prompts])
        return self.w * (self.image_embeds(images) * text).sum(-1).clamp_min(0.0)
