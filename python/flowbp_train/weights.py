"""Every weights file of a run, written and read in one place: LoRA files, transformer weights, the model card.

- LoRA files in diffusers' format: the peft weights exactly as trained under diffusers' keys
  (``transformer.<module>.lora_A.weight`` / ``lora_B.weight``, what ``<Pipeline>.save_lora_weights``
  writes) and two safetensors metadata entries: ``lora_adapter_metadata``, diffusers' own (read by
  ``load_lora_weights`` since diffusers 0.34): the LoRA config with ``r`` and ``lora_alpha``, so a LoRA
  trained with ``lora_alpha != rank`` reloads at its scale ``alpha / r``; and ``flowbp``: which weights
  these are (``raw`` or ``ema``), the step, family and method. A checkpoint keeps the raw weights (what
  resuming needs) and, with EMA, the EMA weights beside them.
- Full fine-tuning: ``transformer/`` as ``save_pretrained`` writes it; from several ranks, the gathered
  state dict as the config plus one ``diffusion_pytorch_model.safetensors`` (what ``save_pretrained``
  writes for a model that fits one file).
- Hash-recorded files (the miniature's committed networks): safetensors with ONE sorted-JSON metadata
  entry and their sha256 in ``sha256.json`` beside them; a file whose hash does not match is refused.
- The model card ``README.md`` of a finished run.
Files are read as safetensors (a transformer file for ``flowbp-eval --transformer`` may also be
``torch.load(weights_only=True)``), never unpickled; a file that cannot be read is one line naming it.
"""

from __future__ import annotations

import hashlib
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

TRANSFORMER_DIR = "transformer"
TRANSFORMER_FILE = "diffusion_pytorch_model.safetensors"  # diffusers' default weight name of a model
HASHES_FILE = "sha256.json"
#: the one metadata entry of a hash-recorded file (several entries are written in a per-process random
#: order by safetensors, which would make the same weights hash differently from run to run)
HASHED_METADATA_KEY = "flowbp_mini"
_HASH_CHUNK = 1 << 20

__all__ = ["EMA_LORA_FILE", "HASHES_FILE", "LORA_FILE", "LORA_WEIGHT_CHOICES", "WeightsError", "attach_lora",
           "load_trained", "load_transformer_weights", "lora_info", "lora_rank_and_targets", "read_json",
           "read_lora_file", "read_lora_metadata", "read_safetensors", "record_hash", "resolve_lora_file",
           "save_hashed", "save_lora_file", "save_trained", "sha256_of", "verified_path", "write_model_card"]


class WeightsError(ValueError):
    """A weights file that cannot be used; the message is one line and names the file."""


def _one_line(exc: BaseException, limit: int = 200) -> str:
    return " ".join(str(exc).split())[:limit]


# ------------------------------------------------------------------------------------------ safe reading
def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; :class:`WeightsError` naming it when missing or damaged."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise WeightsError(f"{path} is missing") from None
    except Exception as exc:  # noqa: BLE001 - a damaged header or data: refuse the file
        raise WeightsError(f"{path} is not a valid safetensors file ({_one_line(exc)})") from None


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    """A JSON object from ``path``; :class:`WeightsError` naming the file otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"{path} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise WeightsError(f"{path} is not a valid {what} (not JSON: {' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path} is not a valid {what} (expected a JSON object)")
    return data


def sha256_of(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ LoRA files


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


def attach_lora(transformer: torch.nn.Module, path: str | os.PathLike, alpha: float | None = None) -> None:
    """Attach the LoRA file at ``path`` (a file, or a folder holding :data:`LORA_FILE`) to ``transformer``
    with peft, at the scale ``alpha / rank``; ``alpha`` defaults to the file's recorded ``lora_alpha``
    (else the rank). For adapters without a diffusers pipeline to call ``load_lora_weights`` on (the
    miniature); the rank and target modules are read from the tensors."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

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


# ------------------------------------------------------------------------------------------ trained weights
def lora_info(cfg, *, family: str, step: int, weights: str) -> dict:
    """The ``flowbp`` metadata of a LoRA file the trainer writes: which weights (``raw`` or ``ema``, with
    the EMA decay), the step, family, method and base model of the run (``cfg``: its ``TrainConfig``)."""
    info = {"family": family, "weights": weights, "step": step, "method": cfg.method,
            "base_model": str(cfg.pretrained_model_name_or_path)}
    if weights == "ema":
        info["ema_decay"] = cfg.ema_decay
    return info


def save_trained(folder: str | os.PathLike, transformer: torch.nn.Module, *, lora: bool,
                 lora_alpha: float | None = None, info: dict | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None, name: str = LORA_FILE) -> Path:
    """The trained weights of ``transformer`` into ``folder``: its LoRA as the file ``name``
    (:func:`save_lora_file`, ``info`` as the ``flowbp`` metadata), or for full fine-tuning (``lora``
    False) ``transformer/`` as ``save_pretrained`` writes it. ``state_dict``: the full weights gathered
    from the ranks (the multi-rank export; then ``transformer/`` is the config plus one safetensors
    file), else the module's own. Returns the file or folder written."""
    folder = Path(folder)
    if not lora:
        out = folder / TRANSFORMER_DIR
        if state_dict is None:
            transformer.save_pretrained(out)
        else:
            from safetensors.torch import save_file

            out.mkdir(parents=True, exist_ok=True)
            transformer.save_config(out)
            save_file({k: v.contiguous() for k, v in state_dict.items()}, str(out / TRANSFORMER_FILE))
        return out
    from peft.utils import get_peft_model_state_dict

    return save_lora_file(folder / name, get_peft_model_state_dict(transformer, state_dict=state_dict),
                          lora_alpha=lora_alpha, info=info)


def load_trained(folder: str | os.PathLike, transformer: torch.nn.Module, *, lora: bool) -> None:
    """Load what :func:`save_trained` wrote into ``folder`` back into the same kind of transformer (the
    LoRA already attached): every key must fit (:class:`WeightsError` naming the file). LoRA weights
    train in fp32, so the trainable ones are cast back after peft copied the file's dtype into them."""
    folder = Path(folder)
    if not lora:
        read_json(folder / TRANSFORMER_DIR / "config.json", "model config")
        files = sorted((folder / TRANSFORMER_DIR).glob("*.safetensors"))
        if not files:
            raise WeightsError(f"{folder / TRANSFORMER_DIR} holds no *.safetensors weights")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(read_safetensors(f))
        try:
            transformer.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"{files[0]} does not fit this transformer ({_one_line(exc)})") from None
        return
    from peft.utils import set_peft_model_state_dict

    path = folder / LORA_FILE
    state = {k.removeprefix("transformer."): v for k, v in read_safetensors(path).items()}
    try:
        res = set_peft_model_state_dict(transformer, state, adapter_name="default")
    except RuntimeError as exc:
        raise WeightsError(f"{path} does not fit this LoRA ({_one_line(exc)})") from None
    if getattr(res, "unexpected_keys", None):
        raise WeightsError(f"{path}: unexpected LoRA keys {res.unexpected_keys[:3]}")
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def load_transformer_weights(transformer: torch.nn.Module, path: str | os.PathLike) -> None:
    """Fine-tuned transformer weights for ``flowbp-eval --transformer``: a folder of ``*.safetensors``
    files (a run's ``transformer/``) or one file (safetensors, else ``torch.load(weights_only=True)``)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"--transformer: no *.safetensors in {str(path)!r}")
    elif p.is_file():
        files = [p]
    else:
        raise FileNotFoundError(f"--transformer: no such file or directory {str(path)!r}")
    state: dict = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(f)))
        else:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    transformer.load_state_dict(state)


# ------------------------------------------------------------------------------------------ hash-recorded files
def record_hash(path: str | os.PathLike) -> str:
    """Write ``path``'s sha256 into the ``sha256.json`` beside it; returns the digest."""
    path = Path(path)
    table_path = path.parent / HASHES_FILE
    table = json.loads(table_path.read_text()) if table_path.exists() else {}
    table[path.name] = sha256_of(path)
    table_path.write_text(json.dumps(dict(sorted(table.items())), indent=2) + "\n")
    return table[path.name]


def save_hashed(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict) -> str:
    """Save ``tensors`` as safetensors with ``metadata`` as ONE sorted-JSON entry and record the sha256 in
    the folder's ``sha256.json`` (the same tensors and metadata give the same bytes, so the same hash)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(state, str(path), metadata={HASHED_METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    return record_hash(path)


def verified_path(name: str, folder: str | os.PathLike) -> Path:
    """The path of the file ``name`` of ``folder`` after checking its sha256 against ``sha256.json``.

    Raises FileNotFoundError if the file or its recorded hash is missing, ValueError on a mismatch.
    """
    d = Path(folder)
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


# ------------------------------------------------------------------------------------------ the model card
def write_model_card(output_dir: str | os.PathLike, cfg, step: int, n_images: int) -> Path:
    """``output_dir/README.md``: what was trained from what (``cfg``: the run's ``TrainConfig``), how to
    load it, and where the config, the log and the samples are."""
    out = Path(output_dir)
    kind = f"LoRA (rank {cfg.rank}, alpha {cfg.effective_lora_alpha:g})" if cfg.rank else \
        "full fine-tuning of the transformer"
    load = (f"pipe.load_lora_weights(\"{out}\")" if cfg.rank else
            f"transformer = <TransformerClass>.from_pretrained(\"{out}/transformer\")")
    text = f"""---
base_model: {cfg.pretrained_model_name_or_path}
library_name: diffusers
tags: [flowbp, reward-backpropagation, {cfg.family}, {cfg.method}]
---
# {cfg.method} on {cfg.family}

Aligned with direct reward backpropagation (flowbp-kernels, FlowBP arXiv 2606.11075) from
`{cfg.pretrained_model_name_or_path}`: method `{cfg.method}` ({cfg.executor} executor), reward
`{cfg.reward}` (loss `{cfg.loss}`), {cfg.num_steps} rollout steps at {cfg.resolution}x{cfg.resolution},
{kind}, {step} steps, learning rate {cfg.learning_rate:g}{', EMA ' + str(cfg.ema_decay) if cfg.use_ema
                                                          else ''}.

Load: `{load}`. The resolved configuration is `config.yaml`; the per-step log is
`{cfg.logging_dir}/train_log.jsonl`; {n_images} sample images are in `samples/`.
"""
    path = out / "README.md"
    path.write_text(text)
    return path
