"""FLUX.2-Klein-base adapter (diffusers' ``Flux2KleinPipeline``, ``Flux2Transformer2DModel``).

Latents are 2x2-patchified VAE latents (32 -> 128 channels), normalised by the VAE's batch-norm
statistics and packed to ``[B, (H/16)(W/16), 128]``; real two-branch CFG (default 4.0, empty negative
prompt, negative branch without gradient unless ``grad_negative``), off where the pipeline config says
``is_distilled``, as ``Flux2KleinPipeline`` does (no guidance embedding either); the FLUX.2 empirical
shift ``mu = flux2_mu(sequence length, N)``; timestep = sigma (shared/design/REFERENCE.md 1.2-1.5).
Decoding undoes the normalisation and the patchify, then runs the frozen VAE. FLUX.2-dev (``flux2_dev.py``)
subclasses this adapter: same transformer, packing, schedule and decode, its own guidance and encoder.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flowbp_kernels import flow_sigmas, flux2_mu
from flowbp_train.models.base import FlowAdapter, PromptBatch, VelocityFn, guided_velocity, place_module

PromptEncoder = Callable[[list[str]], dict[str, torch.Tensor]]



class Flux2Adapter(FlowAdapter):
    """FLUX.2-Klein adapter around a ``Flux2KleinPipeline``.

    Args:
        pipeline: the pipeline (transformer, ``AutoencoderKLFlux2``, Qwen3 text encoder, scheduler).
        resolution: image side in pixels (a multiple of 16).
        guidance_scale: CFG scale (1 disables the negative branch).
        device, dtype: where and in which dtype the transformer runs.
        max_sequence_length: text tokens (the pipeline's and the authors' 512).
        prompt_encoder: ``f(prompts) -> {"encoder_hidden_states": [B, L, D]}`` replacing the text encoder.
        is_distilled: a step-distilled model without CFG (default: the pipeline config's ``is_distilled``).
    """

    family = "flux2"
    pipeline_class_name = "Flux2KleinPipeline"
    text_encoder_names = ("text_encoder",)
    # Every attention and feed-forward projection of every block: the double blocks' image and text
    # streams, and the single blocks' fused qkv+MLP input and their output projection. diffusers'
    # train_dreambooth_lora_flux2_klein.py trains the image-stream attention and both single-block
    # projections (80 layers, 66% of the published Klein-base-9B blocks' linear weights); these targets
    # add the double blocks' text stream and feed-forwards (144 layers, 100%; no modulation linear sits
    # inside a FLUX.2 block). tests/train/models/test_lora_targets.py checks it on the published config.
    default_lora_targets = (
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
        "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out", "attn.to_qkv_mlp_proj",
    )
    default_guidance = 4.0

    @classmethod
    def lora_targets(cls, transformer: torch.nn.Module) -> list[str]:
        """``default_lora_targets`` and each single block's ``attn.to_out`` by name (in a double block the
        same suffix names a ModuleList, which peft cannot wrap)."""
        blocks = getattr(transformer, "single_transformer_blocks", ())
        return [*cls.default_lora_targets, *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(len(blocks)))]

    def __init__(self, pipeline, *, resolution: int = 512, guidance_scale: float | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 max_sequence_length: int | None = None, prompt_encoder: PromptEncoder | None = None,
                 is_distilled: bool | None = None):
        self._init_packed(pipeline, type(self).pipeline_class or self.diffusers_pipeline_class(), resolution=resolution,
                          guidance_scale=guidance_scale, device=device, dtype=dtype,
                          max_sequence_length=max_sequence_length, prompt_encoder=prompt_encoder)
        config = getattr(pipeline, "config", None) or {}
        self.is_distilled = bool(config.get("is_distilled", False) if is_distilled is None else is_distilled)
        self.side = resolution // (2 * self.vae_scale_factor)  # packed grid side
        self.channels = self.transformer.config.in_channels  # 4 x VAE latent channels
        place_module(self.transformer, self.device, self.dtype)
        place_module(self.vae, self.device, self.dtype).requires_grad_(False).eval()
        grid = torch.zeros(1, 1, self.side, self.side)
        self.img_ids = pipeline._prepare_latent_ids(grid).to(self.device)

    # ------------------------------------------------------------------ prompts
    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self.prompt_encoder is not None:
            return self.prompt_encoder(prompts)
        emb, _ = self.pipeline.encode_prompt(prompt=prompts, device=self.device,
                                             max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": emb}

    @property
    def uses_cfg(self) -> bool:
        """Two-branch CFG runs, as in ``Flux2KleinPipeline.do_classifier_free_guidance``: ``g > 1`` and
        not a distilled model."""
        return self.guidance_scale > 1.0 and not self.is_distilled

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.vae, getattr(self.pipeline, "text_encoder", None)) if m is not None]

    # ------------------------------------------------------------------ latents and schedule
    @property
    def image_seq_len(self) -> int:
        return self.side * self.side

    def initial_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        z = torch.randn((batch_size, self.channels, self.side, self.side), generator=generator, dtype=torch.float32)
        return self.pipeline._pack_latents(z).to(self.device)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        return flow_sigmas(num_steps, mu=flux2_mu(self.image_seq_len, num_steps))

    # ------------------------------------------------------------------ velocity and decode
    def velocity_fn(self, batch: PromptBatch, sigmas: torch.Tensor, *, grad_negative: bool = False) -> VelocityFn:
        sig = [float(s) for s in torch.as_tensor(sigmas).tolist()]
        ids = {}

        def text_ids(emb: torch.Tensor) -> torch.Tensor:
            if emb.shape not in ids:
                ids[emb.shape] = self.pipeline._prepare_text_ids(emb).to(self.device)
            return ids[emb.shape]

        def forward(x: torch.Tensor, sigma: float, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
            b = x.shape[0]
            emb = tensors["encoder_hidden_states"].to(self.device, self.dtype)
            t = torch.full((b,), sigma, device=x.device, dtype=self.dtype)
            return self.forward_module(
                hidden_states=x.to(self.dtype), timestep=t, guidance=self._guidance(b), encoder_hidden_states=emb,
                txt_ids=text_ids(emb), img_ids=self.img_ids.expand(b, -1, -1), return_dict=False,
            )[0]

        g = self.guidance_scale if self.uses_cfg else 1.0

        def velocity(x: torch.Tensor, i: int) -> torch.Tensor:
            return guided_velocity(lambda z, emb: forward(z, sig[i], emb), x, batch.tensors, batch.negative, g,
                                   grad_negative)

        return velocity

    def _guidance(self, batch_size: int) -> torch.Tensor | None:
        """The transformer's guidance input: none for Klein (Flux2KleinPipeline passes no embedding)."""
        return None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, n, c = latents.shape
        z = latents.permute(0, 2, 1).reshape(b, c, self.side, self.side)  # inverse of _pack_latents
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(z.device, z.dtype)
        z = self.pipeline._unpatchify_latents(z * std + mean)
        img = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (img.float() * 0.5 + 0.5).clamp(0, 1)
