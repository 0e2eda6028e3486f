"""Measurements of the miniature study (``benchmarks/mini_study.py``), none of them a training loop.

- :func:`saved_bytes_meter`: the bytes autograd saves for backward while a block runs (the peak alive at
  once and the total), the memory figure of the streaming and retain executors at this size;
- :func:`flat_grad`: the parameter gradients as one float64 vector (cosines against full backprop);
- :func:`step_scaled_options`: method options that count steps of a 25-step schedule, rescaled;
- :func:`train_prompts`: a batch of training prompts, uniform over digits and templates.
The training itself is the trainer's (``flowbp_train.trainer``), as for every family.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch

from flowbp_train.digits import NUM_CLASSES, TEMPLATES, prompt_for


def step_scaled_options(method: str, num_steps: int) -> dict:
    """Options whose reference value counts steps of a 25-step schedule, rescaled to ``num_steps``
    (ReFL's ``last_n`` = 11 of 25); every other option keeps the library default."""
    if method == "refl":
        return {"last_n": max(1, min(num_steps, round(11 * num_steps / 25)))}
    return {}


def train_prompts(gen: torch.Generator, batch_size: int) -> list[str]:
    """A batch of training prompts: uniform digit and uniform template (paraphrases included)."""
    d = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)
    t = torch.randint(0, len(TEMPLATES), (batch_size,), generator=gen)
    return [prompt_for(int(a), int(b)) for a, b in zip(d, t)]


@contextmanager
def saved_bytes_meter(exclude: list[torch.Tensor]):
    """Count the bytes autograd saves for backward while the block runs, as the peak of what is alive
    at once (``stats["peak"]``) and the total ever saved (``stats["total"]``). Tensors sharing storage
    with ``exclude`` (the frozen weights and the LoRA parameters, which exist anyway) are not counted."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    stats = {"live": 0, "peak": 0, "total": 0}

    class _Held:
        __slots__ = ("t", "n", "__weakref__")

    def _release(n):
        stats["live"] -= n

    def pack(t):
        h = _Held()
        h.t = t.detach()  # a saved output holding its own grad_fn would form a cycle that is never freed
        n = 0 if t.untyped_storage().data_ptr() in skip else t.numel() * t.element_size()
        h.n = n
        stats["live"] += n
        stats["total"] += n
        stats["peak"] = max(stats["peak"], stats["live"])
        weakref.finalize(h, _release, n)
        return h

    def unpack(h):
        return h.t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield stats


def flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    """The gradients of ``params`` as one float64 vector (zeros where a parameter has none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().double()
                      for p in params])
