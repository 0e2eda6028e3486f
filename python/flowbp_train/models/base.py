"""The one interface every model family implements (FLUX.1, SD3.5, FLUX.2-Klein, the CPU miniature).

An adapter owns the diffusers components of one family and exposes exactly what the engine and the
trainer need: prompt encoding (cached per run), initial noise, the sigma schedule, a velocity function
``velocity_fn(x, i)`` with the family's guidance, and a differentiable decode to images in [0, 1].
``flowbp_kernels`` never sees diffusers: it only sees ``velocity_fn`` and ``reward_fn``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

VelocityFn = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class PromptBatch:
    """Encoded prompts of one batch (family-specific tensors in ``tensors``), with the raw text."""

    prompts: list[str]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    negative: dict[str, torch.Tensor] | None = None  # the empty-prompt branch for two-branch CFG

    def __len__(self) -> int:
        return len(self.prompts)


class FlowAdapter(ABC):
    """Base class of the model adapters.

    Attributes:
        family: ``"flux1"``, ``"sd3"``, ``"flux2"`` or ``"mini"``.
        transformer: the velocity network (``nn.Module``) that is trained.
        default_lora_targets: diffusers' default LoRA target module names for this family.
        guidance_scale: the family's guidance (FLUX.1 embedded guidance; SD3.5 / FLUX.2 two-branch CFG).
        device, dtype: where and in which dtype the transformer runs.
    """

    family: str = ""
    default_lora_targets: tuple[str, ...] = ()
    transformer: torch.nn.Module
    guidance_scale: float = 1.0
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> PromptBatch:
        """Encode prompts (no grad, text encoders frozen), caching each prompt's embedding per run."""

    @abstractmethod
    def initial_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x_0`` of the rollout in the layout ``velocity_fn`` takes (FLUX: packed tokens), fp32."""

    @abstractmethod
    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The family's shifted schedule (``flowbp_kernels.flow_sigmas``) for the adapter's resolution."""

    @abstractmethod
    def velocity_fn(self, batch: PromptBatch, sigmas: torch.Tensor, *, grad_negative: bool = False) -> VelocityFn:
        """``velocity_fn(x, i) -> v`` at step i with the family's guidance; the negative CFG branch runs
        without gradient unless ``grad_negative``. Output in the transformer dtype."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (the ``velocity_fn`` layout) -> images ``[B, 3, H, W]`` in [0, 1], differentiable,
        VAE frozen."""

    def final_report(self, output_dir: str | os.PathLike, cfg) -> None:
        """Family-specific outputs at the end of a training run (the miniature writes its before/after
        grids, curves and summary); nothing by default."""
        return None

    def offload_text_encoders(self) -> None:
        """Move text encoders to CPU once prompts are encoded (no-op by default)."""
        return None

    # ------------------------------------------------------------------ shared helpers (trainer side)
    #: the diffusers pipeline class whose ``save_lora_weights`` / ``load_lora_weights`` define the LoRA
    #: file format of this family (None: the adapter overrides :meth:`save_lora_weights`).
    pipeline_class: type | None = None
    #: the loaded pipeline, when the adapter was built from one (sample images, model card).
    pipeline = None

    #: set by the trainer to the data-parallel wrapper (DDP) that velocity functions must call
    _forward_module: torch.nn.Module | None = None

    @property
    def forward_module(self) -> torch.nn.Module:
        """What ``velocity_fn`` calls: the transformer, or its DDP wrapper when training data-parallel."""
        return self._forward_module if self._forward_module is not None else self.transformer

    def set_forward_module(self, module: torch.nn.Module | None) -> None:
        self._forward_module = None if module is self.transformer else module

    def _init_packed(self, pipeline, pipeline_class, *, resolution: int, guidance_scale: float | None,
                     device: str | torch.device, dtype: torch.dtype, max_sequence_length: int | None,
                     prompt_encoder) -> None:
        """The attributes the FLUX families share (VAE latents packed 2x2 into tokens)."""
        self.pipeline = pipeline
        self.pipeline_class = pipeline_class
        self.transformer = pipeline.transformer
        self.vae = pipeline.vae
        self.device = torch.device(device)
        self.dtype = dtype
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if not isinstance(resolution, int) or resolution % (2 * self.vae_scale_factor):
            raise ValueError(f"resolution must be a multiple of {2 * self.vae_scale_factor}, got {resolution!r}")
        self.resolution = resolution
        self.guidance_scale = float(self.default_guidance if guidance_scale is None else guidance_scale)
        self.max_sequence_length = max_sequence_length or 512
        self.prompt_encoder = prompt_encoder

    def enable_gradient_checkpointing(self) -> None:
        """Transformer (and VAE, when there is one) gradient checkpointing."""
        if hasattr(self.transformer, "enable_gradient_checkpointing"):
            self.transformer.enable_gradient_checkpointing()
        vae = getattr(self, "vae", None)
        if vae is not None and hasattr(vae, "enable_gradient_checkpointing"):
            vae.enable_gradient_checkpointing()

    def save_lora_weights(self, save_directory: str | os.PathLike, transformer_lora_layers: dict) -> None:
        """Write ``pytorch_lora_weights.safetensors`` in diffusers' format (loadable with
        ``pipe.load_lora_weights(save_directory)``); keys are the peft state dict of the transformer."""
        if self.pipeline_class is None:
            raise NotImplementedError(f"{type(self).__name__} has no pipeline_class; override save_lora_weights")
        self.pipeline_class.save_lora_weights(
            save_directory, transformer_lora_layers=transformer_lora_layers, safe_serialization=True
        )

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Every module other than the transformer that must stay frozen (VAE, text encoders)."""
        return [m for m in (getattr(self, "vae", None),) if m is not None]

    def _encode_cached(self, prompts: Sequence[str], encode: Callable[[list[str]], dict[str, torch.Tensor]]
                       ) -> dict[str, torch.Tensor]:
        """Encode only the prompts not seen yet in this run (kept on CPU), then gather the batch."""
        cache: dict[str, dict[str, torch.Tensor]] = self.__dict__.setdefault("_prompt_cache", {})
        missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            with torch.no_grad():
                out = encode(missing)
            for q, p in enumerate(missing):
                cache[p] = {k: v[q : q + 1].detach().to("cpu") for k, v in out.items()}
        keys = cache[prompts[0]].keys()
        return {k: torch.cat([cache[p][k] for p in prompts]).to(self.device) for k in keys}


def place_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move to ``device``; cast to ``dtype`` only when some floating parameter differs (diffusers warns
    on every cast)."""
    module.to(device)
    if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        module.to(dtype)
    return module


def guided_velocity(
    forward: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor],
    x: torch.Tensor,
    cond: dict[str, torch.Tensor],
    negative: dict[str, torch.Tensor] | None,
    guidance_scale: float,
    grad_negative: bool,
) -> torch.Tensor:
    """Two-branch classifier-free guidance ``v_neg + g (v_cond - v_neg)``.

    The negative branch runs under no_grad at the detached input unless ``grad_negative`` (the
    reference's ``cfg_detach_neg``); ``g == 1`` or no negative embeddings gives the conditional branch.
    """
    v_cond = forward(x, cond)
    if negative is None or guidance_scale == 1.0:
        return v_cond
    if grad_negative:
        v_neg = forward(x, negative)
    else:
        with torch.no_grad():
            v_neg = forward(x.detach(), negative)
    return v_neg + guidance_scale * (v_cond - v_neg)


def load_pipeline(pipeline_cls, pretrained_model_name_or_path: str, *, dtype: torch.dtype,
                  revision: str | None = None, local_files_only: bool | None = None, **kwargs):
    """``pipeline_cls.from_pretrained`` with a clear, fast error when the weights are not reachable.

    A local folder is loaded as is. A model id is looked up in the Hugging Face cache first; without
    network (or with ``HF_HUB_OFFLINE=1`` / ``local_files_only=True``) a missing model fails at once with
    a message that says how to provide local weights.
    """
    path = str(pretrained_model_name_or_path)
    how = (f"download it where there is network (e.g. `hf download {path} --local-dir DIR`) and pass "
           f"pretrained_model_name_or_path=DIR")
    if os.path.isdir(path):
        return pipeline_cls.from_pretrained(path, torch_dtype=dtype, **kwargs)
    if path.startswith((".", "/", "~")) or os.sep + os.sep in path or path.count("/") > 1:
        raise FileNotFoundError(f"pretrained_model_name_or_path: local folder not found: {path}")
    offline = local_files_only or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return pipeline_cls.from_pretrained(path, torch_dtype=dtype, revision=revision, local_files_only=True,
                                            **kwargs)
    except Exception as exc:  # not in the cache (or incomplete): try the hub unless offline
        if offline:
            raise OSError(f"pretrained_model_name_or_path: {path!r} is not a local folder and is not in the "
                          f"Hugging Face cache (offline mode); {how}") from exc
    try:
        return pipeline_cls.from_pretrained(path, torch_dtype=dtype, revision=revision, **kwargs)
    except Exception as exc:
        raise OSError(f"pretrained_model_name_or_path: could not load {path!r} from the Hugging Face hub "
                      f"({type(exc).__name__}); {how}") from exc
