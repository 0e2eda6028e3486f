"""Tiny random pipelines of the families, built offline from configs (no tokenizer files: the
adapters get a deterministic prompt encoder that maps each prompt to seeded random embeddings)."""

from __future__ import annotations

import hashlib

import torch

TEXT_DIM = 32  # joint_attention_dim of the tiny transformers
POOLED_DIM = 32
TEXT_LEN = 4
RESOLUTION = 16


def _prompt_tensor(prompt: str, shape: tuple[int, ...], salt: str) -> torch.Tensor:
    seed = int(hashlib.sha256((salt + prompt).encode()).hexdigest()[:8], 16)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def prompt_encoder(pooled: bool = True):
    """A stand-in for the text encoders: each prompt -> fixed random ``[L, D]`` (and ``[P]``) tensors."""

    def encode(prompts: list[str]) -> dict[str, torch.Tensor]:
        out = {"encoder_hidden_states": torch.stack([_prompt_tensor(p, (TEXT_LEN, TEXT_DIM), "e") for p in prompts])}
        if pooled:
            out["pooled_projections"] = torch.stack([_prompt_tensor(p, (POOLED_DIM,), "p") for p in prompts])
        return out

    return encode


def _scheduler(**kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**kw)


def _vae_kl():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=RESOLUTION, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.1, scaling_factor=0.5,
    )


def flux_pipeline(seed: int = 0):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )
    sched = _scheduler(use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
                       base_shift=0.5, max_shift=1.15)
    return FluxPipeline(scheduler=sched, vae=_vae_kl(), text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)


def sd3_pipeline(seed: int = 0):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, caption_projection_dim=16, pooled_projection_dim=POOLED_DIM, out_channels=4,
        pos_embed_max_size=8,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=_scheduler(shift=3.0), vae=_vae_kl(), text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )


def flux2_pipeline(seed: int = 0):
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, timestep_guidance_channels=16, mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=RESOLUTION, use_quant_conv=False,
        use_post_quant_conv=False, mid_block_add_attention=False,
    )
    with torch.no_grad():  # non-trivial normalisation statistics, so decode's un-normalisation is exercised
        vae.bn.running_mean.uniform_(-0.2, 0.2)
        vae.bn.running_var.uniform_(0.5, 1.5)
    return Flux2KleinPipeline(scheduler=_scheduler(use_dynamic_shifting=True), vae=vae, text_encoder=None,
                              tokenizer=None, transformer=transformer)


PIPELINES = {"flux1": flux_pipeline, "sd3": sd3_pipeline, "flux2": flux2_pipeline}


def flux2_dev_pipeline(seed: int = 0):
    """FLUX.2-dev: the Klein components with the transformer's guidance embedding, in a ``Flux2Pipeline``."""
    from diffusers import Flux2Pipeline, Flux2Transformer2DModel

    klein = flux2_pipeline(seed)
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, timestep_guidance_channels=16, mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True,
    )
    return Flux2Pipeline(scheduler=klein.scheduler, vae=klein.vae, text_encoder=None, tokenizer=None,
                         transformer=transformer)


PIPELINES["flux2-dev"] = flux2_dev_pipeline


def zimage_pipeline(seed: int = 0):
    """Z-Image: its transformer (main and refiner blocks) on the FLUX.1-style VAE, static shift as published."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=TEXT_DIM, axes_dims=[4, 6, 6], axes_lens=[256, 32, 32],
    )
    with torch.no_grad():  # the final layer starts at zero in diffusers: a random one makes the test see the model
        for p in transformer.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.1)
    return ZImagePipeline(scheduler=_scheduler(use_dynamic_shifting=False, shift=3.0), vae=_vae_kl(),
                          text_encoder=None, tokenizer=None, transformer=transformer)


PIPELINES["z-image"] = zimage_pipeline


def tiny_adapter(family: str, seed: int = 0, **kw):
    """The family's adapter around a tiny random pipeline (fp32, CPU, 16x16 images)."""
    from flowbp_train.models import adapter_class
    from flowbp_train.models.flux import FluxAdapter
    from flowbp_train.models.flux2 import Flux2Adapter
    from flowbp_train.models.sd3 import SD3Adapter

    cls = {"flux1": FluxAdapter, "sd3": SD3Adapter, "flux2": Flux2Adapter}.get(family) or adapter_class(family)
    pipe = PIPELINES[family](seed)
    kw.setdefault("resolution", RESOLUTION)
    return cls(pipe, prompt_encoder=prompt_encoder(pooled=family in ("flux1", "sd3")), **kw)


class PixelReward:
    """A differentiable stand-in for a preference reward: brightness minus red-channel contrast."""

    def score(self, images: torch.Tensor, prompts) -> torch.Tensor:
        assert images.shape[0] == len(prompts)
        return images.mean(dim=(1, 2, 3)) - 0.5 * images[:, 0].std(dim=(1, 2))


class NaNReward:
    def score(self, images: torch.Tensor, prompts) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3)) * float("nan")
