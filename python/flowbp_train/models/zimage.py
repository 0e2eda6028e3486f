"""Z-Image adapter (diffusers' ``ZImagePipeline``, ``ZImageTransformer2DModel``, a Qwen3 text encoder).

Latents are FLUX.1-VAE latents ``[B, 16, H/8, W/8]``; the transformer takes them as a list of per-sample
``[C, 1, h, w]`` frames, cuts 2x2 patches itself and predicts the negative velocity at timestep
``1 - sigma``, so ``velocity_fn`` negates its output. Guidance is Z-Image's two-branch CFG
``v_c + g (v_c - v_u)`` (on for ``g > 0``, default 5.0, empty negative prompt), i.e. ``v_u + (1 + g)(v_c -
v_u)`` in the form ``guided_velocity`` computes; the negative branch runs without gradient unless
``grad_negative``; the pipeline's ``cfg_normalization`` and ``cfg_truncation`` stay at their defaults (off).
Schedule: ``linspace(1, 1/N, N)`` shifted as the scheduler config says (static shift, or ``mu`` from the
sequence length when ``use_dynamic_shifting``). Prompts: the pipeline's own ``encode_prompt`` (chat template,
second-to-last hidden state, padding dropped), kept padded to ``max_sequence_length`` with a mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flowbp_train.models.base import (
    FlowAdapter,
    PromptBatch,
    VelocityFn,
    guided_velocity,
    place_module,
    scheduler_sigmas,
)

PromptEncoder = Callable[[list[str]], dict[str, torch.Tensor]]



class ZImageAdapter(FlowAdapter):
    """Z-Image adapter around a ``ZImagePipeline``.

    Args:
        pipeline: the pipeline (transformer, ``AutoencoderKL``, Qwen3 text encoder, scheduler).
        resolution: image side in pixels (a multiple of 16).
        guidance_scale: Z-Image's CFG scale ``g`` (0 disables the negative branch).
        device, dtype: where and in which dtype the transformer runs.
        max_sequence_length: text tokens (the pipeline's 512).
        prompt_encoder: ``f(prompts) -> {"encoder_hidden_states": [B, L, D]}`` (and optionally an
            ``"attention_mask"`` ``[B, L]``; default: every token) replacing the text encoder.
    """

    family = "z-image"
    pipeline_class_name = "ZImagePipeline"
    text_encoder_names = ("text_encoder",)
    # Every attention and SwiGLU feed-forward projection of the main and both refiner block lists (the
    # adaLN modulation linears are left out): diffusers' train_dreambooth_lora_z_image.py trains the
    # attention only (33% of the published blocks' linear weights); with the feed-forwards 98%
    # (tests/train/models/test_lora_targets.py).
    default_lora_targets = (
        "attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
        "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
    )
    default_guidance = 5.0

    def __init__(self, pipeline, *, resolution: int = 512, guidance_scale: float | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 max_sequence_length: int | None = None, prompt_encoder: PromptEncoder | None = None):
        self._init_packed(pipeline, type(self).pipeline_class or self.diffusers_pipeline_class(), resolution=resolution,
                          guidance_scale=guidance_scale, device=device, dtype=dtype,
                          max_sequence_length=max_sequence_length, prompt_encoder=prompt_encoder)
        self._caption_len: dict[str, int] = {}  # prompt -> its caption's length (tokens), set by _encode
        self.side = resolution // self.vae_scale_factor  # latent side (the transformer patchifies 2x2)
        self.channels = self.transformer.config.in_channels
        place_module(self.transformer, self.device, self.dtype)
        place_module(self.vae, self.device, self.dtype).requires_grad_(False).eval()

    # ------------------------------------------------------------------ prompts
    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self.prompt_encoder is not None:
            out = dict(self.prompt_encoder(prompts))
            out.setdefault("attention_mask", torch.ones(out["encoder_hidden_states"].shape[:2], dtype=torch.bool))
            self._caption_len.update(zip(prompts, out["attention_mask"].sum(1).tolist()))
            return out
        # a copy: the pipeline rewrites the list's items with the chat template in place
        embs, _ = self.pipeline.encode_prompt(prompt=list(prompts), device=self.device,
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=self.max_sequence_length)
        length = self.max_sequence_length  # one padded length, so cached prompts of any batch concatenate
        out = embs[0].new_zeros(len(embs), length, embs[0].shape[-1])
        mask = torch.zeros(len(embs), length, dtype=torch.bool, device=out.device)
        for i, e in enumerate(embs):
            out[i, : len(e)], mask[i, : len(e)] = e, True
        # each caption's length as a number (shapes, known without reading data): the velocity cuts the
        # padding off by it rather than by the mask's values (which a shape-only simulation cannot read)
        self._caption_len.update((p, len(e)) for p, e in zip(prompts, embs))
        return {"encoder_hidden_states": out, "attention_mask": mask}

    @property
    def uses_cfg(self) -> bool:
        """``ZImagePipeline.do_classifier_free_guidance``: ``g > 0``."""
        return self.guidance_scale > 0

    @property
    def cfg_multiplier(self) -> float:
        return 1.0 + self.guidance_scale if self.uses_cfg else 1.0

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.vae, getattr(self.pipeline, "text_encoder", None)) if m is not None]

    # ------------------------------------------------------------------ latents and schedule
    @property
    def image_seq_len(self) -> int:
        return (self.side // 2) ** 2

    def initial_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        shape = (batch_size, self.channels, self.side, self.side)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        return scheduler_sigmas(self.pipeline, self.image_seq_len, num_steps)

    # ------------------------------------------------------------------ velocity and decode
    def velocity_fn(self, batch: PromptBatch, sigmas: torch.Tensor, *, grad_negative: bool = False) -> VelocityFn:
        sig = [float(s) for s in torch.as_tensor(sigmas).tolist()]

        def captions(tensors: dict[str, torch.Tensor], prompts: list[str]) -> list[torch.Tensor]:
            emb = tensors["encoder_hidden_states"].to(self.device, self.dtype)
            if all(p in self._caption_len for p in prompts):  # the padding is a suffix (see _encode)
                return [e[: self._caption_len[p]] for e, p in zip(emb, prompts)]
            return [e[m] for e, m in zip(emb, tensors["attention_mask"].to(self.device).bool())]

        cond = captions(batch.tensors, batch.prompts)
        negative = captions(batch.negative, [""] * len(batch)) if batch.negative is not None else None

        def forward(x: torch.Tensor, sigma: float, caps: list[torch.Tensor]) -> torch.Tensor:
            t = torch.full((x.shape[0],), 1.0 - sigma, device=x.device, dtype=self.dtype)  # the model's time
            frames = list(x.to(self.dtype).unsqueeze(2).unbind(0))
            out = self.forward_module(frames, t, caps, return_dict=False)[0]
            return -torch.stack(out).squeeze(2)  # the transformer predicts -v

        g = self.cfg_multiplier

        def velocity(x: torch.Tensor, i: int) -> torch.Tensor:
            return guided_velocity(lambda z, caps: forward(z, sig[i], caps), x, cond, negative, g, grad_negative)

        return velocity

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        z = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        img = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (img.float() * 0.5 + 0.5).clamp(0, 1)
