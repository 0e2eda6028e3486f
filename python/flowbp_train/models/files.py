"""Resolve every file of a diffusers pipeline folder before anything heavy is loaded.

``check_pipeline_files`` reads ``model_index.json`` (of a local folder, or of a model id's snapshot in the
Hugging Face cache, without network) and checks that it names the family's pipeline class and that every
component it lists has its folder, its config and its weights (every shard of a sharded checkpoint). A
missing or partial download is then one line naming the key and the file, raised in a second instead of
after tens of GB of loading. Nothing here imports diffusers or torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

#: pipeline class -> family, for the hint when a folder of another family is given
PIPELINE_FAMILIES = {"FluxPipeline": "flux1", "StableDiffusion3Pipeline": "sd3", "Flux2KleinPipeline": "flux2",
                     "Flux2Pipeline": "flux2-dev"}
PIPELINE_FAMILIES["ZImagePipeline"] = "z-image"
#: components a pipeline cannot run without (others, e.g. SD3's T5, may be null in model_index.json)
REQUIRED = ("transformer", "vae", "scheduler")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _how(path: str) -> str:
    return (f"download it where there is network (e.g. `hf download {path} --local-dir DIR`) and pass "
            f"pretrained_model_name_or_path=DIR")


def locate_pipeline_folder(path: str, *, revision: str | None = None, key: str = "pretrained_model_name_or_path",
                           local_files_only: bool | None = None) -> Path | None:
    """The local folder of ``path``: the folder itself, or the cached snapshot of a model id. None when the
    id is not cached and a download is allowed (the loader fetches it); raises when it cannot be found."""
    if os.path.isdir(path):
        return Path(path)
    if path.startswith((".", "/", "~")) or os.sep + os.sep in path or path.count("/") > 1:
        raise FileNotFoundError(f"{key}: local folder not found: {path}")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "model_index.json", revision=revision)
    except Exception:  # noqa: BLE001 - an invalid id or cache layout means: not in the cache
        cached = None
    if isinstance(cached, str):
        return Path(cached).parent
    if local_files_only or _offline():
        raise FileNotFoundError(f"{key}: {path!r} is not a local folder and is not in the Hugging Face cache "
                                f"(offline mode); {_how(path)}")
    return None


def _component_files_ok(folder: Path, cls: str) -> str | None:
    """What is missing from one component folder (None: complete)."""
    if not folder.is_dir():
        return "the folder"
    if "Tokenizer" in cls:
        names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")
        return None if any((folder / n).is_file() for n in names) else "its tokenizer files (tokenizer.json, ...)"
    if "Scheduler" in cls:
        return None if (folder / "scheduler_config.json").is_file() else "scheduler_config.json"
    if not (folder / "config.json").is_file():
        return "config.json"
    files = [f for f in folder.iterdir() if f.name.endswith(WEIGHT_SUFFIXES)]
    indexes = [f for f in folder.iterdir() if f.name.endswith((".safetensors.index.json", ".bin.index.json"))]
    for index in indexes:  # a sharded checkpoint: every shard it names must be there
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"a readable {index.name}"
        lost = sorted(s for s in shards if not (folder / s).is_file())
        if lost:
            return f"{len(lost)} of the {len(shards)} weight shards named by {index.name} (e.g. {lost[0]})"
    if not files:
        return "its weights (*.safetensors)"
    return None


def check_pipeline_files(path: str, pipeline_class: str, *, family: str, revision: str | None = None,
                         key: str = "pretrained_model_name_or_path",
                         local_files_only: bool | None = None) -> Path | None:
    """Check the diffusers folder (or cached snapshot) of ``path`` holds a complete ``pipeline_class``;
    returns the folder (None: a model id to be downloaded). Raises FileNotFoundError / ValueError with one
    line naming ``key`` and the file."""
    folder = locate_pipeline_folder(str(path), revision=revision, key=key, local_files_only=local_files_only)
    if folder is None:
        return None
    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{key}: {folder} has no model_index.json (expected a diffusers pipeline folder, "
                                f"as save_pretrained or `hf download` writes it)")
    try:
        spec = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{key}: {index} is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{key}: {index} must hold a JSON object")
    got = spec.get("_class_name")
    if got != pipeline_class:
        other = PIPELINE_FAMILIES.get(got)
        hint = f"; pass family={other}" if other else ""
        raise ValueError(f"{key}: {folder} holds a {got or 'pipeline of unknown class'} (model_index.json), but "
                         f"family={family} loads a {pipeline_class}{hint}")
    for name in REQUIRED:
        entry = spec.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            raise ValueError(f"{key}: {index} lists no {name} component; a {pipeline_class} needs one")
    for name, entry in spec.items():
        if name.startswith("_") or not (isinstance(entry, list) and len(entry) == 2) or entry[1] is None:
            continue
        missing = _component_files_ok(folder / name, str(entry[1]))
        if missing is not None:
            raise FileNotFoundError(f"{key}: {folder / name} ({entry[1]}) is missing {missing}; the folder is "
                                    f"incomplete (an interrupted download?)")
    return folder


def meta_transformer(folder: str | os.PathLike):
    """The pipeline's transformer built from ``folder/transformer/config.json`` on the meta device (shapes
    and module names only, no weights: a second, not minutes), for checks that need its module tree."""
    import diffusers
    import torch

    folder = Path(folder)
    spec = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    cls = getattr(diffusers, str(spec["transformer"][1]))
    with torch.device("meta"):
        return cls.from_config(cls.load_config(folder / "transformer"))
