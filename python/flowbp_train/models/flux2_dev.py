"""FLUX.2-dev adapter (diffusers' ``Flux2Pipeline``: ``Flux2Transformer2DModel`` with a guidance embedding,
the Mistral-Small-3.1 text encoder ``Mistral3ForConditionalGeneration``).

Everything but guidance and prompt encoding is the FLUX.2-Klein adapter's (``flux2.py``): 2x2-patchified,
batch-norm-normalised VAE latents packed to ``[B, (H/16)(W/16), 128]``, the empirical shift
``mu = flux2_mu(sequence length, N)`` on ``linspace(1, 1/N, N)``, timestep = sigma, the same decode.
FLUX.2-dev is guidance-distilled: like FLUX.1-dev it takes the guidance scale as an input of the transformer
(default 4.0, ``Flux2Pipeline``'s) and runs one branch, no negative prompt. Prompts are encoded by the
pipeline's own ``encode_prompt`` (its system message, hidden states of Mistral layers 10, 20, 30).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from flowbp_train.models.flux2 import Flux2Adapter


class Flux2DevAdapter(Flux2Adapter):
    """FLUX.2-dev adapter around a ``Flux2Pipeline``; the arguments are :class:`Flux2Adapter`'s
    (``guidance_scale`` is the embedded guidance; ``is_distilled`` does not apply and is ignored).

    Args:
        prompt_encoder: ``f(prompts) -> {"encoder_hidden_states": [B, L, 3 x 5120]}`` replacing the Mistral
            text encoder (tests, pre-computed embeddings).
    """

    family = "flux2-dev"
    pipeline_class_name = "Flux2Pipeline"
    # The Klein targets (every attention and feed-forward projection of every block). diffusers'
    # train_dreambooth_lora_flux2.py trains the same subset as its Klein script (the image-stream attention
    # and both single-block projections); the published FLUX.2-dev blocks have the same module names, so the
    # targets are shared (tests/train/models/test_lora_targets.py checks them on the published config).
    default_guidance = 4.0
    two_branch_cfg = False  # guidance is an input of the guidance-distilled transformer

    @classmethod
    def check_files(cls, pretrained_model_name_or_path: str, **kw) -> Path | None:
        """The base checks, then: a folder whose tokenizer is the published ``PixtralProcessor`` needs
        torchvision (transformers refuses to build that class without it), said before anything loads."""
        folder = super().check_files(pretrained_model_name_or_path, **kw)
        if folder is None:
            return None
        entry = json.loads((Path(folder) / "model_index.json").read_text()).get("tokenizer")
        if (isinstance(entry, list) and "PixtralProcessor" in entry
                and importlib.util.find_spec("torchvision") is None):
            key = kw.get("key", "pretrained_model_name_or_path")
            raise ValueError(f"{key}: {folder} names a PixtralProcessor tokenizer, which needs torchvision "
                             "(pip install torchvision matching your torch)")
        return folder

    @property
    def uses_cfg(self) -> bool:
        """Never: the guidance-distilled model runs one branch (``Flux2Pipeline`` has no negative prompt)."""
        return False

    def _guidance(self, batch_size: int) -> torch.Tensor | None:
        """The embedded guidance, as ``Flux2Pipeline`` passes it (fp32, one value per sample); None for a
        transformer built without a guidance embedding."""
        if not getattr(self.transformer.config, "guidance_embeds", False):
            return None
        return torch.full((batch_size,), self.guidance_scale, device=self.device, dtype=torch.float32)
