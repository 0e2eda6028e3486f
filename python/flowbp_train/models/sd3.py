"""SD3.5-Medium and SD3.5-Large adapters (``StableDiffusion3Pipeline``, ``SD3Transformer2DModel``).

Two-branch CFG ``v_neg + g (v_cond - v_neg)`` (default g = 3.5) with the empty prompt as the negative
branch, run without gradient unless ``grad_negative``; static shift 3.0; timestep = 1000 sigma
(shared/design/REFERENCE.md sections 1.2-1.5). The schedule is the authors' (and the FLUX pipelines'):
``linspace(1, 1/N, N)`` shifted. ``StableDiffusion3Pipeline`` by default spaces its N timesteps from 1 down
to the scheduler's shifted ``sigma_min`` and shifts them again (last sigma 0.009 instead of 3/(N+2));
``pipe(..., sigmas=np.linspace(1, 1/N, N))`` reproduces this adapter. The velocity/CFG logic only needs
a transformer that takes ``encoder_hidden_states`` and ``pooled_projections``: the CPU miniature (pixel
space, no VAE, its own text encoder) subclasses this adapter and overrides prompt encoding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flowbp_kernels import flow_sigmas
from flowbp_train.models.base import FlowAdapter, PromptBatch, VelocityFn, guided_velocity, place_module

PromptEncoder = Callable[[list[str]], dict[str, torch.Tensor]]



class SD3Adapter(FlowAdapter):
    """SD3-family adapter. Build it from a pipeline, or from components (``transformer``, ``vae``
    (None: pixel space), ``prompt_encoder``) for models without a diffusers pipeline.

    Args:
        pipeline: a ``StableDiffusion3Pipeline`` (its transformer, VAE and text encoders are used).
        transformer, vae: components, when ``pipeline`` is None.
        resolution: image side in pixels.
        guidance_scale: CFG scale (1 disables the negative branch).
        shift: the static schedule shift (SD3.5: 3.0; default: the pipeline scheduler's ``shift``).
        device, dtype: where and in which dtype the transformer runs.
        max_sequence_length: T5 tokens (default 512, as the authors encode SD3.5 prompts; the pipeline's
            own default is 256).
        prompt_encoder: ``f(prompts) -> {"encoder_hidden_states": [B, L, D], "pooled_projections": [B, P]}``
            replacing the pipeline's text encoders (tests, pre-computed embeddings).
    """

    family = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    # Every attention and feed-forward projection of every block (the adaLN modulation linears are left
    # out): diffusers' train_dreambooth_lora_sd3.py defaults (the joint attention only, 20% of the
    # published SD3.5-Medium blocks' linear weights) plus the MMDiT-X self-attention ``attn2`` of its
    # first 13 blocks and the feed-forwards: 66% (tests/train/models/test_lora_targets.py).
    default_lora_targets = (
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
        "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
        "attn2.to_k", "attn2.to_out.0", "attn2.to_q", "attn2.to_v",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    )
    default_guidance = 3.5
    default_shift = 3.0
    timestep_scale = 1000.0  # SD3 takes the scheduler timestep (1000 sigma)

    def __init__(self, pipeline=None, *, transformer: torch.nn.Module | None = None, vae=None,
                 resolution: int = 512, guidance_scale: float | None = None, shift: float | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 max_sequence_length: int | None = None, prompt_encoder: PromptEncoder | None = None):
        if pipeline is None and transformer is None:
            raise ValueError("pass a pipeline or a transformer")
        if not isinstance(resolution, int) or resolution < 8:
            raise ValueError(f"resolution must be an integer >= 8, got {resolution!r}")
        self.pipeline = pipeline
        self.transformer = transformer if transformer is not None else pipeline.transformer
        self.vae = vae if pipeline is None else pipeline.vae
        self.device = torch.device(device)
        self.dtype = dtype
        self.resolution = resolution
        self.guidance_scale = float(self.default_guidance if guidance_scale is None else guidance_scale)
        sched_shift = None
        if pipeline is not None and getattr(pipeline, "scheduler", None) is not None:
            sched_shift = pipeline.scheduler.config.get("shift")
        self.shift = float(shift if shift is not None else (sched_shift or self.default_shift))
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length
        self.prompt_encoder = prompt_encoder
        self.pipeline_class = type(self).pipeline_class or self.diffusers_pipeline_class()
        place_module(self.transformer, self.device, self.dtype)
        if self.vae is not None:
            place_module(self.vae, self.device, self.dtype).requires_grad_(False).eval()

    # ------------------------------------------------------------------ prompts
    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self.prompt_encoder is not None:
            return self.prompt_encoder(prompts)
        emb, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": emb, "pooled_projections": pooled}

    def frozen_modules(self) -> list[torch.nn.Module]:
        return super().frozen_modules() + self.text_encoders()

    # ------------------------------------------------------------------ latents and schedule
    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        side = self.resolution // self.vae_scale_factor
        return (batch_size, self.transformer.config.in_channels, side, side)

    def initial_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(self.latent_shape(batch_size), generator=generator, dtype=torch.float32).to(self.device)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        return flow_sigmas(num_steps, shift=self.shift)

    # ------------------------------------------------------------------ velocity and decode
    def _forward(self, x: torch.Tensor, sigma: float, emb: dict[str, torch.Tensor]) -> torch.Tensor:
        t = torch.full((x.shape[0],), sigma * self.timestep_scale, device=x.device, dtype=self.dtype)
        return self.forward_module(
            hidden_states=x.to(self.dtype), timestep=t,
            encoder_hidden_states=emb["encoder_hidden_states"].to(self.dtype),
            pooled_projections=emb["pooled_projections"].to(self.dtype), return_dict=False,
        )[0]

    def velocity_fn(self, batch: PromptBatch, sigmas: torch.Tensor, *, grad_negative: bool = False) -> VelocityFn:
        sig = [float(s) for s in torch.as_tensor(sigmas).tolist()]
        g = self.guidance_scale

        def velocity(x: torch.Tensor, i: int) -> torch.Tensor:
            fwd = lambda z, emb: self._forward(z, sig[i], emb)
            return guided_velocity(fwd, x, batch.tensors, batch.negative, g, grad_negative)

        return velocity

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:  # pixel space
            return (latents.float() * 0.5 + 0.5).clamp(0, 1)
        cfg = self.vae.config
        z = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        img = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (img.float() * 0.5 + 0.5).clamp(0, 1)


class SD35LargeAdapter(SD3Adapter):
    """SD3.5-Large (``family: sd3-large``): the same pipeline, transformer class, guidance, schedule, prompt
    encoding and decoding as SD3.5-Medium, so the SD3 adapter runs unchanged; the published transformer
    has 38 blocks of width 2432 and no MMDiT-X self-attention. A family of its own gives it its recipes,
    its published architecture (memory/architectures/sd3.5-large.json) and its LoRA coverage test."""

    family = "sd3-large"
    # The SD3 targets without the ``attn2`` projections, which no SD3.5-Large block has: every attention and
    # feed-forward projection of every block, 67% of the published blocks' linear weights (diffusers' example
    # defaults, the joint attention: 22%; tests/train/models/test_lora_targets.py).
    default_lora_targets = tuple(t for t in SD3Adapter.default_lora_targets if not t.startswith("attn2."))
