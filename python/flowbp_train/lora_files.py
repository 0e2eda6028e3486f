"""LoRA files in diffusers' format, carrying what every loader needs to reproduce the trained velocity.

A file holds the peft weights exactly as trained under diffusers' keys (``transformer.<module>.lora_A.weight``
/ ``lora_B.weight``, what ``<Pipeline>.save_lora_weights`` writes) and two safetensors metadata entries:
``lora_adapter_metadata``, diffusers' own (read by ``load_lora_weights`` since diffusers 0.34): the LoRA
config with ``r`` and ``lora_alpha``, so a LoRA trained with ``lora_alpha != rank`` reloads at its scale
``alpha / r``; and ``flowbp``: which weights these are (``raw`` or ``ema``), the step, family and method.
A checkpoint keeps the raw weights (what resuming needs) and, with EMA, the EMA weights beside them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default weight name
EMA_LORA_FILE = "pytorch_lora_weights_ema.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
FLOWBP_METADATA_KEY = "flowbp"
WEIGHTS = ("raw", "ema")
#: ``--lora-weights`` choices: ``auto`` takes the EMA weights when a folder has them (the authors evaluate
#: the EMA model), else the folder's default file
LORA_WEIGHT_CHOICES = ("auto", "ema", "raw")

__all__ = ["EMA_LORA_FILE", "LORA_FILE", "LORA_WEIGHT_CHOICES", "lora_rank_and_targets", "read_lora_file",
           "read_lora_metadata", "resolve_lora_file", "save_lora_file"]


def lora_rank_and_targets(state: dict[str, torch.Tensor]) -> tuple[int, list[str]]:
    """The LoRA rank and the names of the modules carrying a LoRA, read from the tensors (keys with or
    without the ``transformer.`` prefix)."""
    a_keys = [k for k in state if k.endswith(".lora_A.weight")]
    if not a_keys:
        raise ValueError("no lora_A weights in the LoRA state dict")
    ranks = {int(state[k].shape[0]) for k in a_keys}
    if len(ranks) != 1:
        raise ValueError(f"mixed LoRA ranks {sorted(ranks)} in one file are not supported")
    targets = sorted(k.removesuffix(".lora_A.weight").removeprefix("transformer.") for k in a_keys)
    return ranks.pop(), targets


def save_lora_file(path: str | os.PathLike, state: dict[str, torch.Tensor], *, lora_alpha: float | None = None,
                   info: dict | None = None, prefix: str = "transformer") -> Path:
    """Write a peft state dict (``get_peft_model_state_dict`` keys) as a diffusers LoRA file.

    Args:
        path: the ``.safetensors`` file to write (its folder is created).
        state: module-relative LoRA tensors; written contiguous, keys prefixed with ``prefix.``.
        lora_alpha: the LoRA alpha the weights were trained with (None: the rank, scale 1).
        info: the ``flowbp`` metadata (``weights``: ``raw``/``ema``, ``step``, ...), JSON-serialisable.
    """
    from safetensors.torch import save_file

    rank, targets = lora_rank_and_targets(state)
    alpha = float(rank if lora_alpha is None else lora_alpha)
    if info is not None and info.get("weights") not in (None, *WEIGHTS):
        raise ValueError(f"info['weights']: expected one of {WEIGHTS}, got {info['weights']!r}")
    # the LoraConfig keys diffusers passes to peft's LoraConfig(**...): a short portable subset
    config = {"r": rank, "lora_alpha": alpha, "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
              "init_lora_weights": True}
    metadata = {"format": "pt",
                DIFFUSERS_METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in config.items()}, sort_keys=True),
                FLOWBP_METADATA_KEY: json.dumps({"rank": rank, "lora_alpha": alpha, **(info or {})}, sort_keys=True)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{prefix}.{k}": v.detach().contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata=metadata)
    return path


def read_lora_metadata(path: str | os.PathLike) -> tuple[dict | None, dict | None]:
    """``(lora config, flowbp info)`` of a LoRA file; None for an entry the file does not have."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    config = info = None
    if meta.get(DIFFUSERS_METADATA_KEY):
        raw = json.loads(meta[DIFFUSERS_METADATA_KEY])
        config = {k.split(".", 1)[1]: v for k, v in raw.items() if k.startswith("transformer.")} or None
    if meta.get(FLOWBP_METADATA_KEY):
        info = json.loads(meta[FLOWBP_METADATA_KEY])
    return config, info


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], int, float]:
    """``(module-relative state dict, rank, lora_alpha)``; alpha from the metadata, else the rank."""
    from safetensors.torch import load_file

    state = {k.removeprefix("transformer."): v for k, v in load_file(str(path)).items()}
    rank, _ = lora_rank_and_targets(state)
    config, _ = read_lora_metadata(path)
    alpha = float((config or {}).get("lora_alpha") or rank)
    return state, rank, alpha


def resolve_lora_file(path: str | os.PathLike, weights: str = "auto", *, option: str = "--lora") -> tuple[Path, str]:
    """The LoRA file to load from ``path`` (a file, a run folder or a checkpoint folder) and which weights
    it holds (``raw``, ``ema`` or ``unknown`` for files without our metadata).

    ``weights``: ``auto`` (the EMA file of a checkpoint when there is one, else the folder's default
    file), ``ema`` or ``raw`` (an error naming ``option`` when the folder has no such weights).
    """
    if weights not in LORA_WEIGHT_CHOICES:
        raise ValueError(f"{option}-weights: expected one of {', '.join(LORA_WEIGHT_CHOICES)}, got {weights!r}")
    p = Path(path)
    if p.is_file():
        candidates = [p]
    elif p.is_dir():
        candidates = [p / name for name in (EMA_LORA_FILE, LORA_FILE) if (p / name).is_file()]
        if not candidates:
            raise FileNotFoundError(f"{option}: {str(p)!r} holds no {LORA_FILE} (expected a LoRA file, or a run or "
                                    f"checkpoint folder written by flowbp-train)")
    else:
        raise FileNotFoundError(f"{option}: no such file or folder {str(p)!r}")

    def kind(f: Path) -> str:
        _, info = read_lora_metadata(f)
        return (info or {}).get("weights") or ("ema" if f.name == EMA_LORA_FILE else "unknown")

    found = [(f, kind(f)) for f in candidates]
    if weights == "auto":
        return found[0]
    for f, k in found:
        if k == weights:
            return f, k
    have = ", ".join(f"{f.name} ({k})" for f, k in found)
    raise FileNotFoundError(f"{option}-weights {weights}: {str(p)!r} has no {weights} LoRA weights (it holds {have})")
