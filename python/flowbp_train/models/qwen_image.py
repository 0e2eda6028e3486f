"""Qwen-Image adapter (``QwenImagePipeline``, ``QwenImageTransformer2DModel``, ``AutoencoderKLQwenImage``).

As the pipeline samples: prompts encoded by its Qwen2.5-VL text encoder through its own ``encode_prompt``
(its chat template, the template's prefix tokens dropped, per-prompt lengths with a mask); true two-branch
CFG ``v_neg + g (v_cond - v_neg)`` (default g = 4.0 with the negative prompt " ", the model card's) rescaled
per token to the norm of the conditional velocity; the FLUX dynamic shift ``mu`` from the scheduler config,
then the scheduler's terminal stretch (``shift_terminal``); timestep = sigma. Latents are 2x2 packed
``[B, (H/16)(W/16), 64]``; decoding un-normalises by the VAE's per-channel mean and std and decodes one
frame of the video VAE. Its VAE has no gradient checkpointing (only the transformer's is enabled).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flowbp_kernels import flow_sigmas, flux_mu
from flowbp_train.models.base import FlowAdapter, PromptBatch, VelocityFn, guided_velocity, place_module

PromptEncoder = Callable[[list[str]], dict[str, torch.Tensor]]
MASK = "encoder_hidden_states_mask"
#: QwenImagePipeline refuses longer prompts (its tokenizer_max_length)
MAX_TEXT_TOKENS = 1024



class QwenImageAdapter(FlowAdapter):
    """Qwen-Image adapter around a ``QwenImagePipeline``.

    Args:
        pipeline: the pipeline (transformer, ``AutoencoderKLQwenImage``, Qwen2.5-VL text encoder, scheduler).
        resolution: image side in pixels (a multiple of 16).
        guidance_scale: ``true_cfg_scale`` (1 disables the negative branch).
        device, dtype: where and in which dtype the transformer runs.
        max_sequence_length: text tokens kept after the template prefix (the pipeline's default 512).
        prompt_encoder: ``f(prompts) -> {"encoder_hidden_states": [B, L, D], "encoder_hidden_states_mask":
            [B, L] (optional)}`` replacing the text encoder (tests, pre-computed embeddings).
        negative_prompt: the negative branch's prompt (the model card's " ").
    """

    family = "qwen-image"
    pipeline_class_name = "QwenImagePipeline"
    text_encoder_names = ("text_encoder",)
    # Every attention and feed-forward projection of both streams of every block (the adaLN modulation
    # linears img_mod / txt_mod are left out): 67% of the published blocks' linear weights. diffusers'
    # train_dreambooth_lora_qwen_image.py trains the image-stream attention only (to_q, to_k, to_v,
    # to_out.0): 11% (tests/train/models/test_lora_targets.py).
    default_lora_targets = (
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
        "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
    )
    default_guidance = 4.0

    def __init__(self, pipeline, *, resolution: int = 512, guidance_scale: float | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 max_sequence_length: int | None = None, prompt_encoder: PromptEncoder | None = None,
                 negative_prompt: str = " "):
        self.pipeline = pipeline
        self.pipeline_class = type(self).pipeline_class or self.diffusers_pipeline_class()
        self.transformer, self.vae = pipeline.transformer, pipeline.vae
        self.device, self.dtype = torch.device(device), dtype
        self.vae_scale_factor = 2 ** len(self.vae.temperal_downsample)
        if not isinstance(resolution, int) or resolution < 1 or resolution % (2 * self.vae_scale_factor):
            raise ValueError(f"resolution must be a positive multiple of {2 * self.vae_scale_factor}, "
                             f"got {resolution!r}")
        if not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}")
        self.resolution = resolution
        self.guidance_scale = float(self.default_guidance if guidance_scale is None else guidance_scale)
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length
        if not 1 <= self.max_sequence_length <= MAX_TEXT_TOKENS:
            raise ValueError(f"max_sequence_length must be in [1, {MAX_TEXT_TOKENS}] for Qwen-Image, "
                             f"got {self.max_sequence_length!r}")
        self.prompt_encoder, self.negative_prompt = prompt_encoder, negative_prompt
        self._text_len: dict[str, int] = {}  # prompt -> its valid text tokens, set by _encode
        self.side = resolution // (2 * self.vae_scale_factor)  # packed grid side
        self.num_channels = self.transformer.config.in_channels // 4  # VAE latent channels
        place_module(self.transformer, self.device, self.dtype)
        place_module(self.vae, self.device, self.dtype).requires_grad_(False).eval()

    def enable_gradient_checkpointing(self) -> None:
        """The transformer's only: ``AutoencoderKLQwenImage`` does not support it."""
        self.transformer.enable_gradient_checkpointing()

    # ------------------------------------------------------------------ prompts
    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        out = self.prompt_encoder(prompts) if self.prompt_encoder is not None else dict(zip(
            ("encoder_hidden_states", MASK), self.pipeline.encode_prompt(
                prompt=prompts, device=self.device, max_sequence_length=self.max_sequence_length)))
        emb = out["encoder_hidden_states"]
        mask = out.get(MASK)  # None: every token is valid (the pipeline drops an all-ones mask)
        # each prompt's length as a number: from the shape when every token is valid (known without reading
        # data, so a shape-only simulation runs this path), else from the mask (valid tokens come first)
        lengths = [emb.shape[1]] * len(prompts) if mask is None else [int(n) for n in mask.sum(1).tolist()]
        self._text_len.update(zip(prompts, lengths))
        return {"encoder_hidden_states": emb,
                MASK: torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device) if mask is None else mask}

    def _gather_prompts(self, entries: list[dict[str, torch.Tensor]], prompts: list[str]) -> dict[str, torch.Tensor]:
        """Each prompt's valid tokens (the pipeline puts them first), zero-padded to the batch's longest, as
        the pipeline pads a batch it encodes at once."""
        lengths = [self._text_len[p] for p in prompts]
        width = max(lengths)
        emb = torch.zeros(len(entries), width, entries[0]["encoder_hidden_states"].shape[-1],
                          dtype=entries[0]["encoder_hidden_states"].dtype)
        mask = torch.zeros(len(entries), width, dtype=torch.long)
        for i, (e, n) in enumerate(zip(entries, lengths)):
            emb[i, :n], mask[i, :n] = e["encoder_hidden_states"][0, :n], 1
        return {"encoder_hidden_states": emb, MASK: mask}

    def frozen_modules(self) -> list[torch.nn.Module]:
        return super().frozen_modules() + self.text_encoders()

    # ------------------------------------------------------------------ latents and schedule
    def initial_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        c, s = self.num_channels, 2 * self.side
        z = torch.randn((batch_size, c, s, s), generator=generator, dtype=torch.float32)
        return self.pipeline._pack_latents(z, batch_size, c, s, s).to(self.device)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """``linspace(1, 1/N, N)`` shifted as the pipeline's scheduler does: exponential time shift by ``mu``
        (or the static ``shift``), then stretched so that the last non-zero sigma is ``shift_terminal``."""
        sc = self.pipeline.scheduler.config
        if sc.get("use_dynamic_shifting", False):
            if sc.get("time_shift_type", "exponential") != "exponential":
                raise ValueError(f"scheduler: time_shift_type {sc.get('time_shift_type')!r} is not supported "
                                 f"(Qwen-Image's is 'exponential')")
            mu = flux_mu(self.side * self.side, sc.get("base_image_seq_len", 256), sc.get("max_image_seq_len", 4096),
                         sc.get("base_shift", 0.5), sc.get("max_shift", 1.15))
            sig = flow_sigmas(num_steps, mu=mu)
        else:
            sig = flow_sigmas(num_steps, shift=float(sc.get("shift", 1.0)))
        terminal = sc.get("shift_terminal")
        if terminal:
            one_minus = 1.0 - sig[:-1]
            sig = torch.cat([1.0 - one_minus * ((1.0 - terminal) / one_minus[-1]), sig[-1:]])
        return sig

    # ------------------------------------------------------------------ velocity and decode
    def velocity_fn(self, batch: PromptBatch, sigmas: torch.Tensor, *, grad_negative: bool = False) -> VelocityFn:
        sig = [float(s) for s in torch.as_tensor(sigmas).tolist()]
        shapes: dict[int, list] = {}

        def text(tensors: dict[str, torch.Tensor], prompts: list[str]) -> dict[str, torch.Tensor | None]:
            emb = tensors["encoder_hidden_states"].to(self.device, self.dtype)
            # no mask when every prompt fills the width (the pipeline's rule), decided from the lengths
            if all(p in self._text_len for p in prompts):
                full = all(self._text_len[p] == emb.shape[1] for p in prompts)
            else:  # tensors not encoded here (a hand-built batch): read the mask
                full = bool(tensors[MASK].all())
            return {"encoder_hidden_states": emb, MASK: None if full else tensors[MASK].to(self.device)}

        cond = text(batch.tensors, batch.prompts)
        negative = None if batch.negative is None else text(batch.negative, [self.negative_prompt] * len(batch))

        def forward(x: torch.Tensor, sigma: float, emb: dict) -> torch.Tensor:
            b = x.shape[0]
            t = torch.full((b,), sigma, device=x.device, dtype=self.dtype)
            img_shapes = shapes.setdefault(b, [[(1, self.side, self.side)]] * b)
            return self.forward_module(hidden_states=x.to(self.dtype), timestep=t, guidance=None,
                                       img_shapes=img_shapes, return_dict=False, **emb)[0]

        def velocity(x: torch.Tensor, i: int) -> torch.Tensor:
            return guided_velocity(lambda z, emb: forward(z, sig[i], emb), x, cond, negative, self.guidance_scale,
                                   grad_negative, norm_rescale=True)

        return velocity

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        z = self.pipeline._unpack_latents(latents, self.resolution, self.resolution, self.vae_scale_factor)
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean).view(shape).to(z.device, z.dtype)
        std = torch.tensor(cfg.latents_std).view(shape).to(z.device, z.dtype)
        img = self.vae.decode((z * std + mean).to(self.vae.dtype), return_dict=False)[0][:, :, 0]
        return (img.float() * 0.5 + 0.5).clamp(0, 1)
