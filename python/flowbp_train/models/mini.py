"""The CPU miniature's adapter and its networks: diffusers' SD3 transformer in pixel space, a tiny text encoder.

A subclass of :class:`~flowbp_train.models.sd3.SD3Adapter`, so the velocity and CFG code is the SD3.5
one (shared/design/ALGORITHM.md section 1): timestep ``1000 sigma``, two-branch guidance
``v = v_neg + g (v_cond - v_neg)`` with the null prompt "" as the negative branch, evaluated without
gradient unless ``grad_negative``. What differs: prompts go through the tiny text encoder, there is no
VAE (latents are the images, ``[B, 1, 16, 16]`` in [-1, 1]), the schedule is unshifted, and ``decode``
clamps to [0, 1] in value only (straight-through), so the reward's gradient reaches overshooting pixels.
The networks (0.59 M-parameter ``SD3Transformer2DModel``, 43k-parameter text encoder; MINIATURE.md) and
their hash-checked weight file ``mini_base.safetensors`` are defined here, where they are used;
``flowbp-mini pretrain`` trains them (``flowbp_train.mini.pretrain``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from flowbp_train.digits import IMAGE_SIZE, TEMPLATES, WEIGHTS_DIR, WORDS
from flowbp_train.models.base import PromptBatch, VelocityFn
from flowbp_train.models.sd3 import SD3Adapter
from flowbp_train.weights import HASHES_FILE, read_safetensors, save_hashed, verified_path

BASE_FILE = "mini_base.safetensors"
#: ``caption_projection_dim`` must equal heads x head dim, and ``pos_embed_max_size`` counts patches
#: (shared/design/MINIATURE.md, pitfalls): 16x16x1, patch 2, 4 joint blocks, 4 heads x 16.
TRANSFORMER_CONFIG = dict(
    sample_size=16, patch_size=2, in_channels=1, out_channels=1, num_layers=4, num_attention_heads=4,
    attention_head_dim=16, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64,
    pos_embed_max_size=8,
)
TEXT_CONFIG = dict(width=64, out_dim=64, heads=4, ff=128)

PAD, BOS, UNK = "<pad>", "<s>", "<unk>"
#: The vocabulary: special tokens, template words, digit words (fixed order: token ids are saved weights).
VOCAB: tuple[str, ...] = (PAD, BOS, UNK) + tuple(
    dict.fromkeys(w for t in TEMPLATES for w in t.replace("{}", "").split())
) + WORDS
MAX_TOKENS = 5  # the begin token + the longest prompt (4 words)


def tokenize(prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[B, MAX_TOKENS]`` and a validity mask (True for real tokens); unknown words map to
    ``<unk>``, prompts longer than ``MAX_TOKENS - 1`` words raise ValueError."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a sequence of str")
    index = {w: i for i, w in enumerate(VOCAB)}
    ids = torch.zeros(len(prompts), MAX_TOKENS, dtype=torch.long)
    mask = torch.zeros(len(prompts), MAX_TOKENS, dtype=torch.bool)
    for b, p in enumerate(prompts):
        words = p.strip().lower().split()
        if len(words) > MAX_TOKENS - 1:
            raise ValueError(f"prompts may have at most {MAX_TOKENS - 1} words, got {p!r}")
        toks = [index[BOS]] + [index.get(w, index[UNK]) for w in words]
        ids[b, : len(toks)] = torch.tensor(toks)
        mask[b, : len(toks)] = True
    return ids, mask


class TinyTextEncoder(nn.Module):
    """Token + position embedding, one pre-norm transformer layer, per-token and pooled projections.

    It maps a prompt to what ``SD3Transformer2DModel`` takes from its text encoders:
    ``encoder_hidden_states`` ``[B, L, dim]`` and ``pooled_projections`` ``[B, dim]`` (a masked mean over
    the tokens). A begin token is always present, so the null prompt "" has a well-defined embedding."""

    def __init__(self, width: int = 64, out_dim: int = 64, heads: int = 4, ff: int = 128):
        super().__init__()
        self.tok = nn.Embedding(len(VOCAB), width)
        self.pos = nn.Parameter(torch.zeros(MAX_TOKENS, width))
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, ff), nn.GELU(), nn.Linear(ff, width))
        self.norm_out = nn.LayerNorm(width)
        self.proj_tokens = nn.Linear(width, out_dim)
        self.proj_pooled = nn.Linear(width, out_dim)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids``, ``mask`` ``[B, L]`` -> (``encoder_hidden_states`` ``[B, L, out]``, ``pooled`` ``[B, out]``).
        Padded positions are zeroed in ``encoder_hidden_states`` (the transformer attends to them)."""
        h = self.tok(ids) + self.pos[: ids.shape[1]]
        q = self.norm1(h)
        a, _ = self.attn(q, q, q, key_padding_mask=~mask, need_weights=False)
        h = h + a
        h = h + self.mlp(self.norm2(h))
        h = self.norm_out(h)
        m = mask.unsqueeze(-1).to(h.dtype)
        tokens = self.proj_tokens(h) * m
        pooled = self.proj_pooled((h * m).sum(1) / m.sum(1))
        return tokens, pooled

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize and encode on the module's device."""
        ids, mask = tokenize(prompts)
        dev = self.tok.weight.device
        return self.forward(ids.to(dev), mask.to(dev))


def build_transformer():
    """A freshly initialised tiny ``SD3Transformer2DModel`` (initialisation follows torch's RNG)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**TRANSFORMER_CONFIG)


def build_text_encoder() -> TinyTextEncoder:
    return TinyTextEncoder(**TEXT_CONFIG)


def save_base(transformer, text_encoder, path: str | Path, metadata: dict | None = None) -> str:
    """Save both networks into one hash-recorded safetensors file (prefixes ``transformer.``,
    ``text_encoder.``). Returns the sha256."""
    state = {f"transformer.{k}": v for k, v in transformer.state_dict().items()}
    state.update({f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()})
    meta = {"transformer_config": TRANSFORMER_CONFIG, "text_config": TEXT_CONFIG, **(metadata or {})}
    return save_hashed(state, path, meta)


def load_base(weights_dir: str | Path | None = None, name: str = BASE_FILE):
    """(transformer, text_encoder) in eval mode, fp32, CPU, from the hash-checked file (default: the
    committed one)."""
    state = read_safetensors(verified_path(name, weights_dir if weights_dir is not None else WEIGHTS_DIR))
    tr, te = build_transformer(), build_text_encoder()
    tr.load_state_dict({k[12:]: v for k, v in state.items() if k.startswith("transformer.")})
    te.load_state_dict({k[13:]: v for k, v in state.items() if k.startswith("text_encoder.")})
    for m in (tr, te):
        m.eval().requires_grad_(False)
    return tr, te

#: Names accepted as ``pretrained_model_name_or_path`` for the committed weights.
BUILTIN_NAMES = ("mini", "builtin", "flowbp-mini")
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
           "float64": torch.float64}


class MiniAdapter(SD3Adapter):
    """Adapter of the miniature (family ``"mini"``).

    Args:
        transformer: the tiny ``SD3Transformer2DModel`` (:func:`build_transformer`).
        text_encoder: the :class:`TinyTextEncoder` (frozen here).
        guidance_scale: CFG scale ``g`` (1.0: the conditional branch only, no negative forward).
        shift: static schedule shift (1.0: unshifted; 10 steps suffice at 16x16, MINIATURE.md).
        device, dtype: where and in which dtype the transformer runs.
    """

    family = "mini"
    default_lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
    default_guidance = 1.0
    default_shift = 1.0
    image_size = IMAGE_SIZE

    def __init__(self, transformer: torch.nn.Module, text_encoder: torch.nn.Module, *, guidance_scale: float = 1.0,
                 shift: float = 1.0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or guidance_scale <= 0:
            raise ValueError(f"guidance_scale must be a number > 0, got {guidance_scale!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.text_encoder = text_encoder.to(device).eval().requires_grad_(False)
        super().__init__(None, transformer=transformer, vae=None, resolution=self.image_size,
                         guidance_scale=guidance_scale, shift=shift, device=device, dtype=dtype,
                         prompt_encoder=self._encode_text)

    def _encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tok, pooled = self.text_encoder.encode(prompts)
        return {"encoder_hidden_states": tok, "pooled_projections": pooled}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path | None = "mini", *,
                        guidance_scale: float | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str | None = None, resolution: int | None = None,
                        **_ignored) -> MiniAdapter:
        """Load the committed weights (``"mini"``, ``"builtin"`` or None) or those of a folder holding
        ``mini_base.safetensors`` and its ``sha256.json``. ``resolution``, when given, must be 16; other
        trainer keywords (``revision``, ``max_sequence_length``) do not apply and are ignored."""
        if resolution is not None and resolution != cls.image_size:
            raise ValueError(f"resolution: the miniature generates {cls.image_size}x{cls.image_size} images, "
                             f"got {resolution}")
        name = pretrained_model_name_or_path
        if name is not None and not isinstance(name, (str, Path)):
            raise TypeError(f"pretrained_model_name_or_path must be a str or path, got {type(name).__name__}")
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
            dtype = _DTYPES[dtype]
        transformer, text_encoder = load_base(None if name is None or str(name) in BUILTIN_NAMES else Path(name))
        return cls(transformer, text_encoder, guidance_scale=cls.default_guidance if guidance_scale is None
                   else guidance_scale, device=device, dtype=dtype or torch.float32)

    @classmethod
    def check_files(cls, pretrained_model_name_or_path: str | Path | None = "mini", *,
                    key: str = "pretrained_model_name_or_path", **_ignored) -> None:
        """The committed weights, or a folder holding ``mini_base.safetensors`` and its ``sha256.json``."""
        name = pretrained_model_name_or_path
        if name is None or str(name) in BUILTIN_NAMES:
            return
        folder = Path(name)
        for f in (BASE_FILE, HASHES_FILE):
            if not (folder / f).is_file():
                raise FileNotFoundError(f"{key}: {folder / f} not found (a miniature folder holds {BASE_FILE} and "
                                        f"{HASHES_FILE}; or pass {key}=mini for the committed weights)")

    def load_lora_weights(self, path: str | Path, alpha: float | None = None) -> None:
        """Attach a LoRA saved by the trainer (file or folder; used by ``flowbp-eval --lora``, ``flowbp-mini
        sample --lora`` and ``report``). ``alpha`` defaults to the file's recorded ``lora_alpha`` (else the
        rank). There is no pipeline here, so :func:`flowbp_train.weights.attach_lora` attaches it."""
        from flowbp_train.weights import attach_lora

        attach_lora(self.transformer, path, alpha=alpha)

    def encode_prompts(self, prompts) -> PromptBatch:
        """As SD3: token and pooled features per prompt; the null prompt's as the negative branch."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of str, got a single str")
        return super().encode_prompts(prompts)

    def initial_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        return super().initial_noise(batch_size, generator)

    def velocity_fn(self, batch: PromptBatch, sigmas: torch.Tensor, *, grad_negative: bool = False) -> VelocityFn:
        if not isinstance(batch, PromptBatch):
            raise TypeError(f"batch must be a PromptBatch from encode_prompts, got {type(batch).__name__}")
        return super().velocity_fn(batch, sigmas, grad_negative=grad_negative)

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
