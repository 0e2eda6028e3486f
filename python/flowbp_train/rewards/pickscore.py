"""PickScore (Kirstain et al., 2023, "Pick-a-Pic"): ``logit_scale.exp() * cos(image, text)``.

Weights: the CLIP-H model ``yuvalkirstain/PickScore_v1`` (fine-tuned from laion/CLIP-ViT-H-14-laion2B-s32B-b79K)
with the processor (tokenizer and image statistics) of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, as in the
authors' example. Image preprocessing: transformers ``CLIPImageProcessor`` (shortest side 224 bicubic,
center crop, OpenAI statistics), done on tensors by ``clip_preprocess``. Typical values ~ 18-23.
"""

from __future__ import annotations

import os

import torch

from ._hfclip import HFCLIPReward, check_clip, load_clip
from .preprocess import clip_preprocess

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScoreReward(HFCLIPReward):
    """PickScore.

    Args:
        model_path: directory or hub id of the PickScore ``CLIPModel`` (default ``yuvalkirstain/PickScore_v1``,
            looked up in the HF cache only unless ``allow_download``).
        processor_path: directory or hub id holding the CLIP-H tokenizer (default
            ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
        model, tokenizer: an already-built ``CLIPModel`` and tokenizer instead of loading (tests).
        device, dtype: where and in which dtype the model runs.
        allow_download: allow fetching from the Hugging Face Hub.
    """

    name = "pickscore"
    differentiable = True

    @classmethod
    def check_files(cls, *, key_prefix: str = "", model_path: str | os.PathLike = PICKSCORE_MODEL,
                    processor_path: str | os.PathLike = PICKSCORE_PROCESSOR, model: torch.nn.Module | None = None,
                    allow_download: bool = False, **_other) -> None:
        """The model and tokenizer folders (or their HF cache copies); see ``Reward.check_files``."""
        if model is None:
            check_clip(model_path, processor_path, what="PickScore", model_option=f"{key_prefix}model_path",
                       tokenizer_option=f"{key_prefix}processor_path", allow_download=allow_download)

    def __init__(self, model_path: str | os.PathLike = PICKSCORE_MODEL,
                 processor_path: str | os.PathLike = PICKSCORE_PROCESSOR, *, model: torch.nn.Module | None = None,
                 tokenizer=None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 allow_download: bool = False) -> None:
        if (model is None) != (tokenizer is None):
            raise ValueError("model, tokenizer: pass both (prebuilt) or neither (load from model_path)")
        if model is None:
            model, tokenizer = load_clip(model_path, processor_path, what="PickScore", model_option="model_path",
                                         tokenizer_option="processor_path", allow_download=allow_download)
        super().__init__(model, tokenizer, clip_preprocess(model.config.vision_config.image_size),
                         device=device, dtype=dtype)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cos = (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
        return self.model.logit_scale.float().exp() * cos
