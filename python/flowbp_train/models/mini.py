"""The CPU miniature's adapter: diffusers' SD3 transformer in pixel space plus the tiny text encoder.

Same math as the SD3.5 adapter (shared/design/ALGORITHM.md section 1): timestep ``1000 sigma``, two-branch
classifier-free guidance ``v = v_neg + g (v_cond - v_neg)`` with the null prompt "" as the negative
branch, evaluated without gradient unless ``grad_negative``. The two branches always run as separate
forwards (never one concatenated batch) so a re-forward reproduces the rollout's velocity bit for bit.
Implemented here rather than shared with ``models/sd3.py`` because that adapter did not exist when this
was written; the formulas are identical. Latents are the images themselves (``[B, 1, 16, 16]`` in
[-1, 1]); ``decode`` maps them to ``[B, 3, 16, 16]`` in [0, 1] with a straight-through clamp.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from flowbp_kernels import flow_sigmas
from flowbp_train.models.base import FlowAdapter, PromptBatch, VelocityFn

#: Names accepted as ``pretrained_model_name_or_path`` for the committed weights.
BUILTIN_NAMES = ("mini", "builtin", "flowbp-mini")


class MiniAdapter(FlowAdapter):
    """Adapter of the miniature (family ``"mini"``).

    Args:
        transformer: the tiny ``SD3Transformer2DModel``.
        text_encoder: the :class:`~flowbp_train.mini.text_encoder.TinyTextEncoder` (frozen).
        guidance_scale: CFG scale ``g`` (1.0: the conditional branch only, no negative forward).
        shift: static schedule shift (None: unshifted; the miniature does not need one).
        device, dtype: where and in which dtype the transformer runs.
    """

    family = "mini"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    resolution = 16

    def __init__(self, transformer: torch.nn.Module, text_encoder: torch.nn.Module, *, guidance_scale: float = 1.0,
                 shift: float | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool) or guidance_scale <= 0:
            raise ValueError(f"guidance_scale must be a number > 0, got {guidance_scale!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.transformer = transformer.to(self.device, dtype)
        self.text_encoder = text_encoder.to(self.device).eval().requires_grad_(False)
        self.guidance_scale = float(guidance_scale)
        self.shift = shift
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | None = "mini", *, guidance_scale: float | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        resolution: int | None = None, **_ignored) -> MiniAdapter:
        """Load the committed weights (``"mini"``, ``"builtin"`` or None) or those of a folder holding
        ``mini_base.safetensors`` and its ``sha256.json``. ``resolution``, when given, must be 16."""
        from flowbp_train.mini.model import load_base

        if resolution is not None and resolution != cls.resolution:
            raise ValueError(f"resolution: the miniature generates {cls.resolution}x{cls.resolution} images, "
                             f"got {resolution}")
        name = pretrained_model_name_or_path
        if name is not None and not isinstance(name, (str, Path)):
            raise TypeError(f"pretrained_model_name_or_path must be a str or path, got {type(name).__name__}")
        weights_dir = None if name is None or str(name) in BUILTIN_NAMES else Path(name)
        transformer, text_encoder = load_base(weights_dir)
        if isinstance(dtype, str):
            dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
                     "float32": torch.float32, "float64": torch.float64}[dtype]
        return cls(transformer, text_encoder, guidance_scale=1.0 if guidance_scale is None else guidance_scale,
                   device=device, dtype=dtype or torch.float32)

    # ------------------------------------------------------------------------------------------ prompts
    def _encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if new:
            with torch.no_grad():
                tok, pooled = self.text_encoder.encode(new)
            for k, p in enumerate(new):
                self._cache[p] = (tok[k], pooled[k])
        tok = torch.stack([self._cache[p][0] for p in prompts]).to(self.device, self.dtype)
        pooled = torch.stack([self._cache[p][1] for p in prompts]).to(self.device, self.dtype)
        return tok, pooled

    def encode_prompts(self, prompts: Sequence[str]) -> PromptBatch:
        """Token features and pooled features of each prompt, and of the null prompt (the negative)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or len(prompts) == 0:
            raise TypeError("prompts must be a non-empty sequence of str")
        tok, pooled = self._encode(list(prompts))
        ntok, npooled = self._encode([""] * len(prompts))
        return PromptBatch(list(prompts), {"encoder_hidden_states": tok, "pooled_projections": pooled},
                           negative={"encoder_hidden_states": ntok, "pooled_projections": npooled})

    # ------------------------------------------------------------------------------------------ sampling
    def initial_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal ``[B, 1, 16, 16]`` fp32 (drawn on CPU from ``generator``, then moved)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        x = torch.randn(batch_size, 1, self.resolution, self.resolution, generator=generator)
        return x.to(self.device)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        return flow_sigmas(num_steps, shift=self.shift)

    def _forward(self, x: torch.Tensor, cond: dict[str, torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        return self.transformer(hidden_states=x, encoder_hidden_states=cond["encoder_hidden_states"],
                                pooled_projections=cond["pooled_projections"], timestep=t, return_dict=False)[0]

    def velocity_fn(self, batch: PromptBatch, sigmas: torch.Tensor, *, grad_negative: bool = False) -> VelocityFn:
        """``v(x, i)`` at ``sigma_i`` with two-branch CFG (see the module docstring)."""
        if not isinstance(batch, PromptBatch):
            raise TypeError(f"batch must be a PromptBatch from encode_prompts, got {type(batch).__name__}")
        sig = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
        g = self.guidance_scale
        n = len(batch)

        def velocity(x: torch.Tensor, i: int) -> torch.Tensor:
            if x.shape[0] != n:
                raise ValueError(f"x has batch {x.shape[0]}, the prompts {n}")
            xin = x.to(self.device, self.dtype)
            t = torch.full((n,), float(sig[i]) * 1000.0, device=self.device, dtype=self.dtype)
            v_cond = self._forward(xin, batch.tensors, t)
            if g == 1.0:
                return v_cond
            with torch.set_grad_enabled(torch.is_grad_enabled() and grad_negative):
                v_neg = self._forward(xin, batch.negative, t)
            return v_neg + g * (v_cond - v_neg)

        return velocity

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
