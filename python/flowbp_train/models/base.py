"""The one interface every model family implements (FLUX.1, SD3.5, FLUX.2-Klein, the CPU miniature).

An adapter owns the diffusers components of one family and exposes exactly what the engine and the
trainer need: prompt encoding (cached per run; the text encoders move to the training device in the
model dtype while they encode and back to the CPU afterwards), initial noise, the sigma schedule, a
velocity function ``velocity_fn(x, i)`` with the family's guidance, a differentiable decode to images in
[0, 1], its default LoRA targets, and ``check_files`` (every file of the model, found before loading).
``flowbp_kernels`` never sees diffusers: it only sees ``velocity_fn`` and ``reward_fn``.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
        family: the registry name (``"flux1"``, ``"sd3"``, ``"flux2"``, ``"mini"``, ...).
        transformer: the velocity network (``nn.Module``) that is trained.
        default_lora_targets: LoRA target module names (suffixes, peft's matching) for this family;
            :meth:`lora_targets` adds the ones that must be named per block.
        guidance_scale: the family's guidance (FLUX.1 embedded guidance; SD3.5 / FLUX.2 two-branch CFG).
        two_branch_cfg: the family guides by two-branch classifier-free guidance (SD3.5, FLUX.2, the
            miniature), not by an embedded guidance input (FLUX.1); ``cfg_grad_compensate`` reads it.
        device, dtype: where and in which dtype the transformer runs.
        text_encoder_names: the pipeline attributes holding text encoders (moved to ``device`` to encode).
        encode_seconds, encoded_prompts: time spent in the text encoders and prompts encoded so far.
    """

    family: str = ""
    default_lora_targets: tuple[str, ...] = ()
    default_max_sequence_length: int = 512
    text_encoder_names: tuple[str, ...] = ()
    transformer: torch.nn.Module
    guidance_scale: float = 1.0
    two_branch_cfg: bool = True
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    encode_seconds: float = 0.0
    encoded_prompts: int = 0
    #: the pipeline class a model folder of this family holds (``model_index.json``), for ``check_files``
    pipeline_class_name: str | None = None

    @property
    def cfg_multiplier(self) -> float:
        """What the conditional branch's velocity is multiplied by under CFG (``cfg_grad_compensate`` divides
        the loss by it): ``guidance_scale`` in the ``v_u + g (v_c - v_u)`` form of most pipelines; a family
        whose pipeline writes it otherwise (Z-Image: ``v_c + g (v_c - v_u)``) overrides this."""
        return self.guidance_scale

    @classmethod
    def diffusers_pipeline_class(cls) -> type:
        """The diffusers class named by ``pipeline_class_name`` (imported on first use)."""
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, *, dtype: torch.dtype = torch.bfloat16,
                        revision: str | None = None, local_files_only: bool | None = None, **kw) -> FlowAdapter:
        """Load the family's pipeline (``pipeline_class_name``; a local folder or a cached model id) and wrap it;
        ``kw`` go to the adapter's constructor."""
        pipe = load_pipeline(cls.diffusers_pipeline_class(), pretrained_model_name_or_path, dtype=dtype,
                             revision=revision, local_files_only=local_files_only)
        return cls(pipe, dtype=dtype, **kw)

    @classmethod
    def lora_targets(cls, transformer: torch.nn.Module) -> list[str]:
        """The default LoRA target names for ``transformer`` (``default_lora_targets``; a family adds the
        modules whose suffix is ambiguous, named per block)."""
        return list(cls.default_lora_targets)

    @classmethod
    def check_files(cls, pretrained_model_name_or_path: str, *, revision: str | None = None,
                    key: str = "pretrained_model_name_or_path", local_files_only: bool | None = None,
                    **_ignored) -> Path | None:
        """Check that every file the family's ``from_pretrained`` reads exists: the folder (or the cached
        snapshot of a model id), its ``model_index.json`` naming ``pipeline_class_name`` and each
        component's config and weights. No download, no import of diffusers; raises FileNotFoundError /
        ValueError with one line naming ``key``. Returns the pipeline folder (None: nothing to check, or a
        model id still to be downloaded). Nothing is checked without ``pipeline_class_name``."""
        if cls.pipeline_class_name is None:
            return None
        from flowbp_train.models.files import check_pipeline_files

        return check_pipeline_files(str(pretrained_model_name_or_path), cls.pipeline_class_name,
                                    family=cls.family, revision=revision, key=key,
                                    local_files_only=local_files_only)

    #: the prompt of the negative branch of two-branch CFG (the pipelines' default: empty)
    negative_prompt: str = ""

    @property
    def uses_cfg(self) -> bool:
        """Whether the pipeline runs a negative branch: two-branch CFG with a scale above 1 (a family whose
        pipeline decides otherwise overrides this)."""
        return self.two_branch_cfg and self.guidance_scale > 1.0

    def encode_prompts(self, prompts: Sequence[str]) -> PromptBatch:
        """Encode prompts (no grad, text encoders frozen), caching each prompt's embedding per run; the
        negative prompt too when ``uses_cfg``. The family's ``_encode(prompts) -> tensors`` does the work."""
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of strings")
        cond = self._encode_cached(prompts, self._encode)
        negative = (self._encode_cached([self.negative_prompt] * len(prompts), self._encode) if self.uses_cfg
                    else None)
        return PromptBatch(prompts, cond, negative)

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The family's prompt encoding (the tensors its velocity reads), for :meth:`encode_prompts`."""
        raise NotImplementedError(f"{type(self).__name__} encodes no prompts")

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

    def text_encoders(self) -> list[torch.nn.Module]:
        """The pipeline's text encoders (``text_encoder_names``), in order."""
        pipe = getattr(self, "pipeline", None)
        return [m for m in (getattr(pipe, n, None) for n in self.text_encoder_names) if m is not None]

    def offload_text_encoders(self) -> None:
        """Move the text encoders to the CPU (once prompts are encoded; they come back when needed)."""
        for enc in self.text_encoders():
            enc.to("cpu")

    def placed_modules(self) -> list[torch.nn.Module]:
        """The modules the adapter keeps on its device: the transformer and the VAE."""
        mods = (getattr(self, "transformer", None), getattr(self, "vae", None))
        return [m for m in mods if isinstance(m, torch.nn.Module)]

    def park_on_host(self) -> None:
        """Move the transformer and the VAE to the CPU, so that the text encoders have the device to
        themselves while the setup encodes every prompt (the device then holds the larger of the two, not
        their sum); :meth:`unpark` brings them back. A copy both ways: no value or dtype changes."""
        for m in self.placed_modules():
            m.to("cpu")

    def unpark(self) -> None:
        """The transformer and the VAE back on the adapter's device (after :meth:`park_on_host`)."""
        for m in self.placed_modules():
            m.to(self.device)

    def encode_all(self, prompts: Sequence[str], batch_size: int, *, park_model: bool = True) -> None:
        """Encode every prompt once, ``batch_size`` at a time (bounds the encoders' activation memory),
        then move the text encoders to the CPU: every later batch comes from the cache. ``park_model``:
        the transformer and the VAE wait in host memory meanwhile (:meth:`park_on_host`), so the device
        holds the text encoders or the model, never both; only when there are text encoders to place (a
        given ``prompt_encoder`` encodes with the model where it is)."""
        park = park_model and bool(self.text_encoders()) and getattr(self, "prompt_encoder", None) is None
        if park:
            self.park_on_host()
        try:
            for i in range(0, len(prompts), batch_size):
                self.encode_prompts(list(prompts[i : i + batch_size]))
            self.offload_text_encoders()
            if park:  # only the encoders' segments are cached now: give them back before the model returns
                release_cached_device_memory(self.device)
        finally:
            if park:
                self.unpark()

    # ------------------------------------------------------------------ shared helpers (trainer side)
    #: the family's diffusers pipeline class (None: the adapter was built from components)
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
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length
        self.prompt_encoder = prompt_encoder

    def enable_gradient_checkpointing(self) -> None:
        """Transformer (and VAE, when there is one) gradient checkpointing."""
        if hasattr(self.transformer, "enable_gradient_checkpointing"):
            self.transformer.enable_gradient_checkpointing()
        vae = getattr(self, "vae", None)
        if vae is not None and hasattr(vae, "enable_gradient_checkpointing"):
            vae.enable_gradient_checkpointing()

    def save_lora_weights(self, save_directory: str | os.PathLike, transformer_lora_layers: dict, *,
                          weight_name: str | None = None, lora_alpha: float | None = None,
                          info: dict | None = None) -> None:
        """Write ``pytorch_lora_weights.safetensors`` (or ``weight_name``) in diffusers' format, loadable
        with ``pipe.load_lora_weights(save_directory)``: keys ``transformer.`` + the peft state dict of the
        transformer, and diffusers' LoRA metadata with ``r`` and ``lora_alpha`` (None: the rank), so the
        trained scale ``alpha / r`` is reproduced by every loader (``flowbp_train.weights``)."""
        from flowbp_train.weights import LORA_FILE, save_lora_file

        save_lora_file(Path(save_directory) / (weight_name or LORA_FILE), transformer_lora_layers,
                       lora_alpha=lora_alpha, info={"family": self.family, **(info or {})})

    def load_lora_weights(self, path: str | os.PathLike) -> None:
        """Attach the LoRA file ``path`` to the transformer through the stock pipeline's
        ``load_lora_weights`` (which reads the file's ``lora_alpha``)."""
        if getattr(self, "pipeline", None) is None or not hasattr(self.pipeline, "load_lora_weights"):
            raise ValueError(f"--lora: the {self.family!r} adapter has no pipeline to load LoRA weights with")
        p = Path(path)
        self.pipeline.load_lora_weights(str(p.parent), weight_name=p.name)

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Every module other than the transformer that must stay frozen (VAE, text encoders)."""
        return [m for m in (getattr(self, "vae", None),) if m is not None]

    def _encode_cached(self, prompts: Sequence[str], encode: Callable[[list[str]], dict[str, torch.Tensor]]
                       ) -> dict[str, torch.Tensor]:
        """Encode only the prompts not seen yet in this run (kept on CPU), then gather the batch. The text
        encoders run on ``device`` in ``dtype`` (T5-XXL or Qwen3-8B on a CPU would take minutes)."""
        cache: dict[str, dict[str, torch.Tensor]] = self.__dict__.setdefault("_prompt_cache", {})
        missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            t0 = time.perf_counter()
            if getattr(self, "prompt_encoder", None) is None:  # a given prompt_encoder replaces them
                for enc in self.text_encoders():
                    place_text_encoder(enc, self.device, self.dtype)
            with torch.no_grad():
                out = encode(missing)
            for q, p in enumerate(missing):
                cache[p] = {k: v[q : q + 1].detach().to("cpu") for k, v in out.items()}
            self.encode_seconds += time.perf_counter() - t0
            self.encoded_prompts += len(missing)
        gathered = self._gather_prompts([cache[p] for p in prompts], list(prompts))
        return {k: v.to(self.device) for k, v in gathered.items()}

    def _gather_prompts(self, entries: list[dict[str, torch.Tensor]], prompts: list[str]) -> dict[str, torch.Tensor]:
        """One batch from the cached entries of its ``prompts`` (each ``[1, ...]``): concatenated. A family
        whose embeddings vary in length (Qwen-Image) pads them here."""
        return {k: torch.cat([e[k] for e in entries]) for k in entries[0]}


def encoded_where(adapter: FlowAdapter) -> str:
    """The end of the encode log line: where the modules were (nothing on a CPU run)."""
    if torch.device(adapter.device).type == "cpu":
        return ""
    return "; text encoders offloaded to the CPU, the transformer and the VAE waited there meanwhile"


def release_cached_device_memory(device: str | torch.device) -> None:
    """``torch.cuda.empty_cache()`` on a CUDA device (nothing elsewhere): the caching allocator gives its
    free segments back, so that the modules placed next get segments of their own sizes rather than the
    fragments of what left (the text encoders' segments, once the prompts are encoded)."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def place_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move to ``device`` (when some parameter is elsewhere); cast to ``dtype`` only when some floating
    parameter differs (diffusers warns on every cast)."""
    params = list(module.parameters())
    if any(p.device != device for p in params):
        module.to(device)
    if any(p.is_floating_point() and p.dtype != dtype for p in params):
        module.to(dtype)
    return module


def place_text_encoder(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a text encoder to ``device``; cast it to ``dtype`` only when none of its weights has that dtype
    (a pipeline loaded in ``dtype`` keeps what transformers chose, e.g. T5's ``wo`` in fp32 under fp16),
    and after a cast to fp16 put its ``_keep_in_fp32_modules`` back in fp32 (T5's feed-forward overflows)."""
    params = [p for p in module.parameters() if p.is_floating_point()]
    if any(p.device != device for p in module.parameters()):
        module.to(device)
    if params and dtype not in {p.dtype for p in params}:
        module.to(dtype)
        if dtype == torch.float16:
            keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
            for name, sub in module.named_modules():
                if name.rsplit(".", 1)[-1] in keep:
                    sub.float()
    return module


def scheduler_sigmas(pipeline, image_seq_len: int, num_steps: int) -> torch.Tensor:
    """``linspace(1, 1/N, N)`` shifted as the pipeline's ``FlowMatchEulerDiscreteScheduler`` config says: the
    static ``shift`` unless ``use_dynamic_shifting``, else ``mu`` from the image sequence length (FLUX.1's
    ``calculate_shift`` with the config's ``base/max_image_seq_len`` and ``base/max_shift``)."""
    from flowbp_kernels import flow_sigmas, flux_mu

    sc = pipeline.scheduler.config if getattr(pipeline, "scheduler", None) is not None else {}
    if sc and not sc.get("use_dynamic_shifting", True):
        return flow_sigmas(num_steps, shift=float(sc.get("shift", 1.0)))
    mu = flux_mu(image_seq_len, sc.get("base_image_seq_len", 256), sc.get("max_image_seq_len", 4096),
                 sc.get("base_shift", 0.5), sc.get("max_shift", 1.15))
    return flow_sigmas(num_steps, mu=mu)


def guided_velocity(
    forward: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor],
    x: torch.Tensor,
    cond: dict[str, torch.Tensor],
    negative: dict[str, torch.Tensor] | None,
    guidance_scale: float,
    grad_negative: bool,
    *,
    norm_rescale: bool = False,
) -> torch.Tensor:
    """Two-branch classifier-free guidance ``v_neg + g (v_cond - v_neg)``.

    The negative branch runs under no_grad at the detached input unless ``grad_negative`` (the
    reference's ``cfg_detach_neg``); ``g <= 1`` (as the stock pipelines: guidance is on for ``g > 1``) or
    no negative embeddings gives the conditional branch. ``norm_rescale`` (QwenImagePipeline's true CFG)
    scales the guided velocity of each token to the norm of the conditional one (norms over the last axis).
    """
    v_cond = forward(x, cond)
    if negative is None or guidance_scale <= 1.0:
        return v_cond
    if grad_negative:
        v_neg = forward(x, negative)
    else:
        with torch.no_grad():
            v_neg = forward(x.detach(), negative)
    guided = v_neg + guidance_scale * (v_cond - v_neg)
    if norm_rescale:
        guided = guided * (v_cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))
    return guided


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """``{"dtype": dtype}`` where the installed diffusers takes it (it deprecates ``torch_dtype`` and warns
    on every load; diffusers 1.0 drops it), else ``{"torch_dtype": dtype}``."""
    try:
        from diffusers.utils import deprecation_utils

        takes_dtype = hasattr(deprecation_utils, "_resolve_dtype")
    except ImportError:
        takes_dtype = False
    return {"dtype": dtype} if takes_dtype else {"torch_dtype": dtype}


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
        return pipeline_cls.from_pretrained(path, **dtype_kwargs(dtype), **kwargs)
    if path.startswith((".", "/", "~")) or os.sep + os.sep in path or path.count("/") > 1:
        raise FileNotFoundError(f"pretrained_model_name_or_path: local folder not found: {path}")
    offline = local_files_only or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return pipeline_cls.from_pretrained(path, **dtype_kwargs(dtype), revision=revision, local_files_only=True,
                                            **kwargs)
    except Exception as exc:  # not in the cache (or incomplete): try the hub unless offline
        if offline:
            raise OSError(f"pretrained_model_name_or_path: {path!r} is not a local folder and is not in the "
                          f"Hugging Face cache (offline mode); {how}") from exc
    try:
        return pipeline_cls.from_pretrained(path, **dtype_kwargs(dtype), revision=revision, **kwargs)
    except Exception as exc:
        raise OSError(f"pretrained_model_name_or_path: could not load {path!r} from the Hugging Face hub "
                      f"({type(exc).__name__}); {how}") from exc
