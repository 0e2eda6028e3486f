"""Checkpoints in the layout of diffusers' training examples, written atomically.

``output_dir/checkpoint-<step>/`` holds the trainable weights (LoRA: ``pytorch_lora_weights.safetensors``
in diffusers' format; full fine-tuning: ``transformer/`` via ``save_pretrained``), ``optimizer.pt``,
``scheduler.pt``, ``ema.pt`` (when used), ``random_states.pt`` (python, numpy, torch, CUDA and every
named generator, the index sampler's included) and ``trainer_state.json``. Everything is written into a
hidden temporary folder that is renamed at the end, so a run killed while saving leaves the previous
checkpoint intact; a folder without ``trainer_state.json`` is never taken for a checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

STATE_FILE = "trainer_state.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(output_dir: str | os.PathLike, spec: str | None) -> Path | None:
    """``"latest"`` -> the newest complete checkpoint (None if there is none); a path -> that folder."""
    if spec is None:
        return None
    if spec == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume_from_checkpoint: {spec} is not a complete checkpoint (no {STATE_FILE})")
    return path


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    """Every RNG state: python, numpy (when installed), torch CPU, CUDA, and the named generators."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "generators": {k: g.get_state() for k, g in generators.items()}}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in generators.items():
        if name not in state["generators"]:
            raise KeyError(f"checkpoint has no state for the {name!r} generator")
        gen.set_state(state["generators"][name])


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
    """Write ``checkpoint-<step>`` atomically and prune to ``total_limit`` checkpoints.

    ``write_weights(folder)`` writes the trainable weights (the trainer knows LoRA vs full FT).
    """
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_weights(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
        if ema is not None:
            torch.save(ema.state_dict(), tmp / "ema.pt")
        torch.save(rng_state(generators), tmp / "random_states.pt")
        (tmp / STATE_FILE).write_text(json.dumps({**state, "global_step": step}, indent=2, default=str))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_checkpoint(tmp, final, total_limit)


def publish_checkpoint(tmp: Path, final: Path, total_limit: int | None) -> Path:
    """Rename a complete temporary folder to its final name (replacing a checkpoint of the same step
    only once the new one is in place) and prune to ``total_limit`` checkpoints."""
    root = final.parent
    old = None
    if final.exists():  # re-saving the same step: keep the old one until the new one is in place
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if total_limit is not None:
        ckpts = list_checkpoints(root)
        for stale in ckpts[: max(0, len(ckpts) - total_limit)]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _dcp_payload(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema) -> dict:
    """What torch.distributed.checkpoint saves and loads: model, optimizer and EMA shadows (sharded)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from flowbp_train.distributed import unwrap

    msd, osd = get_state_dict(unwrap(model), optimizer)
    payload = {"model": msd, "optim": osd}
    if ema is not None:
        payload["ema"] = {str(i): t for i, t in enumerate(ema.shadow)}
    return payload


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
    """The multi-rank checkpoint, called on EVERY rank: model, optimizer and EMA through
    torch.distributed.checkpoint (``distcp/``, each rank writes its shards), one ``random_states_<rank>.pt``
    per rank, the scheduler and ``trainer_state.json`` from rank 0; published atomically by rank 0."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank()
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    payload = _dcp_payload(model, optimizer, ema)
    dcp.save(payload, checkpoint_id=os.fspath(tmp / "distcp"))
    torch.save(rng_state(generators), tmp / f"random_states_{rank}.pt")
    if rank == 0:
        torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
        info = {**state, "global_step": step, "world_size": dist.get_world_size()}
        (tmp / STATE_FILE).write_text(json.dumps(info, indent=2, default=str))
    dist.barrier()
    if rank == 0:
        publish_checkpoint(tmp, final, total_limit)
    dist.barrier()
    return final


def load_checkpoint_distributed(
    folder: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    ema=None,
    generators: dict[str, torch.Generator],
) -> dict:
    """Restore what :func:`save_checkpoint_distributed` wrote; called on every rank of a run with the
    same world size (each rank restores its own random streams)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from flowbp_train.distributed import unwrap

    folder = Path(folder)
    state = json.loads((folder / STATE_FILE).read_text())
    world, rank = dist.get_world_size(), dist.get_rank()
    if not (folder / "distcp").is_dir():
        raise ValueError(f"resume_from_checkpoint: {folder} was written by a single process; resume it with "
                         f"one process, or start a new multi-rank run")
    if state.get("world_size") != world:
        raise ValueError(f"resume_from_checkpoint: {folder} was written by {state.get('world_size')} ranks, "
                         f"this run has {world}; resume with the same number of ranks")
    payload = _dcp_payload(model, optimizer, ema)
    dcp.load(payload, checkpoint_id=os.fspath(folder / "distcp"))
    set_state_dict(unwrap(model), optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optim"])
    if ema is not None:
        for i, t in enumerate(ema.shadow):
            if payload["ema"][str(i)] is not t:
                t.copy_(payload["ema"][str(i)])
    lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(folder / f"random_states_{rank}.pt", weights_only=False), generators)
    return state


def load_checkpoint(
    folder: str | os.PathLike,
    read_weights: Callable[[Path], None],
    *,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    ema=None,
    generators: dict[str, torch.Generator],
    map_location: str | torch.device = "cpu",
) -> dict:
    """Restore everything :func:`save_checkpoint` wrote; returns the trainer state (``global_step``...)."""
    folder = Path(folder)
    state = json.loads((folder / STATE_FILE).read_text())
    read_weights(folder)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=map_location, weights_only=True))
    lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    if ema is not None:
        if not (folder / "ema.pt").is_file():
            raise FileNotFoundError(f"use_ema is on but {folder} has no ema.pt")
        ema.load_state_dict(torch.load(folder / "ema.pt", map_location=map_location, weights_only=True))
    set_rng_state(torch.load(folder / "random_states.pt", weights_only=False), generators)
    return state
