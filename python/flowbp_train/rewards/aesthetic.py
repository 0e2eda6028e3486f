"""LAION aesthetic predictor v2 (improved-aesthetic-predictor, "sac+logos+ava1-l14-linearMSE").

Score = MLP(normalize(CLIP ViT-L/14 image embedding)), prompt ignored. The MLP is the published
linear-MSE one: 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropout and no activations (so it is affine in
eval mode). CLIP weights: ``openai/clip-vit-large-patch14`` (transformers, the same weights as the OpenAI
``clip`` package the predictor was trained with); preprocessing as the ``clip`` package (torchvision
``Resize(224)`` + ``CenterCrop``). The MLP file comes from github.com/christophschuhmann/improved-aesthetic-predictor.
"""

from __future__ import annotations

import os

import torch

from ._hfclip import HFCLIPReward, check_clip, load_clip
from ._weights import check_file, resolve_file
from .clipscore import CLIP_L14
from .preprocess import openclip_preprocess

AESTHETIC_MLP_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_MLP_SOURCE = "https://github.com/christophschuhmann/improved-aesthetic-predictor"


class AestheticMLP(torch.nn.Module):
    """The predictor's MLP; parameter names match the published state dict (``layers.{0,2,4,6,7}.*``)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, input_size]`` -> ``[B, 1]``."""
        return self.layers(x)


class AestheticReward(HFCLIPReward):
    """LAION aesthetic score (roughly 1-10).

    Args:
        mlp_path: the ``sac+logos+ava1-l14-linearMSE.pth`` file (or its directory). Required unless ``mlp``.
        clip_path: directory or hub id of CLIP ViT-L/14 (default ``openai/clip-vit-large-patch14``).
        model, tokenizer, mlp: prebuilt modules instead of loading (tests); the tokenizer is unused.
        device, dtype, allow_download: as in ``PickScoreReward``.
    """

    name = "aesthetic"
    differentiable = True

    @classmethod
    def check_files(cls, *, key_prefix: str = "", mlp_path: str | os.PathLike | None = None,
                    clip_path: str | os.PathLike = CLIP_L14, model: torch.nn.Module | None = None,
                    mlp: torch.nn.Module | None = None, allow_download: bool = False, **_other) -> None:
        """The MLP file and the CLIP ViT-L/14 folder; see ``Reward.check_files``."""
        if mlp is None:
            check_file(mlp_path, what="LAION aesthetic predictor", option=f"{key_prefix}mlp_path", repo_id=None,
                       filename=AESTHETIC_MLP_FILE, source=AESTHETIC_MLP_SOURCE)
        if model is None:
            check_clip(clip_path, None, what="LAION aesthetic predictor (CLIP ViT-L/14)",
                       model_option=f"{key_prefix}clip_path", tokenizer_option=f"{key_prefix}clip_path",
                       allow_download=allow_download)

    def __init__(self, mlp_path: str | os.PathLike | None = None, clip_path: str | os.PathLike = CLIP_L14, *,
                 model: torch.nn.Module | None = None, tokenizer=None, mlp: torch.nn.Module | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 allow_download: bool = False) -> None:
        if mlp is None:
            path = resolve_file(mlp_path, what="LAION aesthetic predictor", option="mlp_path", repo_id=None,
                                filename=AESTHETIC_MLP_FILE, source=AESTHETIC_MLP_SOURCE)
            mlp = AestheticMLP()
            mlp.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        if model is None:
            model, tokenizer = load_clip(clip_path, None, what="LAION aesthetic predictor (CLIP ViT-L/14)",
                                         model_option="clip_path", tokenizer_option="clip_path",
                                         allow_download=allow_download)
        if tokenizer is None:
            tokenizer = _no_tokenizer
        super().__init__(model, tokenizer, openclip_preprocess(model.config.vision_config.image_size),
                         device=device, dtype=dtype)
        self.mlp = mlp.to(device=device, dtype=torch.float32)
        self.freeze()

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.mlp(self.image_embeds(images)).squeeze(-1)


def _no_tokenizer(*args, **kwargs):
    raise RuntimeError("the aesthetic predictor does not use text")
