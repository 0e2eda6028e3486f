"""ImageReward (Xu et al., 2023): a BLIP image-grounded text encoder, an MLP head, fixed normalisation.

Score = ``(MLP(text_encoder(prompt | image)[:, 0]) - 0.16717362830052426) / 1.0333394966054072`` (the model's
``mean``/``std``). Weights: ``ImageReward.pt`` and ``med_config.json`` from the hub repo ``THUDM/ImageReward``;
the BLIP architecture and its ``bert-base-uncased`` tokenizer come from the optional ``image-reward`` package
(pip install image-reward; it pins old timm/fairscale and needs torchvision). Preprocessing: torchvision
``Resize(224)`` bicubic + ``CenterCrop(224)``, CLIP statistics. The text cross-attends to the image, so only
the tokenisation is cached per prompt.
"""

from __future__ import annotations

import os

import torch

from ._weights import check_file, check_module, hf_offline, resolve_file
from .base import Reward, resolve_dtype
from .preprocess import imagereward_preprocess

IMAGEREWARD_REPO = "THUDM/ImageReward"
IMAGEREWARD_MAX_TOKENS = 35  # the package's tokenizer max_length


def _import_image_reward():
    try:
        from ImageReward.ImageReward import ImageReward as _ImageRewardModel
    except ImportError as e:
        raise ImportError("ImageReward needs the optional package image-reward: pip install image-reward "
                          "(with torchvision, timm and fairscale)") from e
    return _ImageRewardModel


class ImageRewardReward(Reward):
    """ImageReward-v1.0.

    Args:
        checkpoint_path: ``ImageReward.pt`` (or its directory); default the HF cache copy of ``THUDM/ImageReward``.
        med_config_path: ``med_config.json`` (or its directory); default next to the checkpoint, else the cache.
        model: a prebuilt model with ``blip.visual_encoder``, ``blip.text_encoder``, ``blip.tokenizer``, ``mlp``,
            ``mean`` and ``std`` (the package's ``ImageReward`` class, or a tiny stand-in in tests).
        device, dtype: where and in which dtype the model runs (scores are float32).
        allow_download: allow fetching files (and the BERT tokenizer) from the Hugging Face Hub.
    """

    name = "imagereward"
    differentiable = True

    @classmethod
    def check_files(cls, *, key_prefix: str = "", checkpoint_path: str | os.PathLike | None = None,
                    med_config_path: str | os.PathLike | None = None, model: torch.nn.Module | None = None,
                    allow_download: bool = False, **_other) -> None:
        """``ImageReward.pt``, ``med_config.json`` and the image-reward package; see ``Reward.check_files``."""
        if model is not None:
            return
        from pathlib import Path

        source = f"https://huggingface.co/{IMAGEREWARD_REPO}"
        check_file(checkpoint_path, what="ImageReward", option=f"{key_prefix}checkpoint_path",
                   repo_id=IMAGEREWARD_REPO, filename="ImageReward.pt", source=source, allow_download=allow_download)
        if med_config_path is None and checkpoint_path is not None:
            beside = Path(checkpoint_path).expanduser()
            beside = beside if beside.is_dir() else beside.parent
            med_config_path = beside if (beside / "med_config.json").is_file() else None
        check_file(med_config_path, what="ImageReward", option=f"{key_prefix}med_config_path",
                   repo_id=IMAGEREWARD_REPO, filename="med_config.json", source=source, allow_download=allow_download)
        check_module("ImageReward", "ImageReward needs the optional package image-reward: pip install image-reward "
                     "(with torchvision, timm and fairscale)")

    def __init__(self, checkpoint_path: str | os.PathLike | None = None,
                 med_config_path: str | os.PathLike | None = None, *, model: torch.nn.Module | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 allow_download: bool = False) -> None:
        super().__init__()
        dtype = resolve_dtype(dtype)
        if model is None:
            source = f"https://huggingface.co/{IMAGEREWARD_REPO}"
            ckpt = resolve_file(checkpoint_path, what="ImageReward", option="checkpoint_path",
                                repo_id=IMAGEREWARD_REPO, filename="ImageReward.pt", source=source,
                                allow_download=allow_download)
            if med_config_path is None and (ckpt.parent / "med_config.json").is_file():
                med_config_path = ckpt.parent
            med = resolve_file(med_config_path, what="ImageReward", option="med_config_path",
                               repo_id=IMAGEREWARD_REPO, filename="med_config.json", source=source,
                               allow_download=allow_download)
            model_cls = _import_image_reward()
            with hf_offline(not allow_download):  # the package loads bert-base-uncased's tokenizer by name
                model = model_cls(med_config=str(med), device=str(device))
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            missing, _ = model.load_state_dict(state, strict=False)
            if missing:
                raise RuntimeError(f"checkpoint_path: {str(ckpt)!r} lacks {len(missing)} weights, e.g. {missing[:3]}")
        for attr in ("blip", "mlp", "mean", "std"):
            if not hasattr(model, attr):
                raise TypeError(f"model: expected an ImageReward-like module with .{attr}")
        self.model = model.to(device=device, dtype=dtype)
        self.dtype = dtype
        self.mean, self.std = float(model.mean), float(model.std)
        self.preprocess = imagereward_preprocess(224).to(device)
        self.freeze()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _tokenize(self, prompts: list[str]) -> torch.Tensor:
        tok = self.model.blip.tokenizer(prompts, padding="max_length", truncation=True,
                                        max_length=IMAGEREWARD_MAX_TOKENS, return_tensors="pt")
        return torch.stack([tok["input_ids"], tok["attention_mask"]], dim=1)  # [n, 2, L]

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        tok = self.cached_text(prompts, self._tokenize).to(self.device)
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        image_embeds = self.model.blip.visual_encoder(pixels)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        out = self.model.blip.text_encoder(tok[:, 0], attention_mask=tok[:, 1], encoder_hidden_states=image_embeds,
                                           encoder_attention_mask=image_atts, return_dict=True)
        reward = self.model.mlp(out.last_hidden_state[:, 0, :].to(self.dtype)).float().squeeze(-1)
        return (reward - self.mean) / self.std
