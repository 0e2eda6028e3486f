"""Checkpoints in the layout of diffusers' training examples, written atomically and proved whole on resume.

``output_dir/checkpoint-<step>/`` holds the trainable weights (LoRA: ``pytorch_lora_weights.safetensors``
in diffusers' format; full fine-tuning: ``transformer/``), ``optimizer.pt``, ``scheduler.pt``, ``ema.pt``
(when used), ``random_states.safetensors`` (python, numpy, torch, CUDA and every named generator, as
tensors) and ``trainer_state.json``; under several ranks the weights, optimizer and EMA are per-rank
safetensors shards (:func:`save_sharded`). ``manifest.json`` is written last: every
file's size and sha256, the step and a hash of the config. Everything goes into a hidden temporary
folder, fsynced, then renamed, so a killed run never leaves a half checkpoint. Nothing is unpickled:
JSON, safetensors, or ``torch.load(weights_only=True)``; every failure is one line naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import torch

from flowbp_train import distributed as D
from flowbp_train import weights as W
from flowbp_train.weights import WeightsError

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
RNG_FILE = "random_states.safetensors"
MANIFEST_FORMAT = "flowbp-checkpoint"
MANIFEST_VERSION = 1
TMP_PREFIX = ".tmp-checkpoint-"
OLD_PREFIX = ".old-checkpoint-"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message is one line and names the file."""


# ------------------------------------------------------------------------------------ finding them
def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (those whose manifest, written last, exists) under ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _CKPT.match(p.name)) and (p / MANIFEST_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(output_dir: str | os.PathLike, spec: str | None) -> Path | None:
    """``"latest"`` -> the newest complete checkpoint (None if there is none); a path -> that folder."""
    if spec is None:
        return None
    if spec == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    path = Path(spec)
    if not path.is_dir():
        raise CheckpointError(f"resume_from_checkpoint: {spec} is not a folder")
    if not (path / MANIFEST_FILE).is_file():
        raise CheckpointError(f"resume_from_checkpoint: {path / MANIFEST_FILE} is missing (an incomplete "
                              f"checkpoint, or one written by an older version)")
    return path


# ------------------------------------------------------------------------------------ safe reading
@contextlib.contextmanager
def _checkpoint_errors():
    """A weights file that cannot be read is a checkpoint that cannot be resumed (same one-line message)."""
    try:
        yield
    except WeightsError as exc:
        raise CheckpointError(str(exc)) from None


def read_json(path: Path, what: str = "checkpoint file") -> dict:
    """A JSON object from ``path``; CheckpointError naming the file otherwise."""
    with _checkpoint_errors():
        return W.read_json(path, what)


def torch_load(path: Path, map_location="cpu"):
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary objects."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling / format error: refuse the file
        first = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{path} cannot be read safely ({type(exc).__name__}: {first})") from None


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file of a checkpoint; CheckpointError naming it when damaged."""
    with _checkpoint_errors():
        return W.read_safetensors(path)


# ------------------------------------------------------------------------------------ RNG states
def rng_state(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every RNG state as tensors plus JSON metadata: python, numpy (when installed), torch CPU, CUDA
    (when initialised), and the named generators."""
    version, words, gauss = random.getstate()
    tensors = {"python": torch.tensor(words, dtype=torch.int64), "torch": torch.get_rng_state()}
    meta = {"python": json.dumps({"version": version, "gauss_next": gauss})}
    for name, g in generators.items():
        tensors[f"generator.{name}"] = g.get_state()
    try:
        import numpy as np

        kind, key, pos, has_gauss, cached = np.random.get_state()
        tensors["numpy"] = torch.from_numpy(key.astype(np.int64))
        meta["numpy"] = json.dumps({"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss),
                                    "cached_gaussian": float(cached)})
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return tensors, meta


def save_rng(path: Path, generators: dict[str, torch.Generator]) -> None:
    from safetensors.torch import save_file

    tensors, meta = rng_state(generators)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def _rng_parts(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    tensors = load_safetensors(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path} is not a valid safetensors file ({exc})") from None
    return tensors, meta


def load_rng(path: Path, generators: dict[str, torch.Generator]) -> None:
    """Restore what :func:`save_rng` wrote; checks every part before setting any state."""
    tensors, meta = _rng_parts(path)

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: invalid random state ({what})")

    try:
        py = json.loads(meta["python"])
        words = tensors["python"]
        if words.dtype != torch.int64 or words.dim() != 1 or not isinstance(py.get("version"), int):
            raise bad("python")
        gauss = py.get("gauss_next")
        if gauss is not None and not isinstance(gauss, float):
            raise bad("python gauss_next")
        py_state = (py["version"], tuple(int(w) for w in words.tolist()), gauss)
        if any(not 0 <= w < 2**32 for w in py_state[1][:-1]):
            raise bad("python words")
        for key in ["torch", *(f"generator.{n}" for n in generators)]:
            t = tensors.get(key)
            if t is None or t.dtype != torch.uint8 or t.dim() != 1:
                raise bad(f"{key} missing or not a byte tensor")
        np_state = None
        if "numpy" in tensors:
            import numpy as np

            info = json.loads(meta["numpy"])
            key = tensors["numpy"]
            if key.dtype != torch.int64 or key.shape != (624,) or info.get("kind") != "MT19937":
                raise bad("numpy")
            np_state = ("MT19937", key.numpy().astype(np.uint32), int(info["pos"]), int(info["has_gauss"]),
                        float(info["cached_gaussian"]))
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise bad(f"{type(exc).__name__}: {exc}") from None
    try:
        random.setstate(py_state)
        torch.set_rng_state(tensors["torch"])
        if np_state is not None:
            import numpy as np

            np.random.set_state(np_state)
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")),
                                           key=lambda k: int(k.split(".")[1]))]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        for name, gen in generators.items():
            gen.set_state(tensors[f"generator.{name}"])
    except (RuntimeError, ValueError, TypeError) as exc:
        raise bad(" ".join(str(exc).split())[:200]) from None


# ------------------------------------------------------------------------------------ durability
def fsync_path(path: Path) -> None:
    """fsync one file or folder (folders: so that the names of new entries are durable too)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # platforms that cannot open a folder (Windows): the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    for dirpath, _, files in os.walk(folder):
        for f in files:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath))


def write_json(path: Path, obj) -> None:
    """Write JSON and fsync it (state and manifest files)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, default=str))
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------ the manifest
def config_hash(config: dict) -> str:
    """sha256 of the config's canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _files_of(folder: Path) -> list[str]:
    return sorted(str(Path(dp, f).relative_to(folder)) for dp, _, fs in os.walk(folder) for f in fs)


def file_entries(folder: Path, names: list[str]) -> dict[str, dict]:
    """``{name: {"size", "sha256"}}`` of files of ``folder``."""
    return {n: {"size": (folder / n).stat().st_size, "sha256": W.sha256_of(folder / n)} for n in names}


def write_manifest(folder: Path, step: int, cfg_hash: str, world_size: int = 1,
                   entries: dict[str, dict] | None = None) -> None:
    """Write ``manifest.json`` (last): every other file of ``folder`` with its size and sha256."""
    if entries is None:
        entries = file_entries(folder, [n for n in _files_of(folder) if n != MANIFEST_FILE])
    write_json(folder / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "step": step,
                                        "config_hash": cfg_hash, "world_size": world_size, "files": entries})


def read_manifest(folder: Path) -> dict:
    """The manifest of ``folder``, its structure checked; also checks the step against the folder name and
    that nothing but the listed files is in the folder (no file is read that the manifest does not vouch for)."""
    path = folder / MANIFEST_FILE
    man = read_json(path, "checkpoint manifest")
    files = man.get("files")
    ok = (man.get("format") == MANIFEST_FORMAT and man.get("version") == MANIFEST_VERSION
          and isinstance(man.get("step"), int) and not isinstance(man.get("step"), bool) and man["step"] >= 0
          and isinstance(man.get("config_hash"), str) and isinstance(man.get("world_size"), int)
          and man["world_size"] >= 1 and isinstance(files, dict)
          and all(isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("size"), int)
                  and isinstance(v.get("sha256"), str) for k, v in files.items()))
    if not ok:
        raise CheckpointError(f"{path} is not a valid checkpoint manifest (format {MANIFEST_FORMAT} "
                              f"v{MANIFEST_VERSION} expected)")
    m = _CKPT.match(folder.name)
    if m and int(m.group(1)) != man["step"]:
        raise CheckpointError(f"{path}: step {man['step']} does not match the folder name {folder.name}")
    for name in files:
        p = Path(name)
        if p.is_absolute() or ".." in p.parts or name == MANIFEST_FILE:
            raise CheckpointError(f"{path} lists an invalid file name {name!r}")
    for name in _files_of(folder):
        if name != MANIFEST_FILE and name not in files:
            raise CheckpointError(f"{folder / name} is not listed in {MANIFEST_FILE} (a foreign file)")
    return man


def verify_files(folder: Path, man: dict, names: list[str] | None = None, *, hash_files: bool = True) -> None:
    """Each listed file (or those of ``names``) exists as a plain file with the manifest's size and sha256."""
    for name in man["files"] if names is None else names:
        entry = man["files"].get(name)
        path = folder / name
        if entry is None:
            raise CheckpointError(f"{path} is not listed in {folder / MANIFEST_FILE}")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path} is not a plain file (a link or a device)")
        if st.st_size != entry["size"]:
            raise CheckpointError(f"{path} has {st.st_size} bytes, {MANIFEST_FILE} says {entry['size']} "
                                  f"(truncated or replaced)")
        if hash_files and W.sha256_of(path) != entry["sha256"]:
            raise CheckpointError(f"{path} does not match its sha256 in {MANIFEST_FILE} (corrupted or replaced)")
        if name.endswith(".safetensors"):
            check_safetensors_header(path, st.st_size)


#: a safetensors header is JSON of a few entries per tensor; anything larger is not one of ours
MAX_SAFETENSORS_HEADER = 64 * 2**20


def check_safetensors_header(path: Path, size: int) -> None:
    """``path`` is a safetensors container: an 8-byte little-endian header length, a JSON header whose
    tensors' ``data_offsets`` lie inside the file. Checked for every ``.safetensors`` file of a checkpoint,
    also those a resume does not read (the EMA LoRA), so that no file of a verified checkpoint is
    something else under a safetensors name."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= min(size - 8, MAX_SAFETENSORS_HEADER):
                raise ValueError(f"header length {n} for a file of {size} bytes")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        for key, t in header.items():
            if key == "__metadata__":
                continue
            lo, hi = t["data_offsets"]
            if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi <= size - 8 - n):
                raise ValueError(f"tensor {key!r} lies outside the file")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a safetensors file ({' '.join(str(exc).split())[:120]})") from None


def read_state(folder: Path, man: dict) -> dict:
    """``trainer_state.json``, checked: ``global_step`` equals the manifest's step, the config matches its
    hash, ``nonfinite_in_a_row`` is a count."""
    path = folder / STATE_FILE
    state = read_json(path, "trainer state")
    step = state.get("global_step")
    if isinstance(step, bool) or not isinstance(step, int) or step != man["step"]:
        raise CheckpointError(f"{path}: global_step {step!r} does not match the manifest's step {man['step']}")
    nf = state.get("nonfinite_in_a_row", 0)
    if isinstance(nf, bool) or not isinstance(nf, int) or nf < 0:
        raise CheckpointError(f"{path}: nonfinite_in_a_row must be a count >= 0, got {nf!r}")
    cfg = state.get("config")
    if not isinstance(cfg, dict) or config_hash(cfg) != man["config_hash"]:
        raise CheckpointError(f"{path}: the recorded config does not match the manifest's config hash")
    return state


def verify_checkpoint(folder: str | os.PathLike, names: list[str] | None = None) -> tuple[dict, dict]:
    """Check a checkpoint before loading anything heavy: manifest, files (all, or ``names`` plus the
    state), trainer state. Returns ``(manifest, trainer_state)``."""
    folder = Path(folder)
    man = read_manifest(folder)
    verify_files(folder, man, None if names is None else sorted({STATE_FILE, *names}))
    return man, read_state(folder, man)


# ------------------------------------------------------------------------------------ single process
def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[Path]:
    """Remove ``.tmp-checkpoint-*`` / ``.old-checkpoint-*`` folders a killed run left (call only while
    holding the output_dir lock: nobody else is writing them)."""
    root = Path(output_dir)
    gone = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((TMP_PREFIX, OLD_PREFIX)) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    write_weights: Callable[[Path], None],
    *,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    ema=None,
    generators: dict[str, torch.Generator],
    state: dict,
    total_limit: int | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically (manifest last, fsync, rename) and prune to ``total_limit``.

    ``write_weights(folder)`` writes the trainable weights (the trainer knows LoRA vs full FT);
    ``state`` must hold ``config`` (the run's config as a dict, hashed into the manifest).
    """
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = root / f"{TMP_PREFIX}{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_weights(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
        if ema is not None:
            torch.save(ema.state_dict(), tmp / "ema.pt")
        save_rng(tmp / RNG_FILE, generators)
        write_json(tmp / STATE_FILE, {**state, "global_step": step})
        write_manifest(tmp, step, config_hash(state["config"]))
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_checkpoint(tmp, final, total_limit)


def publish_checkpoint(tmp: Path, final: Path, total_limit: int | None) -> Path:
    """Rename a complete, fsynced temporary folder to its final name (replacing a checkpoint of the same
    step only once the new one is in place), fsync the parent, and prune to ``total_limit`` checkpoints."""
    root = final.parent
    old = None
    if final.exists():  # re-saving the same step: keep the old one until the new one is in place
        old = root / f"{OLD_PREFIX}{final.name}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if total_limit is not None:
        ckpts = list_checkpoints(root)
        for stale in ckpts[: max(0, len(ckpts) - total_limit)]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(
    folder: str | os.PathLike,
    read_weights: Callable[[Path], None],
    *,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    ema=None,
    generators: dict[str, torch.Generator],
    map_location: str | torch.device = "cpu",
    verified: tuple[dict, dict] | None = None,
) -> dict:
    """Restore everything :func:`save_checkpoint` wrote; returns the trainer state (``global_step``...).
    ``verified``: the result of :func:`verify_checkpoint` when the caller already checked the folder."""
    folder = Path(folder)
    man, state = verified if verified is not None else verify_checkpoint(folder)
    if man["world_size"] != 1:
        raise CheckpointError(f"resume_from_checkpoint: {folder} was written by {man['world_size']} ranks; "
                              f"resume it with as many ranks")
    if ema is not None and "ema.pt" not in man["files"]:
        raise CheckpointError(f"{folder / 'ema.pt'} is missing (use_ema is on but the run had no EMA)")
    with _checkpoint_errors():
        read_weights(folder)
    try:
        optimizer.load_state_dict(torch_load(folder / "optimizer.pt", map_location))
    except (ValueError, KeyError, RuntimeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{folder / 'optimizer.pt'} does not fit this optimizer ({exc})") from None
    try:
        lr_scheduler.load_state_dict(torch_load(folder / "scheduler.pt"))
    except (AttributeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder / 'scheduler.pt'} is not a scheduler state ({exc})") from None
    if ema is not None:
        try:
            ema.load_state_dict(torch_load(folder / "ema.pt", map_location))
        except (KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{folder / 'ema.pt'} does not fit the EMA ({exc})") from None
    load_rng(folder / RNG_FILE, generators)
    return state


# ------------------------------------------------------------------------------------ several ranks
#: the shard folder of a multi-rank checkpoint: one file per rank's shards, the replicated tensors, the layout
SHARD_LAYOUT = "layout.json"
REPLICATED_FILE = "replicated.safetensors"
_SEP = "/"  # joins nested keys; parameter names never hold it


def _flatten(obj, prefix: str = "") -> list[tuple[str, object]]:
    """Nested dicts and lists as ``(key path, leaf)`` pairs (``optim/state/<fqn>/exp_avg``)."""
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() for kv in _flatten(v, f"{prefix}{_SEP}{k}" if prefix else str(k))]
    if isinstance(obj, list):
        return [kv for i, v in enumerate(obj) for kv in _flatten(v, f"{prefix}{_SEP}{i}")]
    return [(prefix, obj)]


def _set_leaf(obj, path: str, value) -> None:
    keys = path.split(_SEP)
    for k in keys[:-1]:
        obj = obj[int(k)] if isinstance(obj, list) else obj[k]
    last = keys[-1]
    if isinstance(obj, list):
        obj[int(last)] = value
    else:
        obj[last] = value


def _payload(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema) -> dict:
    """What a sharded checkpoint holds: the trainable weights (frozen ones come from the base model),
    the optimizer state keyed by parameter name, and the EMA shadows; tensors sharded as the run is."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(D.unwrap(model), optimizer, options=StateDictOptions(ignore_frozen_params=True))
    payload = {"model": msd, "optim": osd}
    if ema is not None:
        payload["ema"] = {str(i): t for i, t in enumerate(ema.shadow)}
    return payload


def _json_value(key: str, v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, tuple):
        return [_json_value(key, x) for x in v]
    raise TypeError(f"save_sharded: {key} holds a {type(v).__name__}, which a checkpoint cannot store")


def save_sharded(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 ema=None) -> list[str]:
    """Save the trainable weights, the optimizer state (and EMA shadows) of a wrapped model, without
    pickles: each rank writes its local shards (``shard_<rank>.safetensors``), rank 0 the tensors every
    rank holds whole (``replicated.safetensors``) and the layout with the non-tensor values
    (``layout.json``). Call on every rank; returns the paths (relative to ``path``'s parent) this rank
    wrote."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    folder = os.fspath(path)
    os.makedirs(folder, exist_ok=True)
    local, replicated, layout = {}, {}, {}
    for key, v in _flatten(_payload(model, optimizer, ema)):
        if isinstance(v, DTensor):
            local[key] = v.to_local().detach().to("cpu", copy=True).contiguous()
            layout[key] = {"kind": "sharded", "shape": list(v.shape)}
        elif isinstance(v, torch.Tensor):
            replicated[key] = v.detach().to("cpu", copy=True).contiguous()
            layout[key] = {"kind": "replicated", "shape": list(v.shape)}
        else:
            layout[key] = {"kind": "value", "value": _json_value(key, v)}
    base = os.path.basename(folder.rstrip(os.sep))
    save_file(local, os.path.join(folder, f"shard_{rank}.safetensors"))
    written = [f"{base}/shard_{rank}.safetensors"]
    if rank == 0:
        save_file(replicated, os.path.join(folder, REPLICATED_FILE))
        with open(os.path.join(folder, SHARD_LAYOUT), "w", encoding="utf-8") as f:
            json.dump({"world_size": world, "entries": layout}, f, indent=1, sort_keys=True)
        written += [f"{base}/{REPLICATED_FILE}", f"{base}/{SHARD_LAYOUT}"]
    if dist.is_initialized():
        dist.barrier()
    return written


def load_sharded(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 ema=None) -> None:
    """Load what :func:`save_sharded` wrote into an identically wrapped model and optimizer (same number
    of ranks, same strategy): every key, kind and shape must match the run's own state. Call on every
    rank; errors name the file."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    from torch.distributed.tensor import DTensor

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    folder = os.fspath(path)
    layout_path = os.path.join(folder, SHARD_LAYOUT)
    layout = read_json(Path(layout_path), "shard layout")
    entries = layout.get("entries")
    if layout.get("world_size") != world or not isinstance(entries, dict):
        raise CheckpointError(f"{layout_path}: written by {layout.get('world_size')!r} ranks, this run has {world}")
    shard_path = Path(folder, f"shard_{rank}.safetensors")
    local, replicated = load_safetensors(shard_path), load_safetensors(Path(folder, REPLICATED_FILE))
    payload = _payload(model, optimizer, ema)
    flat = dict(_flatten(payload))
    if set(flat) != set(entries):
        diff = sorted(set(flat) ^ set(entries))
        raise CheckpointError(f"{layout_path} does not match this run's trainable state (e.g. {diff[0]!r}); "
                              f"resume with the same model, LoRA settings, optimizer and strategy")
    for key, v in flat.items():
        entry = entries[key]
        kind = "sharded" if isinstance(v, DTensor) else "replicated" if isinstance(v, torch.Tensor) else "value"
        stored = entry.get("kind") if isinstance(entry, dict) else entry
        if stored != kind:
            raise CheckpointError(f"{layout_path}: {key} is stored as {stored!r}, this run holds it {kind} "
                                  f"(another distributed_strategy?)")
        if kind == "value":
            val = entry.get("value")
            _set_leaf(payload, key, tuple(val) if isinstance(v, tuple) and isinstance(val, list) else val)
            continue
        src, file = (local, shard_path) if kind == "sharded" else (replicated, Path(folder, REPLICATED_FILE))
        dst = v.to_local() if kind == "sharded" else v
        got = src.get(key)
        if got is None or tuple(got.shape) != tuple(dst.shape) or list(v.shape) != entry.get("shape"):
            raise CheckpointError(f"{file}: {key} is missing or has another shape than this run's "
                                  f"{tuple(dst.shape)}")
        with torch.no_grad():
            dst.copy_(got)
    set_state_dict(D.unwrap(model), optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    if ema is not None:
        for i, t in enumerate(ema.shadow):
            if payload["ema"][str(i)] is not t:
                with torch.no_grad():
                    t.copy_(payload["ema"][str(i)])


def save_checkpoint_distributed(
    output_dir: str | os.PathLike,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    ema=None,
    generators: dict[str, torch.Generator],
    state: dict,
    total_limit: int | None = None,
) -> Path:
    """The multi-rank checkpoint, called on EVERY rank: weights, optimizer and EMA as per-rank safetensors
    shards (``shards/``), one ``random_states_<rank>.safetensors`` per rank, the scheduler and
    ``trainer_state.json`` from rank 0; each rank hashes its own files, rank 0 writes the manifest and
    publishes the folder."""
    import torch.distributed as dist


    rank, world = dist.get_rank(), dist.get_world_size()
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f"{TMP_PREFIX}{step}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    mine = save_sharded(tmp / "shards", model, optimizer, ema=ema)
    save_rng(tmp / f"random_states_{rank}.safetensors", generators)
    mine.append(f"random_states_{rank}.safetensors")
    if rank == 0:
        torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
        write_json(tmp / STATE_FILE, {**state, "global_step": step, "world_size": world})
        mine += ["scheduler.pt", STATE_FILE]
    write_json(tmp / f".hashes-{rank}.json", file_entries(tmp, mine))
    fsync_tree(tmp)
    dist.barrier()
    if rank == 0:
        entries: dict[str, dict] = {}
        for r in range(world):
            part = tmp / f".hashes-{r}.json"
            entries.update(json.loads(part.read_text()))
            part.unlink()
        write_manifest(tmp, step, config_hash(state["config"]), world, entries)
        fsync_tree(tmp)
        publish_checkpoint(tmp, final, total_limit)
    dist.barrier()
    return final


def distributed_files(man: dict, rank: int) -> list[str]:
    """The files one rank reads on resume: its shard and RNG file, and those every rank shares."""
    own = (STATE_FILE, "scheduler.pt", f"random_states_{rank}.safetensors", f"shards/shard_{rank}.safetensors")
    return [n for n in man["files"] if n in own or (n.startswith("shards/") and not n.startswith("shards/shard_"))]


def load_checkpoint_distributed(
    folder: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    ema=None,
    generators: dict[str, torch.Generator],
    verified: tuple[dict, dict] | None = None,
) -> dict:
    """Restore what :func:`save_checkpoint_distributed` wrote; called on every rank of a run with the
    same world size (each rank restores its own shards and random streams). ``verified``: this rank's
    :func:`verify_checkpoint` result (of :func:`distributed_files`), checked on every rank by the caller."""
    import torch.distributed as dist


    folder = Path(folder)
    world, rank = dist.get_world_size(), dist.get_rank()
    man, state = verified if verified is not None else verify_checkpoint(folder, distributed_files(
        read_manifest(folder), rank))
    if man["world_size"] == 1:
        raise CheckpointError(f"resume_from_checkpoint: {folder} was written by a single process; resume it "
                              f"with one process, or start a new multi-rank run")
    if man["world_size"] != world:
        raise CheckpointError(f"resume_from_checkpoint: {folder} was written by {man['world_size']} ranks, "
                              f"this run has {world}; resume with the same number of ranks")
    load_sharded(folder / "shards", model, optimizer, ema=ema)
    try:
        lr_scheduler.load_state_dict(torch_load(folder / "scheduler.pt"))
    except (AttributeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder / 'scheduler.pt'} is not a scheduler state ({exc})") from None
    load_rng(folder / f"random_states_{rank}.safetensors", generators)
    return state
