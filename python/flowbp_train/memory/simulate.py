"""Run one real ``Trainer.training_step`` (and one sample step) of a config with every weight a fake tensor.

The trainer is built inside ``FakeTensorMode`` from configs only (``build.py``), on the CPU device, and
its step runs *outside* the mode: parameters, activations and gradients are fake (shapes and dtypes, no
storage, no compute), while what the program computes from scratch (sigma schedules, the index sampler's
plans, step sizes, timesteps, noise) stays real, so every step size and active set is the true one.
:class:`~flowbp_train.memory.tracker.MemoryTracker` accounts every byte as the GPU would hold it. What
only a planning run needs is confined here, applied only while planning: conversions that change nothing
return early and real ones go through ``.data`` (``Module.to`` cannot swap fake parameters); scalar reads
of fakes answer neutral values (finite, 1.0); AdamW and clipping take their GPU defaults (``foreach``);
phases are named by hooks; one AdamW warm-up step with zero gradients gives the steady state; no-grad
transformer forwards of identical shapes are simulated once and replayed (a forward without grad keeps
nothing, so its allocation sequence depends only on the shapes; against a full run the replay may keep a
few small per-call tensors until the step ends: 10 KiB on the tiny test model, tested).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from unittest import mock

import torch
from torch.utils._pytree import tree_leaves

from flowbp_train.memory.tracker import MemoryTracker, Trace


@dataclass
class Simulation:
    """Traces of one simulated training step and sample step, with what the report needs."""

    train: Trace
    sample: Trace | None
    weights: dict[str, int] = field(default_factory=dict)  # bytes of frozen / trainable weights by module
    host_peak: int = 0
    seconds: float = 0.0
    source: str = ""
    notes: list[str] = field(default_factory=list)


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


# ------------------------------------------------------------------------------- planning-only patches
_ORIG_TO = torch.nn.Module.to


def _module_to(self, *args, **kwargs):
    """``Module.to`` that returns early when nothing changes and converts fake parameters through
    ``.data`` (the swap path ``_apply`` takes for fake tensors cannot swap a parameter with itself)."""
    device, dtype, _nb, _fmt = torch._C._nn._parse_to(*args, **kwargs)
    tensors = [*self.parameters(), *self.buffers()]

    def same(t):
        return (device is None or t.device == device) and (dtype is None or not t.is_floating_point()
                                                           or t.dtype == dtype)

    if all(same(t) for t in tensors):
        return self
    if not any(_is_fake(t) for t in tensors):
        return _ORIG_TO(self, *args, **kwargs)
    for m in self.modules():
        for p in m._parameters.values():
            if p is not None and not same(p):
                p.data = p.data.to(device=device, dtype=dtype if p.is_floating_point() else None)
        for k, b in m._buffers.items():
            if b is not None and not same(b):
                m._buffers[k] = b.to(device=device, dtype=dtype if b.is_floating_point() else None)
    return self


@contextlib.contextmanager
def planning_patches() -> Iterator[None]:
    with mock.patch.object(torch.nn.Module, "to", _module_to):
        yield


def _grad_tensors(params) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def _state_tensors(optimizer) -> list[torch.Tensor]:
    return [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


# ------------------------------------------------------------------------------- phases
class _Phases:
    """Names the phase of the program from wrappers and autograd hooks (backward phases start when the
    gradient of the tensor that opens them arrives)."""

    def __init__(self, tracker: MemoryTracker):
        self.tr = tracker

    def set(self, name: str) -> None:
        self.tr.phase = name

    def hook(self, t, name: str) -> None:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.register_hook(lambda g, n=name: self.set(n))

    def install(self, trainer, trainer_module) -> contextlib.ExitStack:
        ad, stack = trainer.adapter, contextlib.ExitStack()
        orig_decode, orig_vel, orig_encode = ad.decode, ad.velocity_fn, ad.encode_prompts
        score = trainer.reward.score

        def decode(latents):
            self.hook(latents, "surrogate backward")
            self.set("decode" if torch.is_grad_enabled() and latents.requires_grad else self.tr.phase)
            return orig_decode(latents)

        def reward_score(images, prompts):
            self.hook(images, "decode backward")
            self.set("reward forward" if torch.is_grad_enabled() and images.requires_grad else self.tr.phase)
            out = score(images, prompts)
            self.hook(out, "reward backward")
            return out

        def velocity_fn(batch, sigmas, **kw):
            v_fn = orig_vel(batch, sigmas, **kw)

            def velocity(x, i):
                if torch.is_grad_enabled():
                    self.set(f"node {i} forward")
                    v = v_fn(x, i)
                    self.hook(v, f"node {i} backward")
                    return v
                return v_fn(x, i)

            return velocity

        def encode(prompts):
            if not self.tr.phase.startswith("sample"):
                self.set("encode")
            return orig_encode(prompts)

        orig_rollout = trainer_module.rollout

        def rollout(*a, **kw):
            self.set("rollout")
            ro = orig_rollout(*a, **kw)
            c = ro.cache
            self.tr.tag([*c._latents, *c._vdata, *(s for s in c._vscale if s is not None)], "rollout cache")
            self.set("surrogate")
            return ro

        orig_clip = torch.nn.utils.clip_grad_norm_

        def clip(*a, **kw):
            self.set("clip")
            kw.setdefault("foreach", True)  # the GPU default
            return orig_clip(*a, **kw)

        for obj, name, new in ((ad, "decode", decode), (ad, "velocity_fn", velocity_fn),
                               (ad, "encode_prompts", encode), (trainer.reward, "score", reward_score)):
            stack.enter_context(mock.patch.object(obj, name, new))
        stack.enter_context(mock.patch.object(trainer_module, "rollout", rollout))
        stack.enter_context(mock.patch.object(torch.nn.utils, "clip_grad_norm_", clip))
        h1 = trainer.optimizer.register_step_pre_hook(lambda *_: self.set("optimizer step"))
        stack.callback(h1.remove)
        if trainer.ema is not None:
            orig_update = trainer.ema.update

            def ema_update():
                self.set("EMA")
                return orig_update()

            stack.enter_context(mock.patch.object(trainer.ema, "update", ema_update))
        return stack


# ------------------------------------------------------------------------------- no-grad forward replay
class _ForwardMemo:
    """Simulate a no-grad transformer forward once per input signature; later calls replay its allocation
    events and return a fresh fake output of the recorded shape."""

    def __init__(self, module: torch.nn.Module, tracker: MemoryTracker, fake_mode):
        self.module, self.tr, self.fake_mode = module, tracker, fake_mode
        self.orig = module.forward
        self.memo: dict = {}
        self.hits = 0

    @staticmethod
    def _sig(args, kwargs):
        def one(v):
            if isinstance(v, torch.Tensor):
                return ("T", tuple(v.shape), v.stride(), v.dtype, v.requires_grad)
            if isinstance(v, (int, float, bool, str, type(None))):
                return ("V", type(v).__name__) if isinstance(v, float) else ("V", v)
            if isinstance(v, (tuple, list)):
                return tuple(one(x) for x in v)
            if isinstance(v, dict):
                return tuple((k, one(x)) for k, x in sorted(v.items()))
            return ("O", id(v))
        return one(tuple(args)), one(dict(kwargs))

    def _arg_tensors(self, args, kwargs) -> list[torch.Tensor]:
        return [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled():
            return self.orig(*args, **kwargs)
        key = self._sig(args, kwargs)
        rec = self.memo.get(key)
        tensors = self._arg_tensors(args, kwargs)
        if rec is None:
            arg_ids = [a.aid if a is not None else None for a in map(self.tr._lookup, tensors)]
            with self.tr.recording() as events:
                out = self.orig(*args, **kwargs)
            if not (isinstance(out, tuple) and all(isinstance(o, torch.Tensor) for o in out)):
                return out
            outs = [self.tr._lookup(o) for o in out]
            self.memo[key] = (events, [(tuple(o.shape), o.stride(), o.dtype) for o in out],
                              [a.aid if a is not None else None for a in outs], arg_ids)
            return out
        self.hits += 1
        events, metas, out_ids, arg_ids = rec
        del args, kwargs  # the caller's references only, as in the recorded call
        argmap = {aid: t for aid, t in zip(arg_ids, tensors) if aid is not None}
        del tensors
        with self.fake_mode:
            return self.tr.replay(events, out_ids, lambda: tuple(
                torch.empty_strided(s, st, dtype=d) for s, st, d in metas), argmap)


# ------------------------------------------------------------------------------- the run
def simulate(cfg, *, fake: bool = True, reward_factory: Callable | None = None, memoize: bool = True,
             sample: bool = True, spec: dict | None = None) -> Simulation:
    """Build the trainer of ``cfg`` (a validated ``TrainConfig``) and run one training step and, when
    ``sample``, one sample step, accounting every byte. ``fake=False`` runs the same program on real
    randomly initialised tensors (only for models small enough: the accounting's reference)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from flowbp_train import trainer as trainer_module
    from flowbp_train.memory import build

    t0 = time.perf_counter()
    cfg = copy.deepcopy(cfg)
    tmp = tempfile.TemporaryDirectory(prefix="flowbp-plan-")
    cfg.output_dir, cfg.report_to, cfg.progress_bar, cfg.device = tmp.name, "none", False, "cpu"
    tracker = MemoryTracker()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        stack.callback(tmp.cleanup)
        stack.enter_context(planning_patches())
        # the tracker must be the innermost mode: FakeTensorMode answers ops without passing them down
        with fake_mode, tracker:
            if cfg.family == "mini":
                adapter, spec = build.build_mini_adapter(cfg)
            else:
                adapter, spec = build.build_adapter(cfg, on_host=tracker.on_host, spec=spec)
            reward = reward_factory(cfg) if reward_factory is not None else build.build_reward(cfg)
            tr = trainer_module.Trainer(cfg, adapter=adapter, reward=reward)
            for g in tr.optimizer.param_groups:
                g["foreach"] = True  # torch's default on CUDA (one multi-tensor kernel per update)
            # steady state: one AdamW step with zero gradients allocates the moments
            for p in tr.params:
                p.grad = torch.zeros_like(p)
            tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)
        steps = [s.get("step") for s in tr.optimizer.state.values()]
        tracker.move_to_host([s for s in steps if isinstance(s, torch.Tensor)])  # AdamW keeps steps on the CPU
        tracker.move_to_host([t for m in adapter.host_modules for t in (*m.parameters(), *m.buffers())])
        weights = _tag_weights(tracker, tr)
        tracker.tag(_state_tensors(tr.optimizer), "optimizer state")
        if tr.ema is not None:
            tracker.tag(tr.ema.shadow, "EMA")
        phases = _Phases(tracker)
        memo = None
        if memoize and fake and tr.strategy == "none":
            memo = _ForwardMemo(adapter.transformer, tracker, fake_mode)
            stack.enter_context(mock.patch.object(adapter.transformer, "forward", memo))
        # reference cycles are freed by the cyclic collector at unpredictable moments: collect now and hold
        # it during the measured steps, so the trace is the same on every run (cycles are freed at the end)
        gc.collect()
        gc.disable()
        stack.callback(gc.enable)
        with phases.install(tr, trainer_module), tracker:
            tracker.restart()
            tr.training_step()
            tracker.tag(_grad_tensors(tr.params), "gradients")
            train_trace = tracker.trace
            sample_trace = None
            if sample:
                tracker.phase = "sample: encode"
                gc.collect()
                tracker.restart()
                _sample_step(tr, tracker)
                sample_trace = tracker.trace
        host_peak = max(train_trace.host_peak, sample_trace.host_peak if sample_trace else 0)
        if memo is not None and memo.hits:
            notes.append(f"{memo.hits} no-grad transformer forwards of identical shapes replayed")
    return Simulation(train_trace, sample_trace, weights, host_peak, time.perf_counter() - t0,
                      spec.get("source", ""), notes)


def _tag_weights(tracker: MemoryTracker, tr) -> dict[str, int]:
    trainable = {id(p) for p in tr.params}
    mods = {"transformer": tr.adapter.transformer, "vae": getattr(tr.adapter, "vae", None), "reward": tr.reward}
    sizes = {}
    for name, m in mods.items():
        if not isinstance(m, torch.nn.Module):
            continue
        frozen = [t for t in (*m.parameters(), *m.buffers()) if id(t) not in trainable]
        tracker.tag(frozen, "frozen weights")
        sizes[f"{name} (frozen)"] = tracker.bytes_of(frozen)
    tracker.tag(tr.params, "trainable weights")
    sizes["trainable"] = tracker.bytes_of(tr.params)
    return sizes


@torch.no_grad()
def _sample_step(tr, tracker: MemoryTracker) -> None:
    """One sample image as ``Trainer.save_final`` makes it: EMA weights swapped in, ``sample_steps`` Euler
    steps of batch 1, decode (the PNG encoding on the host is left out)."""
    from flowbp_kernels import rollout

    cfg, ad = tr.cfg, tr.adapter
    ctx = tr.ema.swapped_in() if tr.ema is not None else contextlib.nullcontext()
    with ctx:
        batch = ad.encode_prompts([tr.prompts[0]])
        sigmas = ad.sigmas(cfg.sample_steps)
        gen = torch.Generator().manual_seed(cfg.seed)
        tracker.phase = "sample: rollout"
        ro = rollout(ad.velocity_fn(batch, sigmas), ad.initial_noise(1, generator=gen), sigmas,
                     latent_dtype=tr.latent_dtype)
        tracker.phase = "sample: decode"
        ad.decode(ro.sample)[0].clamp(0, 1).mul(255).round().byte()
