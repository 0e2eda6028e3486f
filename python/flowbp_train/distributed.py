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
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

STRATEGIES = ("none", "ddp", "fsdp2")
#: Attribute names under which diffusers' transformers keep their blocks (FLUX, SD3, FLUX.2).
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers")
BLOCK_LISTS += ("noise_refiner", "context_refiner")  # Z-Image's refiner blocks (ZImageTransformerBlock)


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


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` (CUDA must be there)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device: {spec!r} requested but CUDA is not available")
    return dev


def process_state(device: str = "auto") -> DistState:
    """This process: the process group joined when started by torchrun / accelerate launch (``WORLD_SIZE``
    > 1; ``device: cpu`` keeps gloo on the CPU), else one process on ``device`` (:func:`resolve_device`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return init_distributed("cpu" if device == "cpu" else "auto")
    return DistState(device=resolve_device(device))


def shard_prompts(prompts: list[str], state: DistState) -> list[str]:
    """This rank's share of the prompts (every world_size-th, starting at rank); never empty."""
    return prompts[state.rank :: state.world_size] or prompts


def sync_gradients(params: list[torch.Tensor], world_size: int) -> None:
    """Average gradients across ranks by hand (``distributed_strategy: none`` under torchrun only; DDP
    and FSDP2 reduce during the executor's last node backward)."""
    if world_size == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)


def cleanup() -> None:
    """Destroy the process group (call at exit, also after an error)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
