"""The CPU miniature's adapter: diffusers' SD3 transformer in pixel space plus the tiny text encoder.

A subclass of :class:`~flowbp_train.models.sd3.SD3Adapter`, so the velocity and CFG code is the SD3.5
one (shared/design/ALGORITHM.md section 1): timestep ``1000 sigma``, two-branch guidance
``v = v_neg + g (v_cond - v_neg)`` with the null prompt "" as the negative branch, evaluated without
gradient unless ``grad_negative``. What differs: prompts go through the tiny text encoder, there is no
VAE (latents are the images, ``[B, 1, 16, 16]`` in [-1, 1]), the schedule is unshifted, and ``decode``
clamps to [0, 1] in value only (straight-through), so the reward's gradient reaches overshooting pixels.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flowbp_train.models.base import PromptBatch, VelocityFn
from flowbp_train.models.sd3 import SD3Adapter

#: Names accepted as ``pretrained_model_name_or_path`` for the committed weights.
BUILTIN_NAMES = ("mini", "builtin", "flowbp-mini")
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
           "float64": torch.float64}


class MiniAdapter(SD3Adapter):
    """Adapter of the miniature (family ``"mini"``).

    Args:
        transformer: the tiny ``SD3Transformer2DModel`` (:func:`flowbp_train.mini.model.build_transformer`).
        text_encoder: the :class:`~flowbp_train.mini.text_encoder.TinyTextEncoder` (frozen here).
        guidance_scale: CFG scale ``g`` (1.0: the conditional branch only, no negative forward).
        shift: static schedule shift (1.0: unshifted; 10 steps suffice at 16x16, MINIATURE.md).
        device, dtype: where and in which dtype the transformer runs.
    """

    family = "mini"
    default_lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
    default_guidance = 1.0
    default_shift = 1.0
    image_size = 16

    def __init__(self, transformer: torch.nn.Module, text_encoder: torch.nn.Module, *, guidance_scale: float = 1.0,
                 shift: float = 1.0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or guidance_scale <= 0:
            raise ValueError(f"guidance_scale must be a number > 0, got {guidance_scale!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.text_encoder = text_encoder.to(device).eval().requires_grad_(False)
        super().__init__(None, transformer=transformer, vae=None, resolution=self.image_size,
                         guidance_scale=guidance_scale, shift=shift, device=device, dtype=dtype,
                         prompt_encoder=self._encode_text)

    def _encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tok, pooled = self.text_encoder.encode(prompts)
        return {"encoder_hidden_states": tok, "pooled_projections": pooled}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path | None = "mini", *,
                        guidance_scale: float | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str | None = None, resolution: int | None = None,
                        **_ignored) -> MiniAdapter:
        """Load the committed weights (``"mini"``, ``"builtin"`` or None) or those of a folder holding
        ``mini_base.safetensors`` and its ``sha256.json``. ``resolution``, when given, must be 16; other
        trainer keywords (``revision``, ``max_sequence_length``) do not apply and are ignored."""
        from flowbp_train.mini.model import load_base

        if resolution is not None and resolution != cls.image_size:
            raise ValueError(f"resolution: the miniature generates {cls.image_size}x{cls.image_size} images, "
                             f"got {resolution}")
        name = pretrained_model_name_or_path
        if name is not None and not isinstance(name, (str, Path)):
            raise TypeError(f"pretrained_model_name_or_path must be a str or path, got {type(name).__name__}")
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
            dtype = _DTYPES[dtype]
        transformer, text_encoder = load_base(None if name is None or str(name) in BUILTIN_NAMES else Path(name))
        return cls(transformer, text_encoder, guidance_scale=cls.default_guidance if guidance_scale is None
                   else guidance_scale, device=device, dtype=dtype or torch.float32)

    @classmethod
    def check_files(cls, pretrained_model_name_or_path: str | Path | None = "mini", *,
                    key: str = "pretrained_model_name_or_path", **_ignored) -> None:
        """The committed weights, or a folder holding ``mini_base.safetensors`` and its ``sha256.json``."""
        from flowbp_train.mini.model import BASE_FILE, HASHES_FILE

        name = pretrained_model_name_or_path
        if name is None or str(name) in BUILTIN_NAMES:
            return
        folder = Path(name)
        for f in (BASE_FILE, HASHES_FILE):
            if not (folder / f).is_file():
                raise FileNotFoundError(f"{key}: {folder / f} not found (a miniature folder holds {BASE_FILE} and "
                                        f"{HASHES_FILE}; or pass {key}=mini for the committed weights)")

    def load_lora_weights(self, path: str | Path, alpha: float | None = None) -> None:
        """Attach a LoRA saved by the trainer or ``flowbp-mini align`` (file or folder; used by
        ``flowbp-eval --lora``). ``alpha`` defaults to the file's recorded ``lora_alpha`` (else the rank)."""
        from flowbp_train.mini.lora import load_lora

        load_lora(self.transformer, path, alpha=alpha)

    def encode_prompts(self, prompts) -> PromptBatch:
        """As SD3: token and pooled features per prompt; the null prompt's as the negative branch."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of str, got a single str")
        return super().encode_prompts(prompts)

    def initial_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        return super().initial_noise(batch_size, generator)

    def velocity_fn(self, batch: PromptBatch, sigmas: torch.Tensor, *, grad_negative: bool = False) -> VelocityFn:
        if not isinstance(batch, PromptBatch):
            raise TypeError(f"batch must be a PromptBatch from encode_prompts, got {type(batch).__name__}")
        return super().velocity_fn(batch, sigmas, grad_negative=grad_negative)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, 1, 16, 16]`` in [-1, 1] -> ``[B, 3, 16, 16]`` in [0, 1]: ``(x + 1) / 2`` clamped to [0, 1]
        in value, with the identity gradient (a plain clamp would zero the gradient of every pixel that
        overshoots, exactly those the reward should pull back)."""
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[1] != 1:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be [B, 1, H, W], got {got}")
        y = (latents.to(torch.promote_types(latents.dtype, torch.float32)) + 1) / 2
        y = y + (y.clamp(0, 1) - y).detach()
        return y.expand(-1, 3, -1, -1)

    def final_report(self, output_dir, cfg) -> None:
        """The miniature's report of a finished LoRA run: before/after grids of every prompt (same seeds),
        reward and held-out judge curves, ``summary.json`` (``flowbp_train.mini.run.report_run``)."""
        if getattr(cfg, "rank", 0) > 0:
            from flowbp_train.mini.run import report_run

            report_run(output_dir)
