"""HPSv2 / HPSv2.1 (Wu et al., 2023, "Human Preference Score v2"): cosine of OpenCLIP ViT-H-14 embeddings.

Weights: ``HPS_v2.1_compressed.pt`` (or ``HPS_v2_compressed.pt``) from the hub repo ``xswu/HPSv2``, a full
ViT-H-14 state dict under ``"state_dict"``; the architecture comes from open_clip (no OpenCLIP download).
Score = ``<normalize(image_emb), normalize(text_emb)>`` without logit scale, as the authors' ``score``
(typical values 0.2-0.35). Preprocessing as the reference eval transform: longest side to 224 bicubic, pad
to square with black, OpenAI statistics (``hpsv2_preprocess``, antialiased on tensors). open_clip is
imported only when a model is loaded, so the package works without it.
"""

from __future__ import annotations

import os

import torch

from ._weights import check_file, check_module, resolve_file
from .base import Reward, resolve_dtype
from .preprocess import hpsv2_preprocess

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_ARCH = "ViT-H-14"


def _import_open_clip():
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("HPSv2 needs open_clip: pip install open_clip_torch (it also needs torchvision)") from e
    return open_clip


class HPSv2Reward(Reward):
    """HPSv2.1 (default) or HPSv2.0.

    Args:
        checkpoint_path: the ``HPS_v2.1_compressed.pt`` file or its directory; default: the HF cache copy of
            ``xswu/HPSv2`` (downloaded only if ``allow_download``).
        version: ``"v2.1"`` or ``"v2.0"``.
        model, tokenizer: a prebuilt open_clip ``CLIP`` model and tokenizer instead of loading (tests).
        device, dtype: where and in which dtype the model runs (a torch.dtype or a name, ``"bf16"``; scores
            are float32).
        allow_download: allow fetching the checkpoint from the Hugging Face Hub.
    """

    name = "hpsv2"
    differentiable = True

    @classmethod
    def check_files(cls, *, key_prefix: str = "", checkpoint_path: str | os.PathLike | None = None,
                    version: str = "v2.1", model: torch.nn.Module | None = None, allow_download: bool = False,
                    **_other) -> None:
        """The checkpoint file (or its HF cache copy) and the open_clip package (see ``Reward.check_files``)."""
        if model is not None or version not in HPS_FILES:  # prebuilt, or the constructor names the bad value
            return
        check_file(checkpoint_path, what=f"HPS{version}", option=f"{key_prefix}checkpoint_path", repo_id=HPS_REPO,
                   filename=HPS_FILES[version], source=f"https://huggingface.co/{HPS_REPO}",
                   allow_download=allow_download)
        check_module("open_clip", "HPSv2 needs open_clip: pip install open_clip_torch (it also needs torchvision)")

    def __init__(self, checkpoint_path: str | os.PathLike | None = None, *, version: str = "v2.1",
                 model: torch.nn.Module | None = None, tokenizer=None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, allow_download: bool = False) -> None:
        super().__init__()
        if version not in HPS_FILES:
            raise ValueError(f"version: expected one of {sorted(HPS_FILES)}, got {version!r}")
        if (model is None) != (tokenizer is None):
            raise ValueError("model, tokenizer: pass both (prebuilt) or neither (load the checkpoint)")
        dtype = resolve_dtype(dtype)
        if model is None:
            # Resolve the file before importing open_clip: a missing checkpoint is reported first.
            path = resolve_file(checkpoint_path, what=f"HPS{version}", option="checkpoint_path", repo_id=HPS_REPO,
                                filename=HPS_FILES[version], source=f"https://huggingface.co/{HPS_REPO}",
                                allow_download=allow_download)
            open_clip = _import_open_clip()
            model = open_clip.create_model(HPS_ARCH, pretrained=None)
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state))
            tokenizer = open_clip.get_tokenizer(HPS_ARCH)
        self.model = model.to(device=device, dtype=dtype)
        self.tokenizer = tokenizer
        self.dtype = dtype
        size = model.visual.image_size
        self.preprocess = hpsv2_preprocess(size[0] if isinstance(size, (tuple, list)) else int(size)).to(device)
        self.version = version
        self.freeze()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float()

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        img = self.model.encode_image(pixels, normalize=True).float()
        return (img * self.cached_text(prompts, self._encode_text)).sum(-1)
