"""The miniature's base model and its committed weights: build, save, hash-checked load.

The velocity network is diffusers' ``SD3Transformer2DModel`` at a tiny pixel-space configuration
(16x16x1, patch 2, 4 joint blocks, 4 heads x 16; 0.59 M parameters), so the SD3.5 code path is the one
exercised. ``caption_projection_dim`` must equal heads x head dim and ``pos_embed_max_size`` counts
patches (shared/design/MINIATURE.md, pitfalls). Weight files live in ``flowbp_train/mini/weights`` with
their sha256 in ``sha256.json``; :func:`verified_path` refuses a file whose hash does not match.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from flowbp_train.mini.text_encoder import TinyTextEncoder

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: Where ``flowbp-mini pretrain / train-reward / train-judge`` write when no folder is named: under the
#: current directory, never into the installed package (whose hashes would then vouch for new weights).
DEFAULT_OUT_DIR = "flowbp-mini-weights"
HASHES_FILE = "sha256.json"
BASE_FILE = "mini_base.safetensors"

TRANSFORMER_CONFIG = dict(
    sample_size=16, patch_size=2, in_channels=1, out_channels=1, num_layers=4, num_attention_heads=4,
    attention_head_dim=16, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64,
    pos_embed_max_size=8,
)
TEXT_CONFIG = dict(width=64, out_dim=64, heads=4, ff=128)


def build_transformer():
    """A freshly initialised tiny ``SD3Transformer2DModel`` (initialisation follows torch's RNG)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**TRANSFORMER_CONFIG)


def build_text_encoder() -> TinyTextEncoder:
    return TinyTextEncoder(**TEXT_CONFIG)


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def record_hash(path: str | Path) -> str:
    """Write ``path``'s sha256 into the ``sha256.json`` beside it; returns the digest."""
    path = Path(path)
    table_path = path.parent / HASHES_FILE
    table = json.loads(table_path.read_text()) if table_path.exists() else {}
    table[path.name] = sha256_of(path)
    table_path.write_text(json.dumps(dict(sorted(table.items())), indent=2) + "\n")
    return table[path.name]


def verified_path(name: str, weights_dir: str | Path | None = None) -> Path:
    """The path of weight file ``name`` after checking its sha256 against ``sha256.json``.

    Raises FileNotFoundError if the file or its recorded hash is missing, ValueError on a mismatch.
    """
    d = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    path, table_path = d / name, d / HASHES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"miniature weights {path} not found; run `flowbp-mini pretrain` / "
                                f"`train-reward` / `train-judge` to recreate them")
    if not table_path.is_file():
        raise FileNotFoundError(f"no {HASHES_FILE} beside {path}")
    want = json.loads(table_path.read_text()).get(name)
    if want is None:
        raise FileNotFoundError(f"{table_path} records no hash for {name}")
    got = sha256_of(path)
    if got != want:
        raise ValueError(f"{path}: sha256 {got} does not match the recorded {want}")
    return path


META_KEY = "flowbp_mini"


def save_weights(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict) -> str:
    """Save ``tensors`` as safetensors with ``metadata`` as ONE sorted-JSON entry and record the sha256.

    One entry because safetensors writes several metadata entries in a per-process random order, which
    would make the same weights hash differently from run to run."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(state, str(path), metadata={META_KEY: json.dumps(metadata, sort_keys=True)})
    return record_hash(path)


def read_metadata(path: str | Path) -> dict:
    """The metadata :func:`save_weights` stored in ``path``."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get(META_KEY, "{}"))


def save_base(transformer, text_encoder, path: str | Path, metadata: dict | None = None) -> str:
    """Save both networks into one safetensors file (prefixes ``transformer.``, ``text_encoder.``) and
    record its hash. Returns the sha256."""
    state = {f"transformer.{k}": v for k, v in transformer.state_dict().items()}
    state.update({f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()})
    meta = {"transformer_config": TRANSFORMER_CONFIG, "text_config": TEXT_CONFIG, **(metadata or {})}
    return save_weights(state, path, meta)


def load_base(weights_dir: str | Path | None = None, name: str = BASE_FILE):
    """(transformer, text_encoder) in eval mode, fp32, CPU, from the hash-checked committed file."""
    from safetensors.torch import load_file

    state = load_file(str(verified_path(name, weights_dir)))
    tr, te = build_transformer(), build_text_encoder()
    tr.load_state_dict({k[12:]: v for k, v in state.items() if k.startswith("transformer.")})
    te.load_state_dict({k[13:]: v for k, v in state.items() if k.startswith("text_encoder.")})
    for m in (tr, te):
        m.eval().requires_grad_(False)
    return tr, te
