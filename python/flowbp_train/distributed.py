"""Data-parallel (DDP) and sharded (FSDP2) training on PyTorch's own distributed engine.

torchrun (one node or many) starts the ranks; :func:`init_distributed` joins the process group (NCCL on
GPUs, gloo on CPU). :func:`wrap_model` wraps the transformer in ``DistributedDataParallel`` or shards it
with FSDP2 (``fully_shard`` on every transformer block, then the root). The streaming executor runs one
backward per active node, so :func:`no_sync_context` gives the engine a context that suspends gradient
synchronisation (DDP ``no_sync``; FSDP2 ``set_requires_gradient_sync(False)``) for every node but the
last: gradients are reduced once per step. accelerate's FSDP plugin cannot run without an accelerator,
so the sharded path calls ``fully_shard`` itself, which also lets CI test it on CPU with gloo.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

STRATEGIES = ("none", "ddp", "fsdp2")
#: Attribute names under which diffusers' transformers keep their blocks (FLUX, SD3, FLUX.2).
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers")


@dataclass(frozen=True)
class DistState:
    """Where this process stands: rank, world size, local rank and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistState:
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1); else a single process.

    ``device``: ``"auto"`` (the local GPU when there is one, else CPU), ``"cpu"`` or ``"cuda"``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device == "auto" and torch.cuda.is_available()) or device.startswith("cuda")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if world <= 1:
        return DistState(device=dev if use_cuda else torch.device("cpu"))
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistState(dist.get_rank(), dist.get_world_size(), local, dev)


def cleanup() -> None:
    """Destroy the process group (call at exit, also after an error)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: list, state: DistState) -> list:
    """This rank's share of a global list: every ``world_size``-th item starting at ``rank``."""
    return items[state.rank :: state.world_size]


def _blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    found = []
    for name in BLOCK_LISTS:
        blocks = getattr(module, name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            found.extend(blocks)
    return found


def wrap_model(model: torch.nn.Module, strategy: str, state: DistState) -> torch.nn.Module:
    """Wrap for data parallelism. ``ddp``: ``DistributedDataParallel`` (returns the wrapper; the
    original stays at ``.module``). ``fsdp2``: ``fully_shard`` on each transformer block, then the root
    (in place; returns the same module, now sharded). ``none`` or a single process: unchanged."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "none" or not state.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [state.device.index] if state.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = _blocks(model)
    if not blocks:
        raise ValueError(f"fsdp2: found no transformer blocks in {type(model).__name__} (looked for {BLOCK_LISTS})")
    # FSDP2 all-gathers one dtype per group: with a bf16 base and fp32 LoRA weights, gather (and compute)
    # in the narrowest dtype and reduce gradients in fp32; the sharded fp32 LoRA masters stay fp32
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    kw = {}
    if len(dtypes) > 1:
        narrow = min(dtypes, key=lambda d: torch.finfo(d).bits)
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=narrow, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (FSDP2 shards in place, so it is the module itself)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def no_sync_context(model: torch.nn.Module, strategy: str, state: DistState) -> Callable | None:
    """A callable returning a context that suspends gradient synchronisation, for
    ``reward_backprop(no_sync=...)``; None when there is nothing to synchronise."""
    if strategy == "none" or not state.enabled:
        return None
    if strategy == "ddp":
        return model.no_sync

    @contextlib.contextmanager
    def fsdp_no_sync() -> Iterator[None]:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    return fsdp_no_sync


def all_ranks_ok(ok: bool, state: DistState) -> bool:
    """True only if ``ok`` on every rank: a rank that hits a non-finite loss makes all ranks skip."""
    if not state.enabled:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=state.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0.5)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on CPU, for export. Call on EVERY rank (it gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))


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

    msd, osd = get_state_dict(unwrap(model), optimizer, options=StateDictOptions(ignore_frozen_params=True))
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


def save_sharded(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 extra: dict | None = None, *, ema=None) -> list[str]:
    """Save the trainable weights, the optimizer state (and EMA shadows) of a wrapped model, without
    pickles: each rank writes its local shards (``shard_<rank>.safetensors``), rank 0 the tensors every
    rank holds whole (``replicated.safetensors``) and the layout with the non-tensor values
    (``layout.json``). ``extra``: small JSON state saved by rank 0 (``extra_state.json``). Call on every
    rank; returns the paths (relative to ``path``'s parent) this rank wrote."""
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
        if extra is not None:
            with open(os.path.join(folder, "extra_state.json"), "w", encoding="utf-8") as f:
                json.dump(extra, f)
            written.append(f"{base}/extra_state.json")
    if dist.is_initialized():
        dist.barrier()
    return written


def load_sharded(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 ema=None) -> dict | None:
    """Load what :func:`save_sharded` wrote into an identically wrapped model and optimizer (same number
    of ranks, same strategy): every key, kind and shape must match the run's own state. Returns the
    ``extra`` state (or None). Call on every rank; errors name the file."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    from torch.distributed.tensor import DTensor

    from flowbp_train.checkpoint import CheckpointError, load_safetensors, read_json

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
    set_state_dict(unwrap(model), optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    if ema is not None:
        for i, t in enumerate(ema.shadow):
            if payload["ema"][str(i)] is not t:
                with torch.no_grad():
                    t.copy_(payload["ema"][str(i)])
    extra_path = Path(folder, "extra_state.json")
    return read_json(extra_path, "extra state") if extra_path.is_file() else None


def raise_if_any(error: str | None, exc_type: type[Exception], state: DistState) -> None:
    """Raise ``exc_type`` on every rank when one rank has an ``error`` (its message, the lowest failing
    rank's), so that no rank goes on to a collective the others never reach. Single process: raise it."""
    if not state.enabled:
        if error is not None:
            raise exc_type(error)
        return
    flag = torch.tensor([state.rank if error is not None else state.world_size], device=state.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    src = int(flag.item())
    if src == state.world_size:
        return
    buf = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8, device=state.device)
    if state.rank == src:
        data = (error or "").encode("utf-8")[:_MESSAGE_BYTES]
        buf[: len(data)] = torch.tensor(list(data), dtype=torch.uint8, device=state.device)
    dist.broadcast(buf, src=src)
    msg = bytes(buf.cpu().tolist()).rstrip(b"\x00").decode("utf-8", "replace")
    raise exc_type(msg if state.rank == src else f"{msg} (reported by rank {src})")


#: Longest error message shared between ranks (one line naming a file fits easily).
_MESSAGE_BYTES = 1024
