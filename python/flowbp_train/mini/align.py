"""A direct alignment loop for the miniature: LoRA + AdamW around ``flowbp_kernels`` (no trainer).

Each step: draw prompts and noise, one no-grad cached rollout, the method's plan, ``reward_backprop``
(loss ``-mean(w R)``, R = log p(digit | image)), clip the gradient norm, AdamW. This is the loop of
``benchmarks/mini_study.py`` (every method under identical settings) and the fallback of the main job;
the trainer (``flowbp-train recipes/mini/*.yaml``) runs the same math through its own loop. Also holds
the measurement helpers of the study: saved-for-backward bytes and gradient vectors.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from flowbp_kernels import get_method, reward_backprop, rollout
from flowbp_train.mini.data import NUM_CLASSES, TEMPLATES, prompt_for


@dataclass
class AlignConfig:
    """Settings of one alignment run (shared by every method in the study: no per-method tuning)."""

    method: str = "flowbp-lagrange"
    method_options: dict = field(default_factory=dict)
    steps: int = 60
    batch_size: int = 32
    num_steps: int = 10  # Euler steps of the training rollout (10 are as good as 25 here)
    learning_rate: float = 1e-3
    rank: int = 8
    max_grad_norm: float = 1.0
    guidance_scale: float = 1.0
    executor: str = "streaming"
    seed: int = 0
    eval_every: int = 10
    eval_per_prompt: int = 8

    def validate(self) -> None:
        for name in ("steps", "batch_size", "num_steps", "rank", "eval_every", "eval_per_prompt"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        get_method(self.method, **self.method_options)


def step_scaled_options(method: str, num_steps: int) -> dict:
    """Options whose reference value counts steps of a 25-step schedule, rescaled to ``num_steps``
    (ReFL's ``last_n`` = 11 of 25); every other option keeps the library default."""
    if method == "refl":
        return {"last_n": max(1, min(num_steps, round(11 * num_steps / 25)))}
    return {}


def add_lora(transformer: torch.nn.Module, rank: int, targets, seed: int) -> list[torch.nn.Parameter]:
    """Attach a peft LoRA (alpha = rank, B initialised to zero) and return its trainable parameters."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets),
                                       init_lora_weights=True))
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


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
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().double()
                      for p in params])


def align(adapter, reward, judge, cfg: AlignConfig, *, log: Callable[[str], None] = print,
          on_eval: Callable[[int, dict, torch.Tensor], None] | None = None,
          params: list[torch.nn.Parameter] | None = None) -> dict:
    """Fine-tune ``adapter.transformer`` with a LoRA by ``cfg.method``; returns the history (list of
    dicts per step), the evaluations before and after, timings and the LoRA parameters. ``params``:
    the LoRA parameters when the caller attached the LoRA already (else :func:`add_lora` does)."""
    from flowbp_train.mini.report import evaluate

    cfg.validate()
    opts = {**step_scaled_options(cfg.method, cfg.num_steps), **cfg.method_options}
    method = get_method(cfg.method, **opts)
    adapter.guidance_scale = cfg.guidance_scale
    if params is None:
        params = add_lora(adapter.transformer, cfg.rank, adapter.default_lora_targets, cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = torch.Generator().manual_seed(10_000 + cfg.seed)
    sig = adapter.sigmas(cfg.num_steps)
    history, evals, step_times = [], {}, []

    def run_eval(step):
        m, x = evaluate(adapter, reward, judge, per_prompt=cfg.eval_per_prompt, num_steps=cfg.num_steps)
        evals[step] = m
        history.append({"step": step, "eval_reward": m["reward"], "eval_judge": m["judge"],
                        "diversity": m["diversity"], "total_variation": m["total_variation"]})
        if on_eval is not None:
            on_eval(step, m, x)
        log(f"[{cfg.method}] step {step}: eval reward {m['reward']:.3f} judge {m['judge']:.3f} "
            f"diversity {m['diversity']:.2f} tv {m['total_variation']:.3f}")

    run_eval(0)
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        prompts = train_prompts(gen, cfg.batch_size)
        batch = adapter.encode_prompts(prompts)
        vf = adapter.velocity_fn(batch, sig)
        ro = rollout(vf, adapter.initial_noise(cfg.batch_size, gen), sig)
        opt.zero_grad(set_to_none=True)
        out = reward_backprop(method, vf, ro, lambda x, p=prompts: reward.score(adapter.decode(x), p),
                              generator=sampler, noise_generator=gen, executor=cfg.executor, params=params,
                              loss="neg")
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        opt.step()
        step_times.append(time.perf_counter() - t0)
        history.append({"step": step, "train_reward": float(out.reward.mean()), "loss": float(out.loss),
                        "grad_norm": gnorm, "seconds": step_times[-1]})
        if step % cfg.eval_every == 0 or step == cfg.steps:
            run_eval(step)
    return {"config": asdict(cfg), "method_options": method.options, "history": history, "evals": evals,
            "step_time_median_s": sorted(step_times)[len(step_times) // 2], "params": params}
