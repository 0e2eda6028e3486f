"""Shared pieces of the transformers-CLIP rewards (PickScore, CLIPScore, LAION aesthetic).

Embeddings are computed as ``CLIPModel`` defines them (projection of the pooled output of each tower), by
calling the towers directly so the code does not depend on what ``get_*_features`` returns in a given
transformers version. Text embeddings are cached per prompt; image embeddings keep the graph.
"""

from __future__ import annotations

import os

import torch

from ._weights import check_hf_dir, load_hf_pretrained
from .base import Reward, resolve_dtype
from .preprocess import ImagePreprocess

MAX_TEXT_TOKENS = 77  # CLIP's context length


def load_clip(name_or_path: str | os.PathLike, tokenizer_name_or_path: str | os.PathLike | None, *, what: str,
              model_option: str, tokenizer_option: str, allow_download: bool = False):
    """Load a transformers ``CLIPModel`` and its tokenizer offline (see ``_weights.load_hf_pretrained``)."""
    from transformers import AutoTokenizer, CLIPModel

    model = load_hf_pretrained(CLIPModel, name_or_path, what=what, option=model_option,
                               needs="config.json and model.safetensors (or pytorch_model.bin)",
                               allow_download=allow_download)
    tokenizer = load_hf_pretrained(AutoTokenizer, tokenizer_name_or_path or name_or_path, what=what,
                                   option=tokenizer_option,
                                   needs="the tokenizer files (tokenizer.json, or vocab.json + merges.txt)",
                                   allow_download=allow_download)
    return model, tokenizer


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def check_clip(name_or_path: str | os.PathLike, tokenizer_name_or_path: str | os.PathLike | None, *, what: str,
               model_option: str, tokenizer_option: str, allow_download: bool = False) -> None:
    """What :func:`load_clip` needs, checked without loading: the model's ``config.json`` and the
    tokenizer files (local folders, or hub ids in the Hugging Face cache)."""
    check_hf_dir(name_or_path, what=what, option=model_option, needs="config.json and model.safetensors",
                 allow_download=allow_download)
    check_hf_dir(tokenizer_name_or_path or name_or_path, what=what, option=tokenizer_option,
                 needs="the tokenizer files (tokenizer.json, or vocab.json + merges.txt)", files=TOKENIZER_FILES,
                 allow_download=allow_download)


class HFCLIPReward(Reward):
    """Base of the rewards built on a transformers ``CLIPModel``.

    Args:
        model: a ``transformers.CLIPModel`` (any size; tests pass a tiny random one).
        tokenizer: callable like a HF tokenizer: ``tokenizer(list_of_str, padding="max_length",
            truncation=True, max_length=77, return_tensors="pt")`` -> ``input_ids``, ``attention_mask``.
        preprocess: the ``ImagePreprocess`` of the reference processor.
        device, dtype: where and in which dtype the CLIP model runs (scores are float32).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, preprocess: ImagePreprocess, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not callable(tokenizer):
            raise TypeError(f"tokenizer: expected a callable HF-style tokenizer, got {type(tokenizer).__name__}")
        dtype = resolve_dtype(dtype)
        self.model = model.to(device=device, dtype=dtype)
        self.tokenizer = tokenizer
        self.preprocess = preprocess.to(device)
        self.dtype = dtype
        max_pos = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", MAX_TEXT_TOKENS)
        self.max_text_tokens = min(MAX_TEXT_TOKENS, int(max_pos))
        self.freeze()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``[B, D]`` (float32), differentiable w.r.t. ``images``."""
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        emb = self.model.visual_projection(pooled).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_text_tokens,
                             return_tensors="pt")
        ids = tok["input_ids"].to(self.device)
        mask = tok["attention_mask"].to(self.device) if "attention_mask" in tok else None
        pooled = self.model.text_model(input_ids=ids, attention_mask=mask).pooler_output
        emb = self.model.text_projection(pooled).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``[B, D]`` (float32), cached per prompt, no grad."""
        return self.cached_text(prompts, self._encode_text)
