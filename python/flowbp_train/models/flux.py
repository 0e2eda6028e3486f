"""FLUX.1-dev adapter (``FluxPipeline``, ``FluxTransformer2DModel``).

Packed latents (2x2 patches of the 16-channel VAE latent, ``[B, (H/16)(W/16), 64]``), the embedded
guidance of the guidance-distilled model (default 4.0, no negative branch), the dynamic shift
``mu = flux_mu(sequence length)`` and timestep = sigma (the pipeline passes timestep / 1000)
(shared/design/REFERENCE.md sections 1.2-1.5). Decoding unpacks, undoes the VAE scaling and shift and
maps [-1, 1] to [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flowbp_train.models.base import FlowAdapter, PromptBatch, VelocityFn, place_module, scheduler_sigmas

PromptEncoder = Callable[[list[str]], dict[str, torch.Tensor]]



class FluxAdapter(FlowAdapter):
    """FLUX.1 adapter around a ``FluxPipeline``.

    Args:
        pipeline: the pipeline (transformer, VAE, CLIP and T5 text encoders, scheduler).
        resolution: image side in pixels (a multiple of 16).
        guidance_scale: the embedded guidance (ignored by a transformer without ``guidance_embeds``).
        device, dtype: where and in which dtype the transformer runs.
        max_sequence_length: T5 tokens (default 512, FLUX.1-dev's and the authors').
        prompt_encoder: ``f(prompts) -> {"encoder_hidden_states": [B, L, 4096], "pooled_projections":
            [B, 768]}`` replacing the text encoders (tests, pre-computed embeddings).
    """

    family = "flux1"
    pipeline_class_name = "FluxPipeline"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    # Every attention and feed-forward projection of every block (the adaLN modulation linears are left
    # out): diffusers' train_dreambooth_lora_flux.py defaults plus the single blocks' MLP in and out
    # projections, which those defaults miss (they hold 60% of a single block's weights). On the published
    # FLUX.1-dev config this covers 73% of the blocks' linear weights (tests/train/models/test_lora_targets.py).
    default_lora_targets = (
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
    )
    default_guidance = 4.0
    two_branch_cfg = False  # guidance is an input of the guidance-distilled transformer

    def __init__(self, pipeline, *, resolution: int = 512, guidance_scale: float | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 max_sequence_length: int | None = None, prompt_encoder: PromptEncoder | None = None):
        self._init_packed(pipeline, type(self).pipeline_class or self.diffusers_pipeline_class(), resolution=resolution,
                          guidance_scale=guidance_scale, device=device, dtype=dtype,
                          max_sequence_length=max_sequence_length, prompt_encoder=prompt_encoder)
        self.latent_side = resolution // self.vae_scale_factor  # before 2x2 packing
        self.num_channels = self.transformer.config.in_channels // 4
        place_module(self.transformer, self.device, self.dtype)
        place_module(self.vae, self.device, self.dtype).requires_grad_(False).eval()
        side = self.latent_side // 2
        self.img_ids = pipeline._prepare_latent_image_ids(1, side, side, self.device, self.dtype)

    @classmethod
    def lora_targets(cls, transformer: torch.nn.Module) -> list[str]:
        """``default_lora_targets`` and each single block's ``proj_out`` by name (the bare suffix would
        also hit the transformer's final output projection)."""
        blocks = getattr(transformer, "single_transformer_blocks", ())
        return [*cls.default_lora_targets, *(f"single_transformer_blocks.{i}.proj_out" for i in range(len(blocks)))]

    # ------------------------------------------------------------------ prompts
    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self.prompt_encoder is not None:
            return self.prompt_encoder(prompts)
        emb, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": emb, "pooled_projections": pooled}

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.vae, getattr(self.pipeline, "text_encoder", None),
                            getattr(self.pipeline, "text_encoder_2", None)) if m is not None]

    # ------------------------------------------------------------------ latents and schedule
    @property
    def image_seq_len(self) -> int:
        return (self.latent_side // 2) ** 2

    def initial_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        c, s = self.num_channels, self.latent_side
        z = torch.randn((batch_size, c, s, s), generator=generator, dtype=torch.float32)
        return self.pipeline._pack_latents(z, batch_size, c, s, s).to(self.device)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        return scheduler_sigmas(self.pipeline, self.image_seq_len, num_steps)

    # ------------------------------------------------------------------ velocity and decode
    def velocity_fn(self, batch: PromptBatch, sigmas: torch.Tensor, *, grad_negative: bool = False) -> VelocityFn:
        sig = [float(s) for s in torch.as_tensor(sigmas).tolist()]
        emb = batch.tensors["encoder_hidden_states"].to(self.device, self.dtype)
        pooled = batch.tensors["pooled_projections"].to(self.device, self.dtype)
        txt_ids = torch.zeros(emb.shape[1], 3, device=self.device, dtype=self.dtype)
        use_guidance = bool(getattr(self.transformer.config, "guidance_embeds", False))

        def velocity(x: torch.Tensor, i: int) -> torch.Tensor:
            b = x.shape[0]
            t = torch.full((b,), sig[i], device=x.device, dtype=self.dtype)
            guidance = torch.full((b,), self.guidance_scale, device=x.device, dtype=torch.float32) \
                if use_guidance else None
            return self.forward_module(
                hidden_states=x.to(self.dtype), timestep=t, guidance=guidance, pooled_projections=pooled,
                encoder_hidden_states=emb, txt_ids=txt_ids, img_ids=self.img_ids, return_dict=False,
            )[0]

        return velocity

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        z = self.pipeline._unpack_latents(latents, self.resolution, self.resolution, self.vae_scale_factor)
        z = z / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        img = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (img.float() * 0.5 + 0.5).clamp(0, 1)
