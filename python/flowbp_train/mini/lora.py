"""Load a miniature LoRA (``pytorch_lora_weights.safetensors``, diffusers' SD3 format) onto a transformer.

Files are written by the adapter's ``save_lora_weights`` (``StableDiffusion3Pipeline.save_lora_weights``:
keys ``transformer.<module>.lora_A.weight`` / ``lora_B.weight``), by the trainer and by
``flowbp-mini align`` alike. The rank and target modules are read from the tensors; the scaling
``lora_alpha / r`` from the file's diffusers metadata (``flowbp_train.lora_files``), else 1 (alpha = rank,
what every miniature recipe uses), unless ``alpha`` is given.
"""

from __future__ import annotations

from pathlib import Path

import torch

LORA_FILE = "pytorch_lora_weights.safetensors"


def save_lora(adapter, output_dir: str | Path) -> Path:
    """Write the adapter's LoRA with its ``save_lora_weights`` (diffusers format); returns the file."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(adapter.transformer)
    if not state:
        raise ValueError("the transformer has no LoRA parameters to save")
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    adapter.save_lora_weights(str(output_dir), state)
    return Path(output_dir) / LORA_FILE


def load_lora(transformer: torch.nn.Module, path: str | Path, alpha: float | None = None) -> None:
    """Attach the LoRA stored at ``path`` (a file, or a folder holding :data:`LORA_FILE`) at the scale
    ``alpha / rank``; ``alpha`` defaults to the file's recorded ``lora_alpha`` (else the rank)."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    from flowbp_train.lora_files import lora_rank_and_targets, read_lora_file

    path = Path(path)
    if path.is_dir():
        path = path / LORA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at {path}")
    try:
        state, rank, recorded_alpha = read_lora_file(path)
        _, targets = lora_rank_and_targets(state)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or recorded_alpha, target_modules=targets))
    res = set_peft_model_state_dict(transformer, state)
    if getattr(res, "unexpected_keys", None):
        raise ValueError(f"{path}: unexpected LoRA keys {res.unexpected_keys[:3]}")
