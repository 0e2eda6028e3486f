"""The one interface every model family implements (FLUX.1, SD3.5, FLUX.2-Klein, the CPU miniature).

An adapter owns the diffusers components of one family and exposes exactly what the engine and the
trainer need: prompt encoding (cached per run), initial noise, the sigma schedule, a velocity function
``velocity_fn(x, i)`` with the family's guidance, and a differentiable decode to images in [0, 1].
``flowbp_kernels`` never sees diffusers: it only sees ``velocity_fn`` and ``reward_fn``.
"""

from __future__ import annotations

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

    def offload_text_encoders(self) -> None:
        """Move text encoders to CPU once prompts are encoded (no-op by default)."""
